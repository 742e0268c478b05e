// Decode-step attention and MLP pieces (one new token per batch row), float32.
//
// At decode sizes PyTorch's eager ops cost far more in dispatch than in arithmetic (~150 small ops per layer);
// these replace the elementwise chains around the matmuls with one call each. The model keeps its PyTorch
// path for everything else (prefill, GPUs, no compiler) and the tests compare the two.
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#include "gemmakit_kernels.h"
#include "vecmath.h"

// out = x / sqrt(mean(x^2) + eps) * w over one row (w may be NULL: a weightless norm). Also used by qgemv.c.
void rms_norm_row(const float *x, const float *w, float *out, int64_t dim, float eps) {
    float ss = 0.f;
    #pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    if (w)
        for (int64_t i = 0; i < dim; i++) out[i] = x[i] * inv * w[i];
    else
        for (int64_t i = 0; i < dim; i++) out[i] = x[i] * inv;
}

// Rotate-half RoPE in place: x * cos + swap_halves(x) * signed_sin (signed_sin carries -sin on the first half).
static void rope_row(float *x, const float *cos_, const float *ssin, int64_t dim) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos_[i] + b * ssin[i];
        x[i + half] = b * cos_[i + half] + a * ssin[i + half];
    }
}

// From the projections of B tokens laid out q|k|v (row_stride floats per token; k and v absent on KV-shared
// layers, v absent when K = V): q -> q_norm -> RoPE into q_out (B, H, D); unless shared (kc == NULL):
// k -> k_norm -> RoPE and v (or the raw k when k_eq_v) -> weightless v_norm if asked, both written into slot
// slot[b] of cache row rows[b] of kc / vc (rows, S1, Hkv, D); rows NULL means token b -> cache row b. cos / ssin
// are (B, D). q_w / k_w may be NULL (unit weight). Tokens are independent, so they split across threads.
void attn_prep(const float *qkv, int64_t row_stride, int64_t B, int64_t H, int64_t Hkv, int64_t D, int k_eq_v,
               const float *q_w, int q_norm, const float *k_w, int k_norm, int v_norm, float eps,
               const float *cos_, const float *ssin, float *q_out, float *kc, float *vc, int64_t S1,
               const int64_t *slot, const int64_t *rows, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (B >= 32 && threads > 1)
    for (int64_t b = 0; b < B; b++) {
        const float *row = qkv + b * row_stride;
        const float *c = cos_ + b * D, *s = ssin + b * D;
        for (int64_t h = 0; h < H; h++) {
            float *qo = q_out + (b * H + h) * D;
            if (q_norm) rms_norm_row(row + h * D, q_w, qo, D, eps);
            else for (int64_t i = 0; i < D; i++) qo[i] = row[h * D + i];
            rope_row(qo, c, s, D);
        }
        if (!kc) continue;
        const float *k_raw = row + H * D, *v_raw = k_eq_v ? k_raw : row + (H + Hkv) * D;
        for (int64_t h = 0; h < Hkv; h++) {
            int64_t at = (rows ? rows[b] : b) * S1 + slot[b];
            float *ko = kc + (at * Hkv + h) * D;
            float *vo = vc + (at * Hkv + h) * D;
            if (k_norm) rms_norm_row(k_raw + h * D, k_w, ko, D, eps);
            else for (int64_t i = 0; i < D; i++) ko[i] = k_raw[h * D + i];
            rope_row(ko, c, s, D);
            if (v_norm) rms_norm_row(v_raw + h * D, 0, vo, D, eps);
            else for (int64_t i = 0; i < D; i++) vo[i] = v_raw[h * D + i];
        }
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
#ifdef __AVX2__
    if (n % 32 == 0) {  // four independent accumulators: the FMA latency, not the loads, bounds one chain
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t i = 0; i < n; i += 32) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
        }
        __m256 t = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
        __m128 lo = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
        return _mm_cvtss_f32(lo);
    }
#endif
    float d = 0.f;
    for (int64_t i = 0; i < n; i++) d += a[i] * b[i];
    return d;
}

