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

// 32 int8 weights as four float vectors (unscaled): converted once, used for up to four rows of x.
static inline void widen32(const int8_t *q, __m256 w[4]) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)q);
    __m128i lo = _mm256_castsi256_si128(raw), hi = _mm256_extracti128_si256(raw, 1);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

// dot32 and the two halves of dot16 from widened weights, with the same operations in the same order.
static inline __m256 wdot32(const __m256 w[4], const float *x) {
    __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
    __m256 u = _mm256_mul_ps(w[1], _mm256_loadu_ps(x + 8));
    t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), t);
    u = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), u);
    return _mm256_add_ps(t, u);
}
static inline __m256 wdot16(__m256 w0, __m256 w1, const float *x) {
    return _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(x)));
}

// Four rows of x at once (x0: the first; rows K apart) with the one-row arithmetic: group dots, then two
// accumulators over alternating groups. out: the four unreduced sums.
static inline void four_rows(const int8_t *qr, const float *sr, const float *x0, int64_t K, int64_t group,
                             __m256 out[4]) {
    int64_t G = K / group;
    __m256 a0[4], a1[4], w[4];
    for (int r = 0; r < 4; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    if (group == 32) {
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {
            __m256 s0 = _mm256_set1_ps(sr[g]), s1 = _mm256_set1_ps(sr[g + 1]);
            widen32(qr + g * 32, w);
            for (int r = 0; r < 4; r++) a0[r] = _mm256_fmadd_ps(wdot32(w, x0 + r * K + g * 32), s0, a0[r]);
            widen32(qr + (g + 1) * 32, w);
            for (int r = 0; r < 4; r++) a1[r] = _mm256_fmadd_ps(wdot32(w, x0 + r * K + (g + 1) * 32), s1, a1[r]);
        }
        if (g < G) {
            __m256 s0 = _mm256_set1_ps(sr[g]);
            widen32(qr + g * 32, w);
            for (int r = 0; r < 4; r++) a0[r] = _mm256_fmadd_ps(wdot32(w, x0 + r * K + g * 32), s0, a0[r]);
        }
    } else {  // groups of 16: each 32 weights are an even group and the odd one after it
        for (int64_t g = 0; g + 1 < G; g += 2) {
            __m256 s0 = _mm256_set1_ps(sr[g]), s1 = _mm256_set1_ps(sr[g + 1]);
            widen32(qr + g * 16, w);
            for (int r = 0; r < 4; r++) {
                const float *xr = x0 + r * K + g * 16;
                a0[r] = _mm256_fmadd_ps(wdot16(w[0], w[1], xr), s0, a0[r]);
                a1[r] = _mm256_fmadd_ps(wdot16(w[2], w[3], xr + 16), s1, a1[r]);
            }
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm256_add_ps(a0[r], a1[r]);
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
        // Every row of x is summed in the same order whatever B is (two accumulators over alternating groups),
        // so a sequence's result does not depend on the batch it shares a step with.
        // Rows of x in blocks of four share each widened weight group; the rest go one by one. Both compute
        // a row the same way (same group dots, same two accumulators over alternating groups), so a
        // sequence's result does not depend on the batch it shares a step with.
        __m256 acc[MAXB];
        int64_t blocked = B / 4 * 4;
        for (int64_t b0 = 0; b0 < blocked; b0 += 4) four_rows(qr, sr, x + b0 * K, K, group, acc + b0);
        for (int64_t b = blocked; b < B; b++) {
            const float *xb = x + b * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g + 1 < G; g += 2) {
                __m256 d0 = group == 32 ? dot32(qr + g * 32, xb + g * 32) : dot16(qr + g * 16, xb + g * 16);
                __m256 d1 = group == 32 ? dot32(qr + (g + 1) * 32, xb + (g + 1) * 32)
                                        : dot16(qr + (g + 1) * 16, xb + (g + 1) * 16);
                a0 = _mm256_fmadd_ps(d0, _mm256_set1_ps(sr[g]), a0);
                a1 = _mm256_fmadd_ps(d1, _mm256_set1_ps(sr[g + 1]), a1);
            }
            for (; g < G; g++) {
                __m256 d = group == 32 ? dot32(qr + g * 32, xb + g * 32) : dot16(qr + g * 16, xb + g * 16);
                a0 = _mm256_fmadd_ps(d, _mm256_set1_ps(sr[g]), a0);
            }
            acc[b] = _mm256_add_ps(a0, a1);
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
    if (B < 1 || B > MAXB || (group != 16 && group != 32) || K % 32) return 1;
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
// NULL for a weightless norm). Faster than PyTorch's eager norm at every size measured here (decode: its
// dispatch overhead; prefill: 118 vs 213 us for 512 x 640).
void rms_norm_row(const float *x, const float *w, float *out, int64_t dim, float eps);  // decode.c

void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps) {
    #pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * dim, w, out + r * dim, dim, eps);
}

// ---- GGML blocks -> int8 values + float scales (+ mins), the same layout as quant/ggml.py's split() ----

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) bits = sign;
        else {  // subnormal: normalize
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000 | (mant << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

// qtype: ggml type id (8 Q8_0, 2 Q4_0, 6 Q5_0, 12 Q4_K, 14 Q6_K). Returns nonzero for other types.
int split_blocks(int qtype, const uint8_t *raw, int64_t n_blocks, int8_t *q, float *scale, float *mins, int threads) {
    if (qtype != 8 && qtype != 2 && qtype != 6 && qtype != 12 && qtype != 14) return 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n_blocks; b++) {
        if (qtype == 8) {  // Q8_0: d, 32 x int8
            const uint8_t *blk = raw + b * 34;
            scale[b] = half_to_float(rd16(blk));
            for (int j = 0; j < 32; j++) q[b * 32 + j] = (int8_t)blk[2 + j];
        } else if (qtype == 2) {  // Q4_0: d, 16 bytes of nibbles
            const uint8_t *blk = raw + b * 18;
            scale[b] = half_to_float(rd16(blk));
            for (int j = 0; j < 16; j++) {
                q[b * 32 + j] = (int8_t)((blk[2 + j] & 0x0F) - 8);
                q[b * 32 + j + 16] = (int8_t)((blk[2 + j] >> 4) - 8);
            }
        } else if (qtype == 6) {  // Q5_0: d, 32-bit high bits, 16 bytes of nibbles
            const uint8_t *blk = raw + b * 22;
            scale[b] = half_to_float(rd16(blk));
            uint32_t qh = (uint32_t)blk[2] | ((uint32_t)blk[3] << 8) | ((uint32_t)blk[4] << 16) | ((uint32_t)blk[5] << 24);
            for (int j = 0; j < 16; j++) {
                q[b * 32 + j] = (int8_t)(((blk[6 + j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16);
                q[b * 32 + j + 16] = (int8_t)(((blk[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
            }
        } else if (qtype == 12) {  // Q4_K: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
            const uint8_t *blk = raw + b * 144, *sc = blk + 4, *qs = blk + 16;
            float d = half_to_float(rd16(blk)), dmin = half_to_float(rd16(blk + 2));
            for (int i = 0; i < 8; i++) {
                int s, m;
                if (i < 4) { s = sc[i] & 63; m = sc[i + 4] & 63; }
                else { s = (sc[i + 4] & 0x0F) | ((sc[i - 4] >> 6) << 4); m = (sc[i + 4] >> 4) | ((sc[i] >> 6) << 4); }
                scale[b * 8 + i] = d * (float)s;
                mins[b * 8 + i] = dmin * (float)m;
            }
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < 32; l++) {
                    q[b * 256 + 64 * c + l] = (int8_t)(qs[32 * c + l] & 0x0F);
                    q[b * 256 + 64 * c + 32 + l] = (int8_t)(qs[32 * c + l] >> 4);
                }
        } else {  // Q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d
            const uint8_t *blk = raw + b * 210, *ql = blk, *qh = blk + 128;
            const int8_t *sc = (const int8_t *)(blk + 192);
            float d = half_to_float(rd16(blk + 208));
            for (int g = 0; g < 16; g++) scale[b * 16 + g] = d * (float)sc[g];
            for (int h = 0; h < 2; h++) {
                const uint8_t *l8 = ql + 64 * h, *h8 = qh + 32 * h;
                int8_t *o = q + b * 256 + 128 * h;
                for (int l = 0; l < 32; l++) {
                    o[l] = (int8_t)(((l8[l] & 0x0F) | ((h8[l] & 3) << 4)) - 32);
                    o[l + 32] = (int8_t)(((l8[l + 32] & 0x0F) | (((h8[l] >> 2) & 3) << 4)) - 32);
                    o[l + 64] = (int8_t)(((l8[l] >> 4) | (((h8[l] >> 4) & 3) << 4)) - 32);
                    o[l + 96] = (int8_t)(((l8[l + 32] >> 4) | (((h8[l] >> 6) & 3) << 4)) - 32);
                }
            }
        }
    }
    return 0;
}
