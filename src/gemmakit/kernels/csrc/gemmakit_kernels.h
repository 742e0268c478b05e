// The one declared boundary between gemmakit's Python side and its C kernels.
//
// Every function the library exports and every struct that crosses the boundary is declared here, and nowhere
// else: the C files include this header (so the compiler checks each definition against its declaration), and
// the Python side (kernels/abi.py) reads this file to build its ctypes signatures and structs, so the two cannot
// drift apart. Keep to the subset abi.py reads: one `typedef struct { ... } Name;` per struct, fields and
// parameters of the types listed there, and prototypes ending in `);`.
//
// GEMMAKIT_KERNELS_ABI changes whenever a signature or struct here changes; the library reports it through
// gemmakit_kernels_abi() and the loader refuses a library whose number differs from this header's.
#ifndef GEMMAKIT_KERNELS_H
#define GEMMAKIT_KERNELS_H

#include <stdint.h>

#define GEMMAKIT_KERNELS_ABI 9

// -- structs -------------------------------------------------------------------------------------------------

// A packed quantized matrix (see qgemv.c): N outputs from K inputs. flags: bit 0 float16 scales and mins,
// bit 1 4-bit values, bit 2 two-level scales (K-quants: a float per row and 256 columns times an int8 per group),
// bit 3 decode products round x to 8 bits instead of 16 (qgemv.c; prompt products ignore it).
typedef struct {
    const int8_t *q;
    const void *scale;
    const void *mins;
    int64_t N;
    int64_t K;
    int64_t group;
    int32_t flags;
} QMatrix;

// What a decoder layer keeps from step to step (built once per model and cache; see layers.c).
typedef struct {
    QMatrix qkv;
    QMatrix o;
    QMatrix gate_up;
    QMatrix down;
    const float *in_norm;
    const float *post_attn_norm;  // post norms may be NULL
    const float *pre_ffn_norm;
    const float *post_ffn_norm;
    const float *q_norm_w;  // NULL: no q norm
    const float *k_norm_w;  // NULL: no k norm
    float *kc;  // this layer's cache (rows, S1, Hkv, D)
    float *vc;
    const int64_t *slot_pos;  // (rows, S1) position held by each slot of its slot table
    int64_t H;
    int64_t Hkv;
    int64_t D;
    int64_t S1;
    int64_t window;  // 0: global attention
    float scale;
    float softcap;  // 0: none
    int32_t slots_id;  // which StepSlots of this step the layer uses
    int32_t rope_id;  // which StepRope
    // Gemma 4
    int32_t shared;  // KV sharing: kc, vc, slot_pos are the owner layer's; qkv holds q only; no cache write
    int32_t k_eq_v;  // the raw key projection is also the value (qkv holds q|k)
    int32_t v_norm;  // weightless RMSNorm on the values
    float layer_scalar;  // the residual stream is scaled by it at the end of the layer (1: none)
    QMatrix ple_gate;  // per-layer input: E -> P (q NULL: the model has none)
    QMatrix ple_proj;  // P -> E
    const float *ple_norm;
    int64_t ple_offset;  // where this layer's P values start in a token's per-layer input row
    QMatrix k_sep;  // q NULL: qkv holds q|k|v fused; else qkv holds q only and k (and v) come from these
    QMatrix v_sep;  // (projections of different formats, e.g. Q4_K q and k with a Q6_K v, cannot fuse)
} Layer;

// Per decode step, for each slot table: the slot of each token (B,) and how many slots attention scans.
typedef struct {
    const int64_t *slot;
    int64_t n_slots;
} StepSlots;

// Per decode step, for each RoPE table: cos and signed sin of each token (B, D).
typedef struct {
    const float *cos;
    const float *ssin;
} StepRope;