// Attention of the G query heads sharing one KV head over slots [s0, s1), unnormalized: for each head g,
// m[g] = the largest score, l[g] = sum of exp(score - m[g]), acc[g] (D) = sum of exp(score - m[g]) v.
// Each key and value is read once for all G heads. p: scratch of G * (s1 - s0) floats.
static void attend_part(const float *qg, const float *kc, const float *vc, const int64_t *pos_row, int64_t qp,
                        int64_t b, int64_t kvh, int64_t Hkv, int64_t D, int64_t S1, int64_t G, int64_t s0, int64_t s1,
                        int64_t window, float scale, float softcap, float *p, float *m, float *l, float *acc) {
    int64_t n = s1 - s0;
    for (int64_t g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; }
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0.f;
    for (int64_t s = s0; s < s1; s++) {
        int64_t pos = pos_row[s];
        int vis = pos >= 0 && pos <= qp && !(window > 0 && pos <= qp - window);
        const float *kv = kc + ((b * S1 + s) * Hkv + kvh) * D;
        for (int64_t g = 0; g < G; g++) {
            float d = -INFINITY;
            if (vis) {
                d = dot(qg + g * D, kv, D) * scale;
                if (softcap > 0.f) d = tanhf(d / softcap) * softcap;
                if (d > m[g]) m[g] = d;
            }
            p[g * n + (s - s0)] = d;
        }
    }
    for (int64_t g = 0; g < G; g++) {
        if (m[g] == -INFINITY) continue;  // nothing visible in this range
        float *pg = p + g * n;
        for (int64_t i = 0; i < n; i++) {
            pg[i] = pg[i] == -INFINITY ? 0.f : expf(pg[i] - m[g]);
            l[g] += pg[i];
        }
    }
    for (int64_t s = s0; s < s1; s++) {
        const float *vv = vc + ((b * S1 + s) * Hkv + kvh) * D;
        for (int64_t g = 0; g < G; g++) {
            float w = p[g * n + (s - s0)];
            if (w == 0.f) continue;
            float *ag = acc + g * D;
            #pragma omp simd
            for (int64_t i = 0; i < D; i++) ag[i] += w * vv[i];
        }
    }
}

