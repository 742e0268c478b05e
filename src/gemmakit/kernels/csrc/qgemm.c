// Prompt-sized products of packed 4-bit weights with 8-bit activations: y (M, N) = x (M, K) @ dequant(W)^T.
//
// Decode (qgemv.c) rounds x to 16 bits and multiplies 16-bit pairs (vpmaddwd: 32 multiply-adds an instruction,
// plus an add). A prompt chunk has hundreds of rows of x, so the weights' unpacking is shared by many rows and the
// multiplies themselves are the cost: here x is rounded to 8 bits per group (scale max|x| / 127, as llama.cpp's
// Q8 activations) and the unsigned 4-bit weights meet it in vpmaddubsw (u8 x s8 pairs: 64 multiply-adds an
// instruction), whose 16-bit sums are added in 16 bits for a whole group of 32 columns before one vpmaddwd
// widens them: |sum| <= 8 steps * 2 * 15 * 127 = 30480 < 32767, so nothing saturates and every group's dot
// product is an exact integer. That is ~2.3 instructions per 64 multiply-adds where PyTorch's float32 GEMM
// (fed dequantized weights) takes 4 FMAs; on CPUs without VNNI this is where a prompt's time goes.
//
// Weights use qgemv.c's packed layout; only 4-bit values (flags bit 1) are taken here. A quad of columns
// (32 bytes: 16 rows x 4 columns, row r's byte 2r + e holding column e in its low nibble and 2 + e in its high
// one) is zero-extended to 16 bits and its nibbles spread to bytes ((v | v << 4) & 0x0F0F), which leaves row r's
// columns in the byte order 0, 2, 1, 3; x's bytes are stored in that order too, so one 32-bit broadcast of x
// lines up with every row. Each row of x is computed with the same operations in the same order whatever M is.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "gemmakit_kernels.h"
#include "qpack.h"

#define QMAX8 127.f
#define GROUP 32  // columns per scale of x and of the weights (the 4-bit formats': Q4_K, Q4_1)
#define ROWS_PER_TILE 12  // rows of x per tile: 12 accumulators of each kind stay in registers
#define PASS_BYTES (512 << 10)  // the rows of x a pass over the weights takes: hot in L2 as the weights stream by

#if defined(__AVX512F__) && defined(__AVX512BW__)
// One group of x -> int8 values in the quad order 0, 2, 1, 3 (see above), its step (max|x| / 127, from
// qgemv.c's group_stats) and the sum of the rounded values (step * their integer sum), which the mins multiply:
// with the sum of x itself, the mins would no longer cancel the rounding error of the values' large positive
// offset (Q4_K's weights are scale * q - min with q in 0..15), and the products' error would double.
// Non-finite values make the step and the sum NaN and the values 0. The values go to q a quad (4 bytes) at a
// time, quads `stride` bytes apart (see quantize_rows8).
static void quantize_group8(const float *v, int8_t *q, int64_t stride, float *step, float *sum) {
    const __m128i quad_order = _mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
    __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    float float_sum;
    __m512 inv = _mm512_set1_ps(group_stats(a, b, 1, QMAX8, step, &float_sum));
    // round to nearest even (the default mode); |v * inv| <= 127 fits int8
    __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    if (isnan(*step)) ia = ib = _mm512_setzero_si512();  // NaN * 0 would convert to INT_MIN
    int8_t bytes[32];
    _mm_storeu_si128((__m128i *)bytes, _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(ia), quad_order));
    _mm_storeu_si128((__m128i *)(bytes + 16), _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(ib), quad_order));
    for (int i = 0; i < GROUP / 4; i++) memcpy(q + i * stride, bytes + 4 * i, 4);
    *sum = *step * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
}

// x (M, K) -> xq, the rounded values interleaved by tiles of ROWS_PER_TILE rows: quad s (columns 4s .. 4s + 3)
// of row m at ((m / T) * K / 4 + s) * 4T + (m % T) * 4, so a tile's step reads its rows' quads from one place
// (T = ROWS_PER_TILE); xd (M, G) the steps and xs (M, G) the sums of the rounded values.
static void quantize_rows8(const float *x, int64_t M, int64_t K, int8_t *xq, float *xd, float *xs, int threads) {
    const int64_t G = K / GROUP, T = ROWS_PER_TILE;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        int8_t *row = xq + (m / T) * T * K + (m % T) * 4;
        for (int64_t g = 0; g < G; g++)
            quantize_group8(x + m * K + g * GROUP, row + g * (GROUP / 4) * 4 * T, 4 * T, xd + m * G + g,
                            xs + m * G + g);
    }
}

// Quad s of a block's packed nibbles as 64 bytes: row r's columns 0, 2, 1, 3 in bytes 4r .. 4r + 3.
static inline __m512i quad_bytes(const int8_t *qb, int64_t s) {
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(qb + s * 32)));
    // (v | v << 4) & 0x0F0F in one instruction (truth table of a | b, then & c)
    return _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(v, 4), _mm512_set1_epi16(0x0F0F), 0xA8);
}

#if defined(__GNUC__)
// acc += the 16-bit pair sums of w (unsigned bytes) times the 4 bytes of x at x4, broadcast. Written as asm
// because GCC 12 puts each sum of an unrolled tile in a fresh register and copies it back (a move per row and quad).
static inline __attribute__((always_inline)) void dot_quad(__m512i *acc, __m512i w, const int8_t *x4) {
    __m512i t;
    __asm__("vpbroadcastd %2, %1\n\tvpmaddubsw %1, %3, %1\n\tvpaddw %1, %0, %0"
            : "+v"(*acc), "=&v"(t) : "m"(*(const int32_t *)x4), "v"(w));
}
#else
static inline void dot_quad(__m512i *acc, __m512i w, const int8_t *x4) {
    int32_t v;
    memcpy(&v, x4, 4);
    *acc = _mm512_add_epi16(*acc, _mm512_maddubs_epi16(w, _mm512_set1_epi32(v)));
}
#endif

