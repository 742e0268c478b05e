// Block-scaled int8 matrix-vector products for CPU decode: AVX-512 (VNNI where present), AVX2, or portable C.
//
// W is (N, K) int8 with one float scale per `group` (16 or 32) consecutive weights of a row (and, for affine
// GGML formats, one float min per group): w[n, k] = scale[n, k / group] * q[n, k] - min[n, k / group].
// For B input rows x (B, K) we compute y (B, N) = x @ W^T, reading W once for all B rows.
//
// Packed layout. Rows go in blocks of 16 (N padded up to a multiple of 16 with zero rows); inside a block,
// each 32 bytes hold the 16 rows' weights for two consecutive columns:
//     q[((n / 16) * (K / 2) + k / 2) * 32 + (n % 16) * 2 + k % 2]
// and scales (mins) are [n / 16][group][n % 16]. One 32-byte load, sign-extended to 16-bit, is a vector of 16
// output rows x 2 columns, which a multiply-add of 16-bit pairs (vpdpwssd / vpmaddwd) applies to two columns
// of x broadcast to every lane: each instruction does 32 multiply-adds for 16 outputs with no per-row horizontal
// sums, and the weights are read once for every row of x.
//
// 4-bit formats of unsigned values (Q4_K) go by quads of columns, 32 bytes per 16 rows x 4 columns: byte
// 2 * (n % 16) + (k % 2) holds column k in its low nibble when k % 4 < 2, in its high nibble otherwise:
//     q[((n / 16) * (K / 4) + k / 4) * 32 + (n % 16) * 2 + k % 2] >> (4 * ((k / 2) % 2)) & 15
// so one 32-byte load, zero-extended to 16 bits, is the 16 rows x 2 columns of two pairs at once: its low
// nibbles (an and) are the first pair, its high nibbles (a shift) the second, 3 instructions for 64 weights
// where unpacking a pair at a time took 5 for 32 (decode of 4-bit weights is bound by instructions, not bytes,
// on CPUs without VNNI). The kernels'
// `flags`: bit 0 = float16 scales and mins, bit 1 = 4-bit values, bit 2 = two-level scales.
//
// Two-level scales (K-quants, whose group scale is ggml's fp16 super-block scale times a 6- or 8-bit integer):
// per 16-row block and per 256 columns, 16 float32 super-scales (one per row), then for each of the 256 / group
// groups 16 int8 sub-scales (one per row); scale = super * sub, the product ggml's dequantizer takes. Q4_K's
// scales and mins cost 0.09 bytes a weight this way instead of 0.25 as floats per group (Q6_K: 0.08 vs 0.25),
// and decode reads every byte of them each step.
//
// x is rounded to 16-bit integers per group (scale max|x| / 32767; relative error <= 1.5e-5 of the group's
// largest value), so the group dot products are exact integer sums (at most 32 * 32767 * 128 < 2^31), scaled in
// float once per group. A row of x is computed with the same operations in the same order whatever else is in
// the batch, so a sequence's result does not depend on the batch it shares a step with.
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "gemmakit_kernels.h"
#include "qpack.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QMAX 32767.f

// Rows of 16-bit x a tile multiplies at once. Each 16 x 2 weights converted to 16 bits serve every row of the
// tile, so 16 rows (16 accumulators) spend half as many conversions per multiply-add as 8 did: the 262144 x 640
// head of a 16-sequence step went from 16.2 to 14.0 ms on a Zen 4.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define X16_CHUNK 16
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define X16_CHUNK 4
#else
#define X16_CHUNK 1
#endif
// Rows of 8-bit x a tile takes: 16 with VNNI; else the plain C path goes a row at a time (x in plain order).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define X8_CHUNK 16
#else
#define X8_CHUNK 1
#endif

// One group of x (16 or 32 values) -> its 16-bit integers, its step (max|x| / 32767) and its float sum.
// The sum is taken in one fixed order on every instruction set, so every build gives the same bits: lanes
// i and i + 16 first (group 32), then halves folded 16 -> 8 -> 4 -> 2 -> 1. A NaN or infinity in the group makes
// its step NaN and its integers 0, so it reaches the output as in float arithmetic instead of turning into
// arbitrary integers.
#if defined(__AVX512F__) && defined(__AVX512BW__)
static inline void quantize_group(const float *v, int64_t group, int16_t *q, float *step, float *sum) {
    __m512 a = _mm512_loadu_ps(v), b = group == 32 ? _mm512_loadu_ps(v + 16) : _mm512_setzero_ps();
    __m512 inv = _mm512_set1_ps(group_stats(a, b, group == 32, QMAX, step, sum));
    // round to nearest even (the default mode), as lrintf; |v * inv| <= 32767 fits int16
    _mm256_storeu_si256((__m256i *)q, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv))));
    if (group == 32)
        _mm256_storeu_si256((__m256i *)(q + 16), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv))));
    if (isnan(*step)) memset(q, 0, sizeof(int16_t) * group);  // NaN * 0 would convert to -32768
}
#elif defined(__AVX2__)
static inline void quantize_group(const float *v, int64_t group, int16_t *q, float *step, float *sum) {
    const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(3.4028235e38f);
    __m256 a[4], amax = _mm256_setzero_ps();
    int ok = 1;
    for (int i = 0; i < group / 8; i++) {
        a[i] = _mm256_loadu_ps(v + 8 * i);
        __m256 mag = _mm256_andnot_ps(sign, a[i]);
        amax = _mm256_max_ps(amax, mag);
        ok &= _mm256_movemask_ps(_mm256_cmp_ps(mag, big, _CMP_LE_OQ)) == 0xFF;
    }
    __m256 s8 = group == 32 ? _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]))
                            : _mm256_add_ps(a[0], a[1]);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    *sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    *step = ok ? m / QMAX : NAN;
    __m256 inv = _mm256_set1_ps(ok && m > 0.f ? QMAX / m : 0.f);
    for (int i = 0; i < group / 16; i++) {
        __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(a[2 * i], inv));
        __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(a[2 * i + 1], inv));
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);  // back in column order
        _mm256_storeu_si256((__m256i *)(q + 16 * i), ok ? packed : _mm256_setzero_si256());
    }
}
#else
static inline void quantize_group(const float *v, int64_t group, int16_t *q, float *step, float *sum) {
    float lanes[16], amax = 0.f;
    int finite = 1;
    for (int i = 0; i < 16; i++) lanes[i] = group == 32 ? v[i] + v[i + 16] : v[i];
    for (int64_t k = 0; k < group; k++) {
        amax = fmaxf(amax, fabsf(v[k]));
        finite &= isfinite(v[k]) != 0;
    }
    for (int width = 8; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
    *sum = lanes[0];
    *step = finite ? amax / QMAX : NAN;
    float inv = finite && amax > 0.f ? QMAX / amax : 0.f;
    for (int64_t k = 0; k < group; k++) q[k] = finite ? (int16_t)nearbyintf(v[k] * inv) : 0;
}
#endif

// x (B, K) -> xq (B, K) int16, xd (B, G) the step of each group, xs (B, G) the float sum of each group.
static void quantize_rows(const float *x, int64_t B, int64_t K, int64_t group, int16_t *xq, float *xd, float *xs) {
    int64_t G = K / group;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < G; g++)
            quantize_group(x + b * K + g * group, group, xq + b * K + g * group, xd + b * G + g, xs + b * G + g);
}

