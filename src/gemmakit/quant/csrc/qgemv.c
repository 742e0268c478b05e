// Block-scaled int8 matrix-vector products for CPU decode (x86-64 AVX2/FMA, with a portable fallback).
//
// W is (N, K) int8 with one float scale per `group` consecutive weights of a row (and, for affine GGML
// formats, one float min per group): w[n, k] = scale[n, k / group] * q[n, k] - min[n, k / group].
// For B input rows x (B, K) we compute y (B, N) = x @ W^T in float32, reading W once for all B rows.
#include <stdint.h>
#include <stddef.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAXB 16

static inline float hsum256(
#ifdef __AVX2__
    __m256 v
#else
    float v
#endif
) {
#ifdef __AVX2__
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
#else
    return v;
#endif
}

// Sums of x over each group (needed by the affine term), xs (B, K / group).
static void group_sums(const float *x, int64_t B, int64_t K, int64_t group, float *xs) {
    int64_t G = K / group;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.f;
            for (int64_t k = 0; k < group; k++) s += x[b * K + g * group + k];
            xs[b * G + g] = s;
        }
}

#ifdef __AVX2__
// Dot of 32 int8 weights with 32 floats of x, unscaled.
static inline __m256 dot32(const int8_t *q, const float *x) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)q);
    __m128i lo = _mm256_castsi256_si128(raw), hi = _mm256_extracti128_si256(raw, 1);
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
    __m256 u = _mm256_mul_ps(w1, _mm256_loadu_ps(x + 8));
    t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), t);
    u = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), u);
    return _mm256_add_ps(t, u);
}

// Dot of 16 int8 weights with 16 floats of x (Q6_K / Q3_K / Q2_K groups of 16), unscaled.
static inline __m256 dot16(const int8_t *q, const float *x) {
    __m128i raw = _mm_loadu_si128((const __m128i *)q);
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
    return _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(x)));
}
#endif

static void rows(const int8_t *q, const float *scale, const float *mins, const float *x, const float *xs,
                 float *y, int64_t B, int64_t N, int64_t K, int64_t group, int64_t n0, int64_t n1) {
    int64_t G = K / group;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *qr = q + n * K;
        const float *sr = scale + n * G;
        float out[MAXB];
#ifdef __AVX2__
        __m256 acc[MAXB];
        for (int64_t b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();
        if (B == 1) {
            // Two accumulators so consecutive groups do not wait on each other.
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g + 1 < G; g += 2) {
                __m256 d0 = group == 32 ? dot32(qr + g * 32, x + g * 32) : dot16(qr + g * 16, x + g * 16);
                __m256 d1 = group == 32 ? dot32(qr + (g + 1) * 32, x + (g + 1) * 32)
                                        : dot16(qr + (g + 1) * 16, x + (g + 1) * 16);
                a0 = _mm256_fmadd_ps(d0, _mm256_set1_ps(sr[g]), a0);
                a1 = _mm256_fmadd_ps(d1, _mm256_set1_ps(sr[g + 1]), a1);
            }
            for (; g < G; g++) {
                __m256 d = group == 32 ? dot32(qr + g * 32, x + g * 32) : dot16(qr + g * 16, x + g * 16);
                a0 = _mm256_fmadd_ps(d, _mm256_set1_ps(sr[g]), a0);
            }
            acc[0] = _mm256_add_ps(a0, a1);
        } else {
            for (int64_t g = 0; g < G; g++) {
                __m256 s = _mm256_set1_ps(sr[g]);
                for (int64_t b = 0; b < B; b++) {
                    const float *xb = x + b * K + g * group;
                    __m256 d = group == 32 ? dot32(qr + g * 32, xb) : dot16(qr + g * 16, xb);
                    acc[b] = _mm256_fmadd_ps(d, s, acc[b]);
                }
            }
        }
        for (int64_t b = 0; b < B; b++) out[b] = hsum256(acc[b]);
#else
        for (int64_t b = 0; b < B; b++) {
            float v = 0.f;
            for (int64_t g = 0; g < G; g++) {
                float d = 0.f;
                for (int64_t k = 0; k < group; k++) d += (float)qr[g * group + k] * x[b * K + g * group + k];
                v += sr[g] * d;
            }
            out[b] = v;
        }
#endif
        for (int64_t b = 0; b < B; b++) {
            float v = out[b];
            if (mins) {
                const float *mr = mins + n * G;
                for (int64_t g = 0; g < G; g++) v -= mr[g] * xs[b * G + g];
            }
            y[b * N + n] = v;
        }
    }
}

// y (B, N) = x (B, K) @ dequant(q, scale, mins)^T; B <= MAXB; group is a multiple of 16; threads >= 1.
// xs is scratch of B * K / group floats (used only when mins is given).
int qgemv(const int8_t *q, const float *scale, const float *mins, const float *x, float *xs, float *y,
          int64_t B, int64_t N, int64_t K, int64_t group, int threads) {
    if (B < 1 || B > MAXB || (group != 16 && group != 32) || K % group) return 1;
    if (mins) group_sums(x, B, K, group, xs);
    int64_t chunk = 64;
    int64_t n_chunks = (N + chunk - 1) / chunk;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        rows(q, scale, mins, x, xs, y, B, N, K, group, n0, n1);
    }
    return 0;
}

// Dequantize rows [r0, r1) of W into out ((r1 - r0), K) float32 (embedding lookups, prefill matmuls).
void dequant_rows(const int8_t *q, const float *scale, const float *mins, float *out, int64_t K, int64_t group,
                  const int64_t *row_ids, int64_t n_rows, int threads) {
    int64_t G = K / group;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n_rows; i++) {
        int64_t r = row_ids ? row_ids[i] : i;
        for (int64_t g = 0; g < G; g++) {
            float s = scale[r * G + g], m = mins ? mins[r * G + g] : 0.f;
            for (int64_t k = 0; k < group; k++)
                out[i * K + g * group + k] = s * (float)q[r * K + g * group + k] - m;
        }
    }
}

// RMSNorm over the last dimension of x (rows, dim), float32, out = x / sqrt(mean(x^2) + eps) * w (w may be
// NULL for a weightless norm). The per-op overhead of PyTorch's eager norm dominates at decode sizes.
void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float ss = 0.f;
        for (int64_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        if (w)
            for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inv * w[i];
        else
            for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inv;
    }
}
