// The packed weight layout shared by the kernel sources (internal: nothing here crosses the Python boundary).
// The layout itself is described at the top of qgemv.c.
#ifndef GEMMAKIT_QPACK_H
#define GEMMAKIT_QPACK_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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

static inline int64_t qidx(int64_t n, int64_t k, int64_t K) {
    return ((n >> 4) * (K >> 1) + (k >> 1)) * 32 + (n & 15) * 2 + (k & 1);
}

// Weight (row j of a 16-row block, column k) from the block's packed values.
static inline int32_t weight_at(const int8_t *qb, int64_t j, int64_t k, int nib) {
    if (nib) {
        uint8_t byte = (uint8_t)qb[(k >> 2) * 32 + j * 2 + (k & 1)];
        return (k & 2) ? byte >> 4 : byte & 15;
    }
    return qb[(k >> 1) * 32 + j * 2 + (k & 1)];
}

// Scales and mins are float32, or float16 where that is exact (formats whose block scales are fp16 in the GGUF:
// Q8_0, Q4_0, Q5_0, ...), which halves their memory and the bytes a decode step reads, or two-level (above).
enum { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_KS = 2 };
#define KS_COLS 256

static inline int scale_mode(int flags) { return (flags & 4) ? SCALE_KS : (flags & 1) ? SCALE_F16 : SCALE_F32; }

// Groups per 256 columns, as a shift (group 16 or 32; a division here would cost more than the group's dot
// products), and the bytes of one 16-row block's two-level scales for 256 columns: super-scales, then sub-scales.
static inline int ks_shift(int64_t group) { return group == 16 ? 4 : 3; }
static inline int64_t ks_chunk(int64_t group) { return 64 + (16 << ks_shift(group)); }

// The scales (or mins) of the 16-row block nb, whose G = K / group groups follow one another.
static inline const uint8_t *block_scales(const void *p, int mode, int64_t nb, int64_t K, int64_t group) {
    if (mode == SCALE_KS) return (const uint8_t *)p + nb * (K / KS_COLS) * ks_chunk(group);
    return (const uint8_t *)p + nb * (K / group) * 16 * (mode == SCALE_F16 ? 2 : 4);
}

// Row j's scale for group g, from its block's scales.
static inline float block_scale(const uint8_t *blk, int mode, int64_t g, int64_t j, int64_t group) {
    if (mode == SCALE_KS) {
        const int sh = ks_shift(group);
        const uint8_t *c = blk + (g >> sh) * ks_chunk(group);
        float super;
        memcpy(&super, c + 4 * j, 4);
        return super * (float)(int8_t)c[64 + (g & ((1 << sh) - 1)) * 16 + j];
    }
    return mode == SCALE_F16 ? half_to_float(((const uint16_t *)blk)[g * 16 + j]) : ((const float *)blk)[g * 16 + j];
}

// Row r's scale for group g, from the whole matrix's scales.
static inline float group_scale(const void *p, int mode, int64_t r, int64_t g, int64_t K, int64_t group) {
    return block_scale(block_scales(p, mode, r >> 4, K, group), mode, g, r & 15, group);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The statistics of one group of x held in a (values 0-15) and b (16-31, when two): its float sum, taken in one
// fixed order on every instruction set (lanes i and i + 16 first, then halves folded 16 -> 8 -> 4 -> 2 -> 1), its
// step max|x| / qmax, and the factor 1 / step that rounds it to integers. A NaN or infinity makes the step NaN
// and the factor 0 (the integers 0), so it reaches the output as in float arithmetic.
static inline float group_stats(__m512 a, __m512 b, int two, float qmax, float *step, float *sum) {
    const __m512 sign = _mm512_set1_ps(-0.f), big = _mm512_set1_ps(3.4028235e38f);
    __m512 amax = _mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b));
    // |v| <= FLT_MAX is false for NaN and infinity
    __mmask16 ok = _mm512_cmp_ps_mask(_mm512_andnot_ps(sign, a), big, _CMP_LE_OQ) &
                   _mm512_cmp_ps_mask(_mm512_andnot_ps(sign, b), big, _CMP_LE_OQ);
    __m512 s16 = two ? _mm512_add_ps(a, b) : a;
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s16), _mm512_extractf32x8_ps(s16, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    *sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
    float m = _mm512_reduce_max_ps(amax);
    int finite = ok == 0xFFFF;
    *step = finite ? m / qmax : NAN;
    return finite && m > 0.f ? qmax / m : 0.f;
}

// The 16 rows' scales of group g (bitwise block_scale's values).
static inline __m512 scale16(const uint8_t *blk, int mode, int64_t g, int64_t group) {
    if (mode == SCALE_KS) {
        const int sh = ks_shift(group);
        const uint8_t *c = blk + (g >> sh) * ks_chunk(group);
        const __m128i sub8 = _mm_loadu_si128((const __m128i *)(c + 64 + (g & ((1 << sh) - 1)) * 16));
        __m512 sub = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sub8));
        return _mm512_mul_ps(_mm512_loadu_ps((const float *)c), sub);
    }
    return mode == SCALE_F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)blk + g * 16)))
                             : _mm512_loadu_ps((const float *)blk + g * 16);
}
#endif

#endif