// Rounded x (B rows of P 4-byte units: column pairs of 16-bit x, quads of 8-bit x) -> the layout the tiles read:
// each chunk of `chunk` rows (the rows a tile takes at most) with its units interleaved, unit p of the chunk's row
// b at unit p * rows + b. A tile then reaches all its rows' units from one pointer at fixed offsets, where 16 row
// pointers took more registers than there are (the compiler spilled them inside the multiply-add loop). A full
// chunk of 16 rows goes one unit of all its rows per gather. A row's values are the same whatever its chunk.
static void interleave_units(const uint8_t *plain, int64_t B, int64_t P, int64_t chunk, uint8_t *out) {
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        const int64_t rows = B - b0 < chunk ? B - b0 : chunk;
        const uint8_t *src = plain + b0 * P * 4;
        uint8_t *dst = out + b0 * P * 4;
        int64_t p = 0;
#if defined(__AVX512F__)
        if (rows == 16 && P < (1 << 26)) {
            const __m512i rows_apart = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)P));
            for (; p < P; p++)
                _mm512_storeu_si512((void *)(dst + p * 64), _mm512_i32gather_epi32(rows_apart, src + p * 4, 4));
        }
#endif
        for (; p < P; p++)
            for (int64_t b = 0; b < rows; b++) memcpy(dst + (p * rows + b) * 4, src + (b * P + p) * 4, 4);
    }
}

// Multiplying a block of 16 rows for the first rows of x, pull in the next block's weights (pf; NULL for none)
// at the same offset, one cache line for each 64 bytes read of this one: the hardware prefetcher alone leaves
// batched steps waiting on memory at every block (the 262144 x 640 head for 16 rows of x: 13 -> 8 ms).
static inline __attribute__((always_inline)) void prefetch_next(const int8_t *pf, int64_t offset, int64_t p,
                                                                const int NIB) {
    if (pf && !(p & (NIB ? 3 : 1))) __builtin_prefetch(pf + offset + p * (NIB ? 16 : 32), 0, 3);
}

static inline int32_t pair_at(const int16_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#if defined(__AVX512VNNI__) && defined(__GNUC__)
// acc += w . (the int16 pair at p, broadcast), in place. Written as asm because GCC 12 keeps intrinsic
// accumulators of an unrolled tile in the wrong registers and copies each one twice per multiply-add; here the
// broadcast is also folded into the instruction.
static inline __attribute__((always_inline)) void dot_pairs(__m512i *acc, __m512i w, const int16_t *p) {
    __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(*acc) : "v"(w), "m"(*(const int32_t *)p));
}
#elif defined(__AVX512VNNI__)
static inline void dot_pairs(__m512i *acc, __m512i w, const int16_t *p) {
    *acc = _mm512_dpwssd_epi32(*acc, w, _mm512_set1_epi32(pair_at(p)));
}
#else
static inline void dot_pairs(__m512i *acc, __m512i w, const int16_t *p) {
    *acc = _mm512_add_epi32(*acc, _mm512_madd_epi16(w, _mm512_set1_epi32(pair_at(p))));
}
#endif
// The 16 rows x 2 columns of pairs p and p + 1 (p even) as 16-bit values, lane pairs (row, column).
static inline __attribute__((always_inline)) void pairs16(const int8_t *qg, int64_t p, const int NIB, __m512i *w0,
                                                          __m512i *w1) {
    if (NIB) {
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(qg + p * 16)));
        *w0 = _mm512_and_si512(v, _mm512_set1_epi16(15));
        *w1 = _mm512_srli_epi16(v, 4);
        return;
    }
    *w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qg + p * 32)));
    *w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qg + p * 32 + 32)));
}

// A group's integer sums (acc, one vector of 16 outputs per row of x) into the float sums: times the weights'
// scales and x's step, less the weights' mins times x's sum (mb NULL: no mins).
static inline __attribute__((always_inline)) void scale_group(const int NB, __m512 *accf, const __m512i *acc,
                                                              const uint8_t *sb, const uint8_t *mb, int mode,
                                                              int64_t g, int64_t group, const float *xd,
                                                              const float *xs, int64_t G) {
    __m512 sc = scale16(sb, mode, g, group);
    for (int b = 0; b < NB; b++)
        accf[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b]), _mm512_mul_ps(sc, _mm512_set1_ps(xd[b * G + g])),
                                  accf[b]);
    if (mb) {
        __m512 mn = scale16(mb, mode, g, group);
        for (int b = 0; b < NB; b++) accf[b] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(xs[b * G + g]), accf[b]);
    }
}

// The first nvalid of each row's 16 outputs to y (rows N apart).
static inline __attribute__((always_inline)) void store_tile_rows(const int NB, const __m512 *accf, float *y,
                                                                  int64_t N, int64_t nvalid) {
    __mmask16 m = nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nvalid) - 1);
    for (int b = 0; b < NB; b++) _mm512_mask_storeu_ps(y + b * N, m, accf[b]);
}

// One block of 16 output rows for NB rows of x.