// One 16-row block of W for the NB rows of x of one interleaved tile (see quantize_rows8), all K columns.
static inline __attribute__((always_inline)) void tile(
    const int NB, const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode, const int8_t *xq,
    const float *xd, const float *xs, float *y, int64_t N, int64_t G, int64_t nvalid) {
    __m512 accf[ROWS_PER_TILE];
    for (int b = 0; b < NB; b++) accf[b] = _mm512_setzero_ps();
    const __m512i ones = _mm512_set1_epi16(1);
    const int64_t quads = GROUP / 4;
    for (int64_t g = 0; g < G; g++) {
        __m512i acc[ROWS_PER_TILE];
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_si512();
        for (int64_t s = g * quads; s < (g + 1) * quads; s++) {
            __m512i w = quad_bytes(qb, s);
            for (int b = 0; b < NB; b++) dot_quad(&acc[b], w, xq + s * 4 * ROWS_PER_TILE + 4 * b);
        }
        __m512 sc = scale16(sb, mode, g, GROUP);
        for (int b = 0; b < NB; b++) {
            __m512 dot = _mm512_cvtepi32_ps(_mm512_madd_epi16(acc[b], ones));
            accf[b] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sc, _mm512_set1_ps(xd[b * G + g])), accf[b]);
        }
        if (mb) {
            __m512 mn = scale16(mb, mode, g, GROUP);
            for (int b = 0; b < NB; b++) accf[b] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(xs[b * G + g]), accf[b]);
        }
    }
    __mmask16 m = nvalid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nvalid) - 1);
    for (int b = 0; b < NB; b++) _mm512_mask_storeu_ps(y + b * N, m, accf[b]);
}

static void block_rows(const int8_t *qb, const uint8_t *sb, const uint8_t *mb, int mode, const int8_t *xq,
                       const float *xd, const float *xs, float *y, int64_t rows, int64_t N, int64_t K,
                       int64_t nvalid) {
    const int64_t G = K / GROUP;
    for (int64_t b0 = 0; b0 < rows; b0 += ROWS_PER_TILE) {
        int64_t n = rows - b0 < ROWS_PER_TILE ? rows - b0 : ROWS_PER_TILE;
        const int8_t *x = xq + b0 * K;  // tile b0 / T (interleaved: see quantize_rows8)
        const float *d = xd + b0 * G, *s = xs + b0 * G;
        float *out = y + b0 * N;
#define TILE(nb) tile(nb, qb, sb, mb, mode, x, d, s, out, N, G, nvalid)
        switch (n) {
            case 12: TILE(12); break;
            case 11: TILE(11); break;
            case 10: TILE(10); break;
            case 9: TILE(9); break;
            case 8: TILE(8); break;
            case 7: TILE(7); break;
            case 6: TILE(6); break;
            case 5: TILE(5); break;
            case 4: TILE(4); break;
            case 3: TILE(3); break;
            case 2: TILE(2); break;
            default: TILE(1); break;
        }
#undef TILE
    }
}
#endif

int qgemm_int8(const QMatrix *w, const float *x, float *y, int64_t M, int threads) {
#if !defined(__AVX512F__) || !defined(__AVX512BW__)
    (void)w, (void)x, (void)y, (void)M, (void)threads;
    return 1;  // without AVX-512 the float32 GEMM on dequantized weights is as fast; the caller takes that path
#else
    const int64_t N = w->N, K = w->K;
    const int mode = scale_mode(w->flags);
    if (M < 1 || !(w->flags & 2) || w->group != GROUP || K % GROUP || (mode == SCALE_KS && K % KS_COLS)) return 1;
    const int64_t G = K / GROUP, n_blocks = (N + 15) / 16;
    int8_t *xq = malloc((size_t)((M + ROWS_PER_TILE - 1) / ROWS_PER_TILE * ROWS_PER_TILE * K));
    float *xd = malloc(sizeof(float) * M * G), *xs = malloc(sizeof(float) * M * G);
    if (!xq || !xd || !xs) {
        free(xq), free(xd), free(xs);
        return 2;
    }
    quantize_rows8(x, M, K, xq, xd, xs, threads);
    int64_t per_pass = PASS_BYTES / K / ROWS_PER_TILE * ROWS_PER_TILE;
    if (per_pass < ROWS_PER_TILE) per_pass = ROWS_PER_TILE;
    for (int64_t m0 = 0; m0 < M; m0 += per_pass) {
        const int64_t rows = M - m0 < per_pass ? M - m0 : per_pass;
        #pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
        for (int64_t nb = 0; nb < n_blocks; nb++) {
            const int64_t n0 = nb * 16, nvalid = N - n0 < 16 ? N - n0 : 16;
            const uint8_t *mb = w->mins ? block_scales(w->mins, mode, nb, K, GROUP) : NULL;
            block_rows(w->q + n0 * K / 2, block_scales(w->scale, mode, nb, K, GROUP), mb, mode, xq + m0 * K,
                       xd + m0 * G, xs + m0 * G, y + m0 * N + n0, rows, N, K, nvalid);
        }
    }
    free(xq), free(xd), free(xs);
    return 0;
#endif
}
