// The ABI number the Python side checks before it uses this library (see gemmakit_kernels.h).
#include "gemmakit_kernels.h"

int64_t gemmakit_kernels_abi(void) { return GEMMAKIT_KERNELS_ABI; }

int64_t gemmakit_kernels_features(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}