static inline __attribute__((always_inline)) void tile(
    const int NB, const int NIB, const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode,
    const int16_t *xq, const float *xd, const float *xs, float *y, int64_t N, int64_t R, int64_t G, int64_t group,
    int64_t nvalid, const int8_t *pf) {
    __m512 accf[X16_CHUNK];
    for (int b = 0; b < NB; b++) accf[b] = _mm512_setzero_ps();
    const int64_t pairs = group / 2;
    for (int64_t g = 0; g < G; g++) {
        __m512i acc[X16_CHUNK];
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_si512();
        const int8_t *qg = qb + g * pairs * (NIB ? 16 : 32);
        const int16_t *xg = xq + g * group * R;
        for (int64_t p = 0; p < pairs; p += 2) {
            __m512i w0, w1;
            pairs16(qg, p, NIB, &w0, &w1);
            prefetch_next(pf, qg - qb, p, NIB);
            const int16_t *x0 = xg + 2 * p * R, *x1 = x0 + 2 * R;  // pairs p and p + 1 of the tile's rows
            for (int b = 0; b < NB; b++) {
                dot_pairs(&acc[b], w0, x0 + 2 * b);
                dot_pairs(&acc[b], w1, x1 + 2 * b);
            }
        }
        scale_group(NB, accf, acc, sb, mb, mode, g, group, xd, xs, G);
    }
    store_tile_rows(NB, accf, y, N, nvalid);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Rows 8h .. 8h + 7's scales of group g (bitwise block_scale's values).
static inline __m256 scale8(const uint8_t *blk, int mode, int64_t g, int64_t group, int h) {
    if (mode == SCALE_KS) {
        const int sh = ks_shift(group);
        const uint8_t *c = blk + (g >> sh) * ks_chunk(group);
        const __m128i sub8 = _mm_loadl_epi64((const __m128i *)(c + 64 + (g & ((1 << sh) - 1)) * 16 + 8 * h));
        __m256 sub = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sub8));
        return _mm256_mul_ps(_mm256_loadu_ps((const float *)c + 8 * h), sub);
    }
    int64_t i = g * 16 + 8 * h;
    return mode == SCALE_F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)blk + i)))
                             : _mm256_loadu_ps((const float *)blk + i);
}
// The same arithmetic with 256-bit vectors: rows 0-7 and 8-15 of the block as two halves. w[h][i]: half h's
// 8 rows x 2 columns of pair p + i (p even).
static inline __attribute__((always_inline)) void pairs8(const int8_t *qg, int64_t p, const int NIB, __m256i w[2][2]) {
    for (int h = 0; h < 2; h++) {
        if (NIB) {
            __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qg + p * 16 + 16 * h)));
            w[h][0] = _mm256_and_si256(v, _mm256_set1_epi16(15));
            w[h][1] = _mm256_srli_epi16(v, 4);
        } else {
            for (int i = 0; i < 2; i++)
                w[h][i] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qg + (p + i) * 32 + 16 * h)));
        }
    }
}

static inline __attribute__((always_inline)) void tile(
    const int NB, const int NIB, const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode,
    const int16_t *xq, const float *xd, const float *xs, float *y, int64_t N, int64_t R, int64_t G, int64_t group,
    int64_t nvalid, const int8_t *pf) {
    __m256 accf[X16_CHUNK][2];
    for (int b = 0; b < NB; b++) accf[b][0] = accf[b][1] = _mm256_setzero_ps();
    const int64_t pairs = group / 2;
    for (int64_t g = 0; g < G; g++) {
        __m256i acc[X16_CHUNK][2];
        for (int b = 0; b < NB; b++) acc[b][0] = acc[b][1] = _mm256_setzero_si256();
        const int8_t *qg = qb + g * pairs * (NIB ? 16 : 32);
        const int16_t *xg = xq + g * group * R;
        for (int64_t p = 0; p < pairs; p += 2) {
            __m256i w[2][2];
            prefetch_next(pf, qg - qb, p, NIB);
            pairs8(qg, p, NIB, w);
            for (int b = 0; b < NB; b++)
                for (int i = 0; i < 2; i++) {
                    __m256i xv = _mm256_set1_epi32(pair_at(xg + 2 * ((p + i) * R + b)));
                    acc[b][0] = _mm256_add_epi32(acc[b][0], _mm256_madd_epi16(w[0][i], xv));
                    acc[b][1] = _mm256_add_epi32(acc[b][1], _mm256_madd_epi16(w[1][i], xv));
                }
        }
        for (int h = 0; h < 2; h++) {
            __m256 sc = scale8(sb, mode, g, group, h);
            for (int b = 0; b < NB; b++)
                accf[b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[b][h]),
                                             _mm256_mul_ps(sc, _mm256_set1_ps(xd[b * G + g])), accf[b][h]);
            if (mb) {
                __m256 mn = scale8(mb, mode, g, group, h);
                for (int b = 0; b < NB; b++)
                    accf[b][h] = _mm256_fnmadd_ps(mn, _mm256_set1_ps(xs[b * G + g]), accf[b][h]);
            }
        }
    }
    for (int b = 0; b < NB; b++) {
        float out[16];
        _mm256_storeu_ps(out, accf[b][0]);
        _mm256_storeu_ps(out + 8, accf[b][1]);
        for (int64_t j = 0; j < nvalid; j++) y[b * N + j] = out[j];
    }
}
#else
static void tile(const int NB, const int NIB, const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode,
                 const int16_t *xq, const float *xd, const float *xs, float *y, int64_t N, int64_t R,
                 int64_t G, int64_t group, int64_t nvalid, const int8_t *pf) {
    (void)NB, (void)pf;
    for (int64_t j = 0; j < nvalid; j++) {
        float accf = 0.f;
        for (int64_t g = 0; g < G; g++) {
            int32_t acc = 0;
            for (int64_t k = g * group; k < (g + 1) * group; k++)
                acc += weight_at(qb, j, k, NIB) * (int32_t)xq[(k >> 1) * 2 * R + (k & 1)];
            accf = fmaf((float)acc, block_scale(sb, mode, g, j, group) * xd[g], accf);
            if (mb) accf = fmaf(-block_scale(mb, mode, g, j, group), xs[g], accf);
        }
        y[j] = accf;
    }
}
#endif
// ---- decode products with x rounded to 8 bits (flags bit 3) ----
//
// With 16-bit x, a batched decode step (16 sequences) spends its time on multiply-adds: vpdpwssd does 32 an
// instruction. Rounded to 8 bits per group (step max|x| / 127, as llama.cpp's Q8 activations), x meets the weights
// in vpdpbusd, 64 multiply-adds of unsigned by signed bytes summed into 32 bits with no saturation: 4-bit values
// are unsigned already; int8 values are taken + 128 (their bytes xor 0x80) and each group's sum starts at
// -128 * (the group's integer sum of x) to cancel that. Every group's dot product is an exact integer, so the
// result is (x rounded) @ W^T to within float rounding, and a row's result does not depend on its batch. Builds
// without VNNI compute the same values in plain C (same integers, same float operations in the same order).
#define QMAX8 127.f