#if defined(__AVX512F__)
// attend_part for G (1, 2, 4 or 8, a constant after inlining) query heads and D a multiple of 64, in 512-bit
// vectors: each key is loaded once for the G dot products (two accumulators per head), the exponentials are
// vectorized, and the values are summed 64 (G = 8: 32) columns at a time with the G heads' accumulators held in
// registers across all slots, each value row read once per block of columns.
static inline __attribute__((always_inline)) void attend_part16(
    const int G, const float *qg, const float *kc, const float *vc, const int64_t *pos_row, int64_t qp, int64_t b,
    int64_t kvh, int64_t Hkv, int64_t D, int64_t S1, int64_t s0, int64_t s1, int64_t window, float scale,
    float softcap, float *p, float *m, float *l, float *acc) {
    int64_t n = s1 - s0;
    for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; }
    for (int64_t s = s0; s < s1; s++) {
        int64_t pos = pos_row[s];
        int vis = pos >= 0 && pos <= qp && !(window > 0 && pos <= qp - window);
        if (!vis) {
            for (int g = 0; g < G; g++) p[g * n + (s - s0)] = -INFINITY;
            continue;
        }
        const float *kv = kc + ((b * S1 + s) * Hkv + kvh) * D;
        __m512 a0[8], a1[8];
        for (int g = 0; g < G; g++) a0[g] = a1[g] = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 32) {
            __m512 k0 = _mm512_loadu_ps(kv + i), k1 = _mm512_loadu_ps(kv + i + 16);
            for (int g = 0; g < G; g++) {
                a0[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + g * D + i), k0, a0[g]);
                a1[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + g * D + i + 16), k1, a1[g]);
            }
        }
        for (int g = 0; g < G; g++) {
            float d = _mm512_reduce_add_ps(_mm512_add_ps(a0[g], a1[g])) * scale;
            if (softcap > 0.f) d = tanhf(d / softcap) * softcap;
            if (d > m[g]) m[g] = d;
            p[g * n + (s - s0)] = d;
        }
    }
    for (int g = 0; g < G; g++) {
        float *pg = p + g * n;
        if (m[g] == -INFINITY) {  // nothing visible in this range: zero weights
            for (int64_t i = 0; i < n; i++) pg[i] = 0.f;
            continue;
        }
        __m512 sum = _mm512_setzero_ps(), mg = _mm512_set1_ps(m[g]);
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 x = _mm512_loadu_ps(pg + i);
            __mmask16 seen = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m512 e = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(x, mg)));
            _mm512_storeu_ps(pg + i, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (i < n) {
            __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
            __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, pg + i);
            __mmask16 seen = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            __m512 e = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(x, mg)));
            _mm512_mask_storeu_ps(pg + i, tail, e);
            sum = _mm512_add_ps(sum, e);
        }
        l[g] = _mm512_reduce_add_ps(sum);
    }
    const int COLS = G > 4 ? 2 : 4;  // 16-column vectors per head and block: G * COLS <= 16 accumulators
    for (int64_t c = 0; c < D; c += 16 * COLS) {
        __m512 o[8][4];
        for (int g = 0; g < G; g++)
            for (int j = 0; j < COLS; j++) o[g][j] = _mm512_setzero_ps();
        for (int64_t s = s0; s < s1; s++) {
            // A slot nobody sees has weight 0 for every head; skip it (its values may be stale, even NaN).
            int any = 0;
            for (int g = 0; g < G; g++) any |= p[g * n + (s - s0)] != 0.f;
            if (!any) continue;
            const float *vv = vc + ((b * S1 + s) * Hkv + kvh) * D + c;
            __m512 v[4];
            for (int j = 0; j < COLS; j++) v[j] = _mm512_loadu_ps(vv + 16 * j);
            for (int g = 0; g < G; g++) {
                __m512 w = _mm512_set1_ps(p[g * n + (s - s0)]);
                for (int j = 0; j < COLS; j++) o[g][j] = _mm512_fmadd_ps(w, v[j], o[g][j]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int j = 0; j < COLS; j++) _mm512_storeu_ps(acc + g * D + c + 16 * j, o[g][j]);
    }
}
#endif

// attend_part, through the 512-bit version where it applies.
static void attend_range(const float *qg, const float *kc, const float *vc, const int64_t *pos_row, int64_t qp,
                         int64_t b, int64_t kvh, int64_t Hkv, int64_t D, int64_t S1, int64_t G, int64_t s0,
                         int64_t s1, int64_t window, float scale, float softcap, float *p, float *m, float *l,
                         float *acc) {
#if defined(__AVX512F__)
    if (D % 64 == 0) {
        switch (G) {
#define PART16(g) attend_part16(g, qg, kc, vc, pos_row, qp, b, kvh, Hkv, D, S1, s0, s1, window, scale, softcap, p, m, l, acc)
            case 1: PART16(1); return;
            case 2: PART16(2); return;
            case 4: PART16(4); return;
            case 8: PART16(8); return;
#undef PART16
        }
    }
#endif
    attend_part(qg, kc, vc, pos_row, qp, b, kvh, Hkv, D, S1, G, s0, s1, window, scale, softcap, p, m, l, acc);
}

// out (B, H, D) = softmax(scale * q . k, optionally soft-capped, over the visible slots) @ v, one query token
// per b. kc / vc: (rows, S1, Hkv, D); slot_pos (rows, S1): position held by each slot, -1 if none. Token b reads
// cache row rows[b] (rows NULL: row b), so the tokens of one step may be several consecutive prompt tokens of
// one sequence next to other sequences' decode tokens (their keys are all written before this call). A slot is
// visible to the query at qpos[b] iff 0 <= pos <= qpos and, with window > 0, pos > qpos - window. n_slots
// bounds the scan (the caller passes the filled prefix of a linear cache). Tokens with qpos < 0 get zeros.
// The slots are cut into `parts` ranges of `chunk` slots, done in parallel and merged (split-K, as in
// flash-decoding), which keeps both cores busy when there is a single KV head; fixed ranges keep each token's
// arithmetic independent of the other tokens. scratch: B * Hkv * parts * G * (D + 2) floats.
void attend_decode(const float *q, const float *kc, const float *vc, const int64_t *slot_pos, const int64_t *qpos,
                   const int64_t *rows, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S1, int64_t n_slots,
                   int64_t window, float scale, float softcap, float *out, float *scratch, int64_t chunk,
                   int64_t parts, int threads) {
    int64_t G = H / Hkv;
    float *partial = scratch;  // (B, Hkv, parts, G, D + 2)
    int64_t tasks = B * Hkv * parts;
    #pragma omp parallel num_threads(threads) if (tasks > 1 && threads > 1)
    {
        float scores[G * chunk];  // one task's scores, reused by this thread (a few KB)
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t part = t % parts, kvh = (t / parts) % Hkv, b = t / (parts * Hkv);
            int64_t s0 = part * chunk, s1 = s0 + chunk < n_slots ? s0 + chunk : n_slots;
            float *base = partial + t * G * (D + 2);
            if (qpos[b] < 0 || s0 >= s1) {
                for (int64_t g = 0; g < G; g++) { base[g] = -INFINITY; base[G + g] = 0.f; }
                continue;
            }
            int64_t row = rows ? rows[b] : b;
            attend_range(q + (b * H + kvh * G) * D, kc, vc, slot_pos + row * S1, qpos[b], row, kvh, Hkv, D, S1, G,
                        s0, s1, window, scale, softcap, scores, base, base + G, base + 2 * G);
        }
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (B >= 16 && threads > 1)
    for (int64_t b = 0; b < B; b++)
        for (int64_t kvh = 0; kvh < Hkv; kvh++)
            for (int64_t g = 0; g < G; g++) {
                float *o = out + (b * H + kvh * G + g) * D;
                float best = -INFINITY, total = 0.f;
                for (int64_t part = 0; part < parts; part++) {
                    float m = partial[((b * Hkv + kvh) * parts + part) * G * (D + 2) + g];
                    best = m > best ? m : best;
                }
                for (int64_t i = 0; i < D; i++) o[i] = 0.f;
                if (best == -INFINITY) continue;  // padding token or nothing visible
                for (int64_t part = 0; part < parts; part++) {
                    const float *base = partial + ((b * Hkv + kvh) * parts + part) * G * (D + 2);
                    if (base[g] == -INFINITY) continue;
                    float w = expf(base[g] - best);
                    total += w * base[G + g];
                    const float *acc = base + 2 * G + g * D;
                    for (int64_t i = 0; i < D; i++) o[i] += w * acc[i];
                }
                float inv = 1.0f / total;
                for (int64_t i = 0; i < D; i++) o[i] *= inv;
            }
}

static inline float gelu_tanh_mul(float g, float u) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;  // sqrt(2 / pi)
    // tanh(z) = sign(z) (1 - 2 / (exp(2|z|) + 1)); its ~1e-7 absolute error near 0 vanishes in 1 + tanh.
    float z = k0 * (g + k1 * g * g * g), t = 1.0f - 2.0f / (expf(2.0f * fabsf(z)) + 1.0f);
    return 0.5f * g * (1.0f + (z < 0.f ? -t : t)) * u;
}