// One row's sampling knobs and state (sample.c). Sparse edits (penalties, bias, bans) touch only the listed
// ids; bitmask (NULL: all allowed) holds ceil(V / 32) words, bit i set = token i allowed (llguidance's layout).
typedef struct {
    float temperature;  // 0: greedy (the argmax after edits and mask)
    float top_p;  // 1: off
    float min_p;  // 0: off
    int64_t top_k;  // 0: off
    float repetition_penalty;  // 1: off; on seen_ids
    float presence_penalty;  // on count_ids
    float frequency_penalty;  // times counts, on count_ids
    const int64_t *seen_ids;  // distinct tokens of the prompt and the output
    int64_t n_seen;
    const int64_t *count_ids;  // distinct tokens of the output
    const float *counts;  // how often each was generated
    int64_t n_counts;
    const int64_t *bias_ids;  // OpenAI's logit_bias
    const float *bias;
    int64_t n_bias;
    const int64_t *banned_ids;  // never picked
    int64_t n_banned;
    const int32_t *bitmask;
    uint64_t seed;  // the draw's uniform number is a function of (seed, counter) only
    uint64_t counter;
} SampleRow;

// -- functions -----------------------------------------------------------------------------------------------

// The GEMMAKIT_KERNELS_ABI this library was built with.
int64_t gemmakit_kernels_abi(void);
// What this build does fast: bit 0 = decode products with 8-bit x (flags bit 3) run on VNNI's vpdpbusd (without
// it they are computed, with the same results, by plain C: for tests, not for speed).
int64_t gemmakit_kernels_features(void);
// Ends the calling thread's idle OpenMP workers (abi.c says why); 0 on success.
int release_thread_workers(void);

// qgemv.c: block-scaled int8 / int4 matmuls, dequantization, GGML block conversion, RMSNorm.
int qgemv(const int8_t *q, const void *scale, const void *mins, const float *x, float *y, int64_t B, int64_t N,
          int64_t K, int64_t group, int flags, int threads);
void dequant_rows(const int8_t *q, const void *scale, const void *mins, int flags, void *out, int64_t K,
                  int64_t group, const int64_t *row_ids, int64_t n_rows, int bf16, int threads);
int split_blocks(int qtype, const uint8_t *raw, int64_t N, int64_t K, int8_t *q, void *scale, void *mins,
                 int nibbles, int threads);
void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps);
void rms_norm_row(const float *x, const float *w, float *out, int64_t dim, float eps);

// qgemm.c: prompt-sized products of 4-bit weights with x rounded to 8 bits per group (nonzero: not handled).
int qgemm_int8(const QMatrix *w, const float *x, float *y, int64_t M, int threads);

// decode.c: the pieces of a decode step.
void attn_prep(const float *qkv, int64_t row_stride, int64_t B, int64_t H, int64_t Hkv, int64_t D, int k_eq_v,
               const float *q_w, int q_norm, const float *k_w, int k_norm, int v_norm, float eps,
               const float *cos_, const float *ssin, float *q_out, float *kc, float *vc, int64_t S1,
               const int64_t *slot, const int64_t *rows, int threads);
void attend_decode(const float *q, const float *kc, const float *vc, const int64_t *slot_pos, const int64_t *qpos,
                   const int64_t *rows, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S1, int64_t n_slots,
                   int64_t window, float scale, float softcap, float *out, float *scratch, int64_t chunk,
                   int64_t parts, int threads);
void geglu(const float *gu, float *out, int64_t rows, int64_t F, int threads);
void geglu_bf16(const uint16_t *gu, uint16_t *out, int64_t rows, int64_t F, int threads);
void gelu_mul(const float *g, const float *u, int64_t u_stride, float *out, int64_t rows, int64_t n, int threads);
int64_t argmax_f32(const float *x, int64_t n);
int experts_decode(const QMatrix *gate_up, const QMatrix *down, const float *x, int64_t B, int64_t E,
                   const int64_t *ids, const float *weights, int64_t k, float *out, int threads);
void mask_logits(float *x, const int32_t *bits, int64_t n);

// layers.c: every decoder layer of a decode step in one call.
int decode_layers(const Layer *layers, int64_t L, const StepSlots *slots, const StepRope *ropes, float *x,
                  int64_t B, int64_t E, const int64_t *qpos, const int64_t *rows, const float *ple,
                  int64_t ple_stride, float eps, int64_t chunk, int threads);

// sample.c: the next token of each row of logits (rows, V).
int sample_rows(float *logits, int64_t rows, int64_t V, const SampleRow *params, int64_t *out, int threads);
uint64_t sample_uniform_bits(uint64_t seed, uint64_t counter);

#endif