// One group of x (16 or 32 values) -> int8 values, the step (max|x| / 127) and the values' integer sum; a NaN or
// infinity makes the step NaN and the values 0. Bitwise the same on every instruction set.
static inline void quantize_group8(const float *v, int64_t group, int8_t *q, float *step, int32_t *isum) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512 a = _mm512_loadu_ps(v), b = group == 32 ? _mm512_loadu_ps(v + 16) : _mm512_setzero_ps();
    float float_sum;
    __m512 inv = _mm512_set1_ps(group_stats(a, b, group == 32, QMAX8, step, &float_sum));
    __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    if (isnan(*step)) ia = ib = _mm512_setzero_si512();  // NaN * 0 would convert to INT_MIN (b is 0 for group 16)
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(ia));
    if (group == 32) _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(ib));
    *isum = _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
#else
    float amax = 0.f;
    int finite = 1;
    for (int64_t k = 0; k < group; k++) {
        amax = fmaxf(amax, fabsf(v[k]));
        finite &= isfinite(v[k]) != 0;
    }
    *step = finite ? amax / QMAX8 : NAN;
    float inv = finite && amax > 0.f ? QMAX8 / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < group; k++) {
        q[k] = finite ? (int8_t)nearbyintf(v[k] * inv) : 0;
        sum += q[k];
    }
    *isum = sum;
#endif
}

// x (B, K) -> xq (B, K) int8, xd (B, G) the steps, xs (B, G) the sums of the rounded values (step * integer sum:
// the mins multiply it, as in qgemm.c) and xc (B, G) -128 times the integer sums (where the sums of int8 weights
// + 128 start).
static void quantize_rows8(const float *x, int64_t B, int64_t K, int64_t group, int8_t *xq, float *xd, float *xs,
                           int32_t *xc) {
    int64_t G = K / group;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < G; g++) {
            int64_t i = b * G + g;
            int32_t isum;
            quantize_group8(x + b * K + g * group, group, xq + b * K + g * group, xd + i, &isum);
            xs[i] = xd[i] * (float)isum;
            xc[i] = -128 * isum;
        }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define X8_VNNI 1
// acc += the sums of 4 products of w's bytes (unsigned) and the 4 bytes at x4 (signed), broadcast. asm for the
// reason dot_pairs is.
static inline __attribute__((always_inline)) void dot_quads(__m512i *acc, __m512i w, const int8_t *x4) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(*acc) : "v"(w), "m"(*(const int32_t *)x4));
}

// Quad s (columns 4s .. 4s + 3) of a group's 16 rows as unsigned bytes, row r's 4 columns in order in lane r.
// 4-bit: one quad's 32 bytes, each 16-bit word (row r: columns 0 | 2 and 1 | 3 as nibbles) widened to 32 bits,
// nibbles spread to bytes ((v | v << 12) & 0x0F0F0F0F). int8: two pairs' 64 bytes, words interleaved (row r's
// columns 0, 1 from the first pair, 2, 3 from the second), + 128.
static inline __attribute__((always_inline)) __m512i quad16(const int8_t *qg, int64_t s, const int NIB) {
    if (NIB) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(qg + s * 32)));
        return _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), _mm512_set1_epi8(15), 0xA8);  // (a | b) & c
    }
    const __m512i words = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512i v = _mm512_permutexvar_epi16(words, _mm512_loadu_si512((const void *)(qg + s * 64)));
    return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
}

// One block of 16 output rows for NB rows of 8-bit x (the arithmetic of tile, a quad of columns a step).
// GROUP is a constant (16 or 32) so that a group's quads unroll: with 8-bit x a group is only 8 multiply-adds a
// row, and a loop over them spent as long on its own bookkeeping.
static inline __attribute__((always_inline)) void tile_x8(
    const int NB, const int NIB, const int GROUP, const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode,
    const int8_t *xq, const float *xd, const float *xs, const int32_t *xc, float *y, int64_t N, int64_t R,
    int64_t G, int64_t nvalid, const int8_t *pf) {
    __m512 accf[X8_CHUNK];
    for (int b = 0; b < NB; b++) accf[b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i acc[X8_CHUNK];
        for (int b = 0; b < NB; b++) acc[b] = NIB ? _mm512_setzero_si512() : _mm512_set1_epi32(xc[b * G + g]);
        const int8_t *qg = qb + g * GROUP * (NIB ? 8 : 16);
        const int8_t *xg = xq + g * GROUP * R;  // the group's quads, R rows apart
#pragma GCC unroll 8
        for (int s = 0; s < GROUP / 4; s++) {
            __m512i w = quad16(qg, s, NIB);
            prefetch_next(pf, qg - qb, 2 * s, NIB);
            const int8_t *xquad = xg + 4 * s * R;  // quad s of the tile's rows
            for (int b = 0; b < NB; b++) dot_quads(&acc[b], w, xquad + 4 * b);
        }
        scale_group(NB, accf, acc, sb, mb, mode, g, GROUP, xd, xs, G);
    }
    store_tile_rows(NB, accf, y, N, nvalid);
}
#else
#define X8_VNNI 0
// The same values one row of x and one output at a time.
static void tile_x8_rows(const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode, int nib, const int8_t *xq,
                         const float *xd, const float *xs, float *y, int64_t G, int64_t group, int64_t nvalid) {
    for (int64_t j = 0; j < nvalid; j++) {
        float accf = 0.f;
        for (int64_t g = 0; g < G; g++) {
            int32_t acc = 0;
            for (int64_t k = g * group; k < (g + 1) * group; k++) acc += weight_at(qb, j, k, nib) * (int32_t)xq[k];
            accf = fmaf((float)acc, block_scale(sb, mode, g, j, group) * xd[g], accf);
            if (mb) accf = fmaf(-block_scale(mb, mode, g, j, group), xs[g], accf);
        }
        y[j] = accf;
    }
}
#endif

