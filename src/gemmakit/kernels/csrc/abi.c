// The ABI number the Python side checks before it uses this library (see gemmakit_kernels.h).
#include "gemmakit_kernels.h"

int64_t gemmakit_kernels_abi(void) { return GEMMAKIT_KERNELS_ABI; }
