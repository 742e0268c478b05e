// The ABI number the Python side checks before it uses this library (see gemmakit_kernels.h), what this build
// does fast, and the OpenMP workers of threads that are done with parallel work.
#include <omp.h>

#include "gemmakit_kernels.h"

int64_t gemmakit_kernels_abi(void) { return GEMMAKIT_KERNELS_ABI; }

int64_t gemmakit_kernels_features(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}

// libgomp (one runtime for these kernels and torch: both load libgomp.so.1) keeps a team of workers for each
// thread that has run a parallel region, and between regions those workers spin only while it manages no more
// threads than there are CPUs; past that they sleep at once, and each of the ~80 parallel regions of a decode
// step starts with a futex wake-up. The thread that loaded the model (or made an engine's cache) keeps an idle
// team, which is enough to push a 2-thread engine on 2 CPUs past the limit: a lone sequence's step took 1.5-2 ms
// longer (of ~12). omp_pause_resource_all ends the calling thread's team (libgomp: gomp_pause_host); the thread
// gets a new one if it runs a parallel region again.
int release_thread_workers(void) { return omp_pause_resource_all(omp_pause_soft); }