// One 16-row block of W (qb, its scales sb and mins mb) for all B rows of 8-bit x.
static void block_x8(const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode, int nib, const int8_t *xq,
                     const float *xd, const float *xs, const int32_t *xc, float *y, int64_t B, int64_t N, int64_t K,
                     int64_t group, int64_t nvalid, const int8_t *pf) {
    const int64_t G = K / group;
#if X8_VNNI
    // As block_x16: each chunk of X8_CHUNK rows in tiles of 16, 8, 4, 2 and 1 rows.
    for (int64_t b0 = 0; b0 < B; b0 += X8_CHUNK) {
        const int64_t rows = B - b0 < X8_CHUNK ? B - b0 : X8_CHUNK;
        for (int64_t t = 0; t < rows;) {
            const int64_t left = rows - t, r = b0 + t;
            const int8_t *x = xq + b0 * K + 4 * t, *p = r == 0 ? pf : NULL;
            const float *d = xd + r * G, *s = xs + r * G;
            const int32_t *c = xc + r * G;
            float *yt = y + r * N;
#define TILE8G(n, nb4, grp) tile_x8(n, nb4, grp, qb, sb, mb, mode, x, d, s, c, yt, N, rows, G, nvalid, p)
#define TILE8(n) if (left >= n) { \
                nib ? (group == 32 ? TILE8G(n, 1, 32) : TILE8G(n, 1, 16)) \
                    : (group == 32 ? TILE8G(n, 0, 32) : TILE8G(n, 0, 16)); \
                t += n; \
                continue; \
            }
            TILE8(16)
            TILE8(8)
            TILE8(4)
            TILE8(2)
            TILE8(1)
#undef TILE8
#undef TILE8G
        }
    }
#else
    (void)xc, (void)pf;
    for (int64_t b = 0; b < B; b++)
        tile_x8_rows(qb, sb, mb, mode, nib, xq + b * K, xd + b * G, xs + b * G, y + b * N, G, group, nvalid);
#endif
}

// One 16-row block of W (qb, its scales sb and mins mb) for all B rows of 16-bit x (from interleave_units):
// each chunk of X16_CHUNK rows in tiles of 16, 8, 4, 2 and 1 rows (a row's arithmetic is the same in any of them).
// Five tile sizes, not one per row count: GCC 12 crashed compiling sixteen of them into this function for
// -march=skylake-avx512.
static void block_x16(const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode, int nib, const int16_t *xq,
                      const float *xd, const float *xs, float *y, int64_t B, int64_t N, int64_t K, int64_t group,
                      int64_t nvalid, const int8_t *pf) {
    const int64_t G = K / group;
    for (int64_t b0 = 0; b0 < B; b0 += X16_CHUNK) {
        const int64_t rows = B - b0 < X16_CHUNK ? B - b0 : X16_CHUNK;
        for (int64_t t = 0; t < rows;) {
            const int64_t left = rows - t, r = b0 + t;
            const int16_t *xt = xq + b0 * K + 2 * t;  // the tile's first row in its chunk's interleaved pairs
            const float *xdt = xd + r * G, *xst = xs + r * G;
            float *yt = y + r * N;
            // Prefetch the next block during the first pass over this one (the later passes find it in cache).
            const int8_t *pft = r == 0 ? pf : NULL;
            // Constant row counts and formats, so each tile's accumulators stay in registers.
#define TILE(n) if (left >= n) { \
                (nib ? tile(n, 1, qb, sb, mb, mode, xt, xdt, xst, yt, N, rows, G, group, nvalid, pft) \
                     : tile(n, 0, qb, sb, mb, mode, xt, xdt, xst, yt, N, rows, G, group, nvalid, pft)); \
                t += n; \
                continue; \
            }
#if X16_CHUNK >= 16
            TILE(16)
#endif
#if X16_CHUNK >= 8
            TILE(8)
#endif
#if X16_CHUNK >= 4
            TILE(4)
            TILE(2)
#endif
            if (rows == 1) {  // a lone sequence's step: its stride a constant
                nib ? tile(1, 1, qb, sb, mb, mode, xt, xdt, xst, yt, N, 1, G, group, nvalid, pft)
                    : tile(1, 0, qb, sb, mb, mode, xt, xdt, xst, yt, N, 1, G, group, nvalid, pft);
                break;
            }
            TILE(1)
#undef TILE
        }
    }
}

// y (B, N) = x (B, K) @ dequant(q, scale, mins)^T with q, scale, mins packed (see the top of this file), x
// rounded to 16 bits per group, or to 8 (flags bit 3; see quantize_group8).
// Any B >= 1 (each block of W is read from memory once and reused from cache for every row of x); group 16
// or 32; K a multiple of group. Returns nonzero for shapes it does not handle.
int qgemv(const int8_t *q, const void *scale, const void *mins, const float *x, float *y, int64_t B, int64_t N,
          int64_t K, int64_t group, int flags, int threads) {
    const int mode = scale_mode(flags), nib = (flags >> 1) & 1, x8 = (flags >> 3) & 1;
    if (B < 1 || (group != 16 && group != 32) || K % group || (mode == SCALE_KS && K % KS_COLS)) return 1;
    int64_t G = K / group;
    const int64_t x_bytes = (x8 ? 1 : sizeof(int16_t)) * B * K, chunk = x8 ? X8_CHUNK : X16_CHUNK;
    void *plain = malloc(x_bytes), *xq = B > 1 && chunk > 1 ? malloc(x_bytes) : plain;  // one row: plain order
    float *xd = malloc(sizeof(float) * B * G), *xs = malloc(sizeof(float) * B * G);
    int32_t *xc = x8 ? malloc(sizeof(int32_t) * B * G) : NULL;
    if (!plain || !xq || !xd || !xs || (x8 && !xc)) {
        free(plain), free(xq != plain ? xq : NULL), free(xd), free(xs), free(xc);
        return 2;
    }
    if (x8) quantize_rows8(x, B, K, group, plain, xd, xs, xc);
    else quantize_rows(x, B, K, group, plain, xd, xs);
    if (xq != plain) interleave_units(plain, B, x8 ? K / 4 : K / 2, chunk, xq);
    int64_t n_blocks = (N + 15) / 16;
    // Dynamic chunks (~8 per thread): when another process or the server's event loop takes a core for a
    // moment, the other threads take over its blocks instead of waiting for it at the end of the loop.
    int64_t per = n_blocks / (8 * (int64_t)threads);
    if (per < 1) per = 1;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, per)
    for (int64_t nb = 0; nb < n_blocks; nb++) {
        int64_t n0 = nb * 16, nvalid = N - n0 < 16 ? N - n0 : 16;
        const int8_t *qb = q + (nib ? n0 * K / 2 : n0 * K);
        const uint8_t *sb = block_scales(scale, mode, nb, K, group);
        const uint8_t *mb = mins ? block_scales(mins, mode, nb, K, group) : NULL;
        const int8_t *pf = nb + 1 < n_blocks ? qb + (nib ? 8 : 16) * K : NULL;  // the next block
        if (x8) block_x8(qb, sb, mb, mode, nib, xq, xd, xs, xc, y + n0, B, N, K, group, nvalid, pf);
        else block_x16(qb, sb, mb, mode, nib, xq, xd, xs, y + n0, B, N, K, group, nvalid, pf);
    }
    free(plain), free(xq != plain ? xq : NULL), free(xd), free(xs), free(xc);
    return 0;
}