#ifdef __AVX2__
// gelu_tanh(g) * u for 8 lanes, with tanh from exp as in gelu_tanh_mul.
static inline __m256 geglu8(__m256 gv, __m256 uv) {
    const __m256 k0 = _mm256_set1_ps(0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f), half = _mm256_set1_ps(0.5f);
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 z = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_mul_ps(k1, gv), _mm256_mul_ps(gv, gv), gv));
    __m256 az = _mm256_andnot_ps(sign, z);
    __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_add_ps(az, az)), one)));
    t = _mm256_or_ps(t, _mm256_and_ps(sign, z));  // tanh takes z's sign
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, gv), _mm256_add_ps(one, t)), uv);
}

static inline __m256 bf16x8_to_float(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

// float -> bfloat16, round to nearest even (as torch's .to(torch.bfloat16) for finite values).
static inline __m128i float8_to_bf16(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// GeGLU of a fused gate|up row block: gu (rows, 2F) -> out (rows, F) = gelu_tanh(gate) * up, with the same
// tanh-from-exp form in the vector and scalar paths. With bf16 set, gu and out are bfloat16 (bf16 prompt
// matmuls): values widen exactly to float and the result is rounded to bfloat16, exactly what converting to
// float, running the float32 version and converting back gives.
static void geglu_rows(const void *gu, void *out, int64_t rows, int64_t F, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * F >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = (const float *)gu + r * 2 * F, *u = g + F;
        const uint16_t *gh = (const uint16_t *)gu + r * 2 * F, *uh = gh + F;
        float *o = (float *)out + r * F;
        uint16_t *oh = (uint16_t *)out + r * F;
        int64_t i = 0;
#ifdef __AVX2__
        for (; i + 8 <= F; i += 8) {
            if (bf16)
                _mm_storeu_si128((__m128i *)(oh + i),
                                 float8_to_bf16(geglu8(bf16x8_to_float(gh + i), bf16x8_to_float(uh + i))));
            else
                _mm256_storeu_ps(o + i, geglu8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < F; i++) {
            if (bf16)
                oh[i] = float_to_bf16(gelu_tanh_mul(bf16_to_float(gh[i]), bf16_to_float(uh[i])));
            else
                o[i] = gelu_tanh_mul(g[i], u[i]);
        }
    }
}

void geglu(const float *gu, float *out, int64_t rows, int64_t F, int threads) {
    geglu_rows(gu, out, rows, F, 0, threads);
}

void geglu_bf16(const uint16_t *gu, uint16_t *out, int64_t rows, int64_t F, int threads) {
    geglu_rows(gu, out, rows, F, 1, threads);
}

// out (rows, n) = gelu_tanh(g) * u, with u's rows u_stride apart (Gemma 4's per-layer input gate): the same
// arithmetic as geglu, so the C layer loop and the PyTorch-side loop agree bit for bit.
void gelu_mul(const float *g, const float *u, int64_t u_stride, float *out, int64_t rows, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = g + r * n, *ur = u + r * u_stride;
        float *o = out + r * n;
        int64_t i = 0;
#ifdef __AVX2__
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, geglu8(_mm256_loadu_ps(gr + i), _mm256_loadu_ps(ur + i)));
#endif
        for (; i < n; i++) o[i] = gelu_tanh_mul(gr[i], ur[i]);
    }
}