static inline void store_values(float v, int bf16, float *of, uint16_t *oh, int64_t k) {
    if (bf16) {
        uint32_t bits;
        memcpy(&bits, &v, 4);
        oh[k] = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);  // round to nearest even, as torch
    } else {
        of[k] = v;
    }
}

static void dequant_row(const int8_t *q, const void *scale, const void *mins, int mode, int nib, int64_t r,
                        int64_t K, int64_t group, int bf16, float *of, uint16_t *oh) {
    int64_t G = K / group;
    const int8_t *qb = q + (r >> 4) * (nib ? 8 : 16) * K;
    for (int64_t g = 0; g < G; g++) {
        float s = group_scale(scale, mode, r, g, K, group), m = mins ? group_scale(mins, mode, r, g, K, group) : 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; k++)
            store_values(s * (float)weight_at(qb, r & 15, k, nib) - m, bf16, of, oh, k);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 weights (int8) -> scale * w - min, stored as float32 or bfloat16 (same rounding as store_values).
static inline void store16(__m128i w8, float s, float m, int bf16, float *of, uint16_t *oh) {
    __m512 v = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w8))),
                             _mm512_set1_ps(m));
    if (bf16) {
        __m512i bits = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        bits = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        _mm256_storeu_si256((__m256i *)oh, _mm512_cvtepi32_epi16(bits));
    } else {
        _mm512_storeu_ps(of, v);
    }
}

// All rows of a 16-row block: each 32 columns of two rows are one gather of 16 (row j, row j + 1) pairs,
// sorted into the two rows' 32 bytes with a byte shuffle and a qword permute.
static void dequant_block(const int8_t *q, const void *scale, const void *mins, int mode, int nib, int64_t nb,
                          int64_t nvalid, int64_t K, int64_t group, int bf16, void *out) {
    const __m512i pair_offsets = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
    const __m512i split = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
    const __m512i rows_apart = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i quad_offsets = _mm256_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224);  // 32 bytes per quad
    const int8_t *qb = q + nb * (nib ? 8 : 16) * K;
    for (int64_t j = 0; j < nvalid; j += 2) {
        int64_t r = nb * 16 + j;
        for (int64_t c = 0; c < K; c += 32) {
            __m512i v;
            if (nib) {
                // Rows j and j + 1 are bytes 2j .. 2j + 3 of each quad's 32: one 4-byte gather per quad, each byte
                // split into its nibbles, and the nibbles put back in column order, row j then row j + 1.
                __m256i d = _mm256_i32gather_epi32((const int *)(qb + (c >> 2) * 32 + 2 * j), quad_offsets, 1);
                __m256i lo = _mm256_and_si256(d, _mm256_set1_epi8(15));
                __m256i hi = _mm256_and_si256(_mm256_srli_epi32(d, 4), _mm256_set1_epi8(15));
                __m256i row0 = _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(hi, 16));
                __m256i row1 = _mm256_or_si256(_mm256_srli_epi32(lo, 16), _mm256_andnot_si256(_mm256_set1_epi32(0xFFFF), hi));
                v = _mm512_inserti64x4(_mm512_castsi256_si512(row0), row1, 1);
            } else {
                v = _mm512_i32gather_epi32(pair_offsets, (const void *)(qb + (c >> 1) * 32 + j * 2), 4);
                v = _mm512_permutexvar_epi64(rows_apart, _mm512_shuffle_epi8(v, split));
            }
            for (int h = 0; h < 2 && j + h < nvalid; h++) {  // h: row j, then row j + 1
                __m256i w = h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);  // its 32 weights
                float *of = (float *)out + (r + h) * K + c;
                uint16_t *oh = (uint16_t *)out + (r + h) * K + c;
                for (int half = 0; half < 2; half++) {
                    int64_t g = (c + 16 * half) / group;
                    float sc = group_scale(scale, mode, r + h, g, K, group);
                    float m = mins ? group_scale(mins, mode, r + h, g, K, group) : 0.f;
                    __m128i w8 = half ? _mm256_extracti128_si256(w, 1) : _mm256_castsi256_si128(w);
                    store16(w8, sc, m, bf16, of + 16 * half, oh + 16 * half);
                }
            }
        }
    }
}
#endif

// Dequantize rows of packed W into out (n_rows, K): float32, or bfloat16 (round to nearest even) when bf16 is
// set. row_ids selects rows (an embedding lookup); NULL means rows 0 .. n_rows - 1 (prefill matmuls).
void dequant_rows(const int8_t *q, const void *scale, const void *mins, int flags, void *out, int64_t K,
                  int64_t group, const int64_t *row_ids, int64_t n_rows, int bf16, int threads) {
    const int mode = scale_mode(flags), nib = (flags >> 1) & 1;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (!row_ids && K % 32 == 0) {
        int64_t n_blocks = (n_rows + 15) / 16;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t nb = 0; nb < n_blocks; nb++) {
            int64_t nvalid = n_rows - nb * 16 < 16 ? n_rows - nb * 16 : 16;
            dequant_block(q, scale, mins, mode, nib, nb, nvalid, K, group, bf16, out);
        }
        return;
    }
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n_rows; i++)
        dequant_row(q, scale, mins, mode, nib, row_ids ? row_ids[i] : i, K, group, bf16, (float *)out + i * K,
                    (uint16_t *)out + i * K);
}

// RMSNorm over the last dimension of x (rows, dim), float32, out = x / sqrt(mean(x^2) + eps) * w (w may be
// NULL for a weightless norm). Faster than PyTorch's eager norm at every size measured here (decode: its
// dispatch overhead; prefill: 118 vs 213 us for 512 x 640).

void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps) {
    #pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * dim, w, out + r * dim, dim, eps);
}

// ---- GGML blocks -> int8 values + float scales (+ mins), the same layout as quant/ggml.py's split() ----

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

// One GGML block -> its int8 values v (bs of them), and its scales: for Q8_0 / Q4_0 / Q5_0 the fp16 bits of d
// (h16); for Q4_K the super-scales d, dmin and 8 sub-scales and sub-mins; for Q6_K d and 16 sub-scales.
static void decode_block(int qtype, const uint8_t *blk, int8_t *v, uint16_t *h16, float *d, float *dmin,
                         int8_t *sub, int8_t *sub_min, int values) {
    if (qtype == 8) {  // Q8_0: d, 32 x int8
        *h16 = rd16(blk);
        memcpy(v, blk + 2, 32);
    } else if (qtype == 2) {  // Q4_0: d, 16 bytes of nibbles
        *h16 = rd16(blk);
        for (int j = 0; j < 16; j++) {
            v[j] = (int8_t)((blk[2 + j] & 0x0F) - 8);
            v[j + 16] = (int8_t)((blk[2 + j] >> 4) - 8);
        }
    } else if (qtype == 6) {  // Q5_0: d, 32-bit high bits, 16 bytes of nibbles
        *h16 = rd16(blk);
        uint32_t qh = (uint32_t)blk[2] | ((uint32_t)blk[3] << 8) | ((uint32_t)blk[4] << 16) | ((uint32_t)blk[5] << 24);
        for (int j = 0; j < 16; j++) {
            v[j] = (int8_t)(((blk[6 + j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16);
            v[j + 16] = (int8_t)(((blk[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
        }
    } else if (qtype == 12) {  // Q4_K: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        const uint8_t *s6 = blk + 4, *qs = blk + 16;
        *d = half_to_float(rd16(blk)), *dmin = half_to_float(rd16(blk + 2));
        for (int i = 0; i < 8; i++) {
            if (i < 4) { sub[i] = (int8_t)(s6[i] & 63); sub_min[i] = (int8_t)(s6[i + 4] & 63); }
            else {
                sub[i] = (int8_t)((s6[i + 4] & 0x0F) | ((s6[i - 4] >> 6) << 4));
                sub_min[i] = (int8_t)((s6[i + 4] >> 4) | ((s6[i] >> 6) << 4));
            }
        }
        for (int c = 0; c < 4 * values; c++)
            for (int l = 0; l < 32; l++) {
                v[64 * c + l] = (int8_t)(qs[32 * c + l] & 0x0F);
                v[64 * c + 32 + l] = (int8_t)(qs[32 * c + l] >> 4);
            }
    } else {  // Q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d
        const uint8_t *ql = blk, *qh = blk + 128;
        memcpy(sub, blk + 192, 16);
        *d = half_to_float(rd16(blk + 208));
        for (int h = 0; h < 2 * values; h++) {
            const uint8_t *l8 = ql + 64 * h, *h8 = qh + 32 * h;
            int8_t *o = v + 128 * h;
            for (int l = 0; l < 32; l++) {
                o[l] = (int8_t)(((l8[l] & 0x0F) | ((h8[l] & 3) << 4)) - 32);
                o[l + 32] = (int8_t)(((l8[l + 32] & 0x0F) | (((h8[l] >> 2) & 3) << 4)) - 32);
                o[l + 64] = (int8_t)(((l8[l] >> 4) | (((h8[l] >> 4) & 3) << 4)) - 32);
                o[l + 96] = (int8_t)(((l8[l + 32] >> 4) | (((h8[l] >> 6) & 3) << 4)) - 32);
            }
        }
    }
}

// The 16 rows' values of `width` columns (v[row][column]) into the packed layout at column k0 of block nb.
static void store_tile(const int8_t v[16][KS_COLS], int64_t width, int nibbles, int8_t *q, int64_t nb, int64_t K,
                       int64_t k0) {
    if (nibbles) {  // quads of columns: byte 2j + e holds column 4i + e (low nibble) and 4i + 2 + e (high)
        for (int64_t i = 0; i < width / 4; i++) {
            int8_t *dst = q + (nb * (K >> 2) + (k0 >> 2) + i) * 32;
            for (int j = 0; j < 16; j++)
                for (int e = 0; e < 2; e++) dst[2 * j + e] = (int8_t)(v[j][4 * i + e] | (v[j][4 * i + 2 + e] << 4));
        }
        return;
    }
    for (int64_t p = 0; p < width / 2; p++) {
        int8_t *dst = q + (nb * (K >> 1) + (k0 >> 1) + p) * 32;
        for (int j = 0; j < 16; j++) dst[2 * j] = v[j][2 * p], dst[2 * j + 1] = v[j][2 * p + 1];
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The values of 16 rows x 256 columns of a Q4_K (4-bit packing) or Q6_K matrix, straight from the GGML blocks
// of column block c into the packed layout: each gather takes 4 bytes at the same place of the 16 rows' blocks
// (row j in lane j), and each result is one 32-byte row of the packed layout (16 rows x 2 bytes). Bitwise the
// same bytes as decode_block + store_tile, about 10x faster (the load-time conversion of a 26B-A4B's experts).
static void store_kquant_tile(int qtype, const uint8_t *raw, int64_t N, int64_t C, int64_t c, int64_t nb,
                              int64_t K, int8_t *q) {
    const int64_t ts = qtype == 12 ? 144 : 210, rows = N - nb * 16;
    const __mmask16 live = rows >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);  // padding rows: 0
    const __m512i stride = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32((int)(C * ts)));
    const uint8_t *blk = raw + (nb * 16 * C + c) * ts;  // row nb * 16's block c
    const __m512i lo4 = _mm512_set1_epi32(0x0F0F0F0F), low16 = _mm512_set1_epi32(0xFFFF);
#define GATHER(offset) _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, stride, (const void *)(blk + (offset)), 1)
#define STORE(ptr, lanes) _mm256_storeu_si256((__m256i *)(ptr), _mm512_cvtepi32_epi16(lanes))
    if (qtype == 12) {  // qs: 4 chunks of 32 bytes, low nibbles columns 64cc + l, high nibbles 64cc + 32 + l
        int8_t *out = q + (nb * (K >> 2) + (c * KS_COLS >> 2)) * 32;  // quad 0 of the tile
        for (int cc = 0; cc < 4; cc++)
            for (int i = 0; i < 8; i++) {  // columns 4i .. 4i + 3 of both halves of chunk cc
                __m512i dw = GATHER(16 + 32 * cc + 4 * i);
                __m512i x = _mm512_and_si512(dw, lo4), y = _mm512_andnot_si512(lo4, dw);
                __m512i low = _mm512_or_si512(x, _mm512_srli_epi32(x, 12));
                __m512i high = _mm512_or_si512(_mm512_srli_epi32(y, 4), _mm512_srli_epi32(y, 16));
                STORE(out + (16 * cc + i) * 32, _mm512_and_si512(low, low16));
                STORE(out + (16 * cc + 8 + i) * 32, _mm512_and_si512(high, low16));
            }
    } else {  // Q6_K: two halves of 128 columns; quarter s of a half: ql[(s & 1) * 32 + l] nibble s >> 1, qh shift 2s
        int8_t *out = q + (nb * (K >> 1) + (c * KS_COLS >> 1)) * 32;  // pair 0 of the tile
        for (int h = 0; h < 2; h++)
            for (int sq = 0; sq < 4; sq++)
                for (int l = 0; l < 32; l += 4) {
                    __m512i ql = GATHER(64 * h + (sq & 1) * 32 + l), qh = GATHER(128 + 32 * h + l);
                    __m512i lowbits = _mm512_and_si512(_mm512_srli_epi32(ql, 4 * (sq >> 1)), lo4);
                    __m512i highbits = _mm512_and_si512(_mm512_srli_epi32(qh, 2 * sq), _mm512_set1_epi32(0x03030303));
                    __m512i v = _mm512_sub_epi8(_mm512_or_si512(lowbits, _mm512_slli_epi32(highbits, 4)),
                                                _mm512_set1_epi8(32));
                    v = _mm512_maskz_mov_epi32(live, v);  // padding rows stay 0, not -32
                    int64_t col = 128 * h + 32 * sq + l;
                    STORE(out + (col >> 1) * 32, _mm512_and_si512(v, low16));
                    STORE(out + ((col >> 1) + 1) * 32, _mm512_srli_epi32(v, 16));
                }
    }
#undef GATHER
#undef STORE
}
#endif

// qtype: ggml type id (8 Q8_0, 2 Q4_0, 6 Q5_0, 12 Q4_K, 14 Q6_K). Writes the packed layout (see the top of this
// file) of an (N, K) matrix, padding rows (up to a multiple of 16) included as zeros: Q8_0 / Q4_0 / Q5_0 with
// their fp16 block scales, Q4_K (4-bit values) and Q6_K with two-level scales. Each task converts 16 rows x one
// block of columns, so every byte of the output is written once and in order. Nonzero for other types.
int split_blocks(int qtype, const uint8_t *raw, int64_t N, int64_t K, int8_t *q, void *scale, void *mins,
                 int nibbles, int threads) {
    if (nibbles && qtype != 12) return 1;  // 4-bit packing: unsigned 4-bit values (Q4_K) only
    if (qtype != 8 && qtype != 2 && qtype != 6 && qtype != 12 && qtype != 14) return 1;
    const int ks = qtype == 12 || qtype == 14;
    const int64_t bs = ks ? KS_COLS : 32, ts = qtype == 8 ? 34 : qtype == 2 ? 18 : qtype == 6 ? 22 : qtype == 12 ? 144 : 210;
    const int64_t group = qtype == 14 ? 16 : 32, per = bs / group, C = K / bs, n_blocks = (N + 15) / 16;
    if (K % bs) return 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n_blocks * C; t++) {
        const int64_t nb = t / C, c = t % C;
        int8_t v[16][KS_COLS], sub[16][16], sub_min[16][16];
        float d[16], dmin[16];
        uint16_t h16[16];
        int vector_values = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        vector_values = ks && (qtype == 14 || nibbles);
        if (vector_values) store_kquant_tile(qtype, raw, N, C, c, nb, K, q);
#endif
        for (int j = 0; j < 16; j++) {
            int64_t n = nb * 16 + j;
            if (n < N) {
                decode_block(qtype, raw + (n * C + c) * ts, v[j], &h16[j], &d[j], &dmin[j], sub[j], sub_min[j],
                             !vector_values);
            } else {  // padding row: zero values, zero scales
                memset(v[j], 0, sizeof v[j]), memset(sub[j], 0, 16), memset(sub_min[j], 0, 16);
                h16[j] = 0, d[j] = dmin[j] = 0.f;
            }
        }
        if (!vector_values) store_tile((const int8_t(*)[KS_COLS])v, bs, nibbles, q, nb, K, c * bs);
        if (!ks) {  // one fp16 scale per block: kept as its fp16 bits, [block][group][row]
            memcpy((uint16_t *)scale + (nb * C + c) * 16, h16, sizeof h16);
            continue;
        }
        uint8_t *chunks[2] = {(uint8_t *)scale + (nb * C + c) * ks_chunk(group),
                              mins ? (uint8_t *)mins + (nb * C + c) * ks_chunk(group) : NULL};
        for (int which = 0; which < 2 && chunks[which]; which++) {
            memcpy(chunks[which], which ? dmin : d, 64);
            for (int64_t g = 0; g < per; g++)
                for (int j = 0; j < 16; j++) chunks[which][64 + g * 16 + j] = (uint8_t)(which ? sub_min : sub)[j][g];
        }
    }
    return 0;
}