// Index of the first largest value of x[0..n), or -1 when x holds a NaN (the caller then asks PyTorch, whose
// argmax ranks NaN highest). PyTorch's own CPU argmax reads 262144 logits in ~250 us; this takes ~30.
int64_t argmax_f32(const float *x, int64_t n) {
    if (n <= 0) return -1;
    float best = x[0];
    int nan = 0;
    int64_t i = 0;
#ifdef __AVX512F__
    if (n >= 16) {
        __m512 m = _mm512_loadu_ps(x);
        __mmask16 unordered = 0;
        for (i = 0; i + 16 <= n; i += 16) {
            __m512 v = _mm512_loadu_ps(x + i);
            unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, v);
        }
        nan = unordered != 0;
        best = _mm512_reduce_max_ps(m);
    }
#endif
    for (; i < n; i++) {
        nan |= x[i] != x[i];
        if (x[i] > best) best = x[i];
    }
    if (nan) return -1;
    for (i = 0; i < n; i++)
        if (x[i] == best) return i;
    return -1;
}

// Constrained decoding: x[i] = -inf wherever bit i of the token mask is clear (bit i of bits[i / 32], least
// significant first: llguidance's layout). A word of all ones, the common case in free text, costs one compare.
// ~30 us for 262144 logits where PyTorch's unpack + masked_fill takes ~1.4 ms.
void mask_logits(float *x, const int32_t *bits, int64_t n) {
    const float neg_inf = -__builtin_inff();
    for (int64_t w = 0; w * 32 < n; w++) {
        uint32_t word = (uint32_t)bits[w];
        if (word == 0xFFFFFFFFu) continue;
        int64_t base = w * 32, end = base + 32 < n ? base + 32 : n;
        for (int64_t i = base; i < end; i++)
            if (!((word >> (i - base)) & 1u)) x[i] = neg_inf;
    }
}

// Gemma 4's experts for the rows of a decode step: row b of out (B, E) is the sum, over its k experts in
// ascending id order, of weights[b, j] * down_e(geglu(gate_up_e(x_b))), each product computed for that row
// alone (qgemv with one row), so a row's result does not depend on the others in the step. The order of the
// sum is the PyTorch loop's (quant/linear.py QuantExperts: experts in ascending order, index_add per expert),
// with the same float operations. gate_up[e] is (2F, E), gate rows then up rows; down[e] is (E, F).
int experts_decode(const QMatrix *gate_up, const QMatrix *down, const float *x, int64_t B, int64_t E,
                   const int64_t *ids, const float *weights, int64_t k, float *out, int threads) {
    if (B < 1 || k < 1) {  // no rows, or no expert for any row: nothing to read, the sum is empty
        for (int64_t i = 0; i < B * E; i++) out[i] = 0.f;
        return 0;
    }
    int64_t F = gate_up[ids[0]].N / 2;
    float *h = malloc(sizeof(float) * 2 * F), *g = malloc(sizeof(float) * F), *y = malloc(sizeof(float) * E);
    int64_t *order = malloc(sizeof(int64_t) * k);
    int err = !h || !g || !y || !order ? 2 : 0;
    for (int64_t b = 0; b < B && !err; b++) {
        const int64_t *rid = ids + b * k;
        for (int64_t j = 0; j < k; j++) {  // insertion sort of the row's slots by expert id
            int64_t i = j;
            for (; i > 0 && rid[order[i - 1]] > rid[j]; i--) order[i] = order[i - 1];
            order[i] = j;
        }
        float *o = out + b * E;
        for (int64_t i = 0; i < E; i++) o[i] = 0.f;
        for (int64_t j = 0; j < k && !err; j++) {
            const QMatrix *gu = gate_up + rid[order[j]], *dn = down + rid[order[j]];
            err = qgemv(gu->q, gu->scale, gu->mins, x + b * E, h, 1, gu->N, gu->K, gu->group, gu->flags, threads);
            if (err) break;
            geglu_rows(h, g, 1, F, 0, threads);
            err = qgemv(dn->q, dn->scale, dn->mins, g, y, 1, dn->N, dn->K, dn->group, dn->flags, threads);
            const float w = weights[b * k + order[j]];
            for (int64_t i = 0; i < E && !err; i++) o[i] = o[i] + y[i] * w;
        }
    }
    free(h), free(g), free(y), free(order);
    return err;
}
