// The decoder layers of one decode step (one token per row) in one call: the same kernels, in the same order
// and on the same inputs, as the PyTorch-side loop over the fused pieces (model.py with kernels/fused.py), so the
// results are bitwise the same; only the ~150 us of Python per layer around them is gone.
//
// Per layer: h = norm(x); q|k|v = h W_qkv; q/k norms, RoPE and the cache write (attn_prep); attention over the
// visible cache slots (attend_decode); o = attn W_o; x += post_norm(o); h = norm(x); x += post_norm(geglu(h
// W_gate_up) W_down). Layers without post norms (Gemma 1) skip them. Gemma 4 adds: K = V and value norms
// (attn_prep), KV-shared layers (attention over the owner's cache, no write), the per-layer input (x +=
// norm(gelu(x W_gate) * ple_l W_proj)) and the layer scalar. What this does not cover (the mixture of experts;
// float weights) stays on the Python loop.
#include <stdlib.h>

#include "gemmakit_kernels.h"

// Split-K ranges attention cuts n_slots into (at least one).
static int64_t attention_parts(int64_t n_slots, int64_t chunk) {
    int64_t parts = (n_slots + chunk - 1) / chunk;
    return parts < 1 ? 1 : parts;
}

static int matmul(const QMatrix *w, const float *x, float *y, int64_t B, int threads) {
    return qgemv(w->q, w->scale, w->mins, x, y, B, w->N, w->K, w->group, w->flags, threads);
}

static void add_normed(float *x, const float *h, const float *norm_w, float *tmp, int64_t B, int64_t E, float eps) {
    const float *add = h;
    if (norm_w) {
        rms_norm(h, norm_w, tmp, B, E, eps);
        add = tmp;
    }
    for (int64_t i = 0; i < B * E; i++) x[i] = x[i] + add[i];
}

// x (B, E) in place through layers [0, L). qpos (B,): each token's position; rows (B,) its cache row, or NULL
// for token b -> row b. chunk: cache slots per split-K range of attention. Returns 0, or nonzero when a
// buffer could not be allocated or a matmul refused its shape (x is then partly updated).
// Gemma 4's per-layer input: x += norm((gelu(x W_gate) * ple_l) W_proj), g / gu (B, P) and h (B, E) buffers.
static int per_layer_input(const Layer *ly, float *x, const float *ple, int64_t ple_stride, float *g, float *gu,
                           float *h, float *tmp, int64_t B, int64_t E, float eps, int threads) {
    int err = matmul(&ly->ple_gate, x, g, B, threads);
    if (err) return err;
    gelu_mul(g, ple + ly->ple_offset, ple_stride, gu, B, ly->ple_gate.N, threads);
    if ((err = matmul(&ly->ple_proj, gu, h, B, threads))) return err;
    add_normed(x, h, ly->ple_norm, tmp, B, E, eps);
    return 0;
}

// q|k|v rows of h (B, E) into proj: one matmul when fused, else q, k and v apart (q into qbuf, k and v into
// kvbuf) and then laid side by side, as the Python side concatenates them. Returns the row width, or -1.
static int64_t project_qkv(const Layer *ly, const float *h, float *proj, float *qbuf, float *kvbuf, int64_t B,
                           int threads) {
    if (!ly->k_sep.q) return matmul(&ly->qkv, h, proj, B, threads) ? -1 : ly->qkv.N;
    int64_t nq = ly->qkv.N, nk = ly->k_sep.N, nv = ly->v_sep.q ? ly->v_sep.N : 0, width = nq + nk + nv;
    if (matmul(&ly->qkv, h, qbuf, B, threads) || matmul(&ly->k_sep, h, kvbuf, B, threads) ||
        (nv && matmul(&ly->v_sep, h, kvbuf + B * nk, B, threads)))
        return -1;
    for (int64_t b = 0; b < B; b++) {
        float *row = proj + b * width;
        for (int64_t i = 0; i < nq; i++) row[i] = qbuf[b * nq + i];
        for (int64_t i = 0; i < nk; i++) row[nq + i] = kvbuf[b * nk + i];
        for (int64_t i = 0; i < nv; i++) row[nq + nk + i] = kvbuf[B * nk + b * nv + i];
    }
    return width;
}

// The attention half of a layer: x += post_norm(attention(norm(x)) W_o).
static int attention_block(const Layer *ly, const StepSlots *st, const StepRope *rp, float *x, float *h, float *tmp,
                           float *proj, float *q, float *att, float *kvbuf, float *scratch, int64_t B, int64_t E,
                           const int64_t *qpos, const int64_t *rows, float eps, int64_t chunk, int threads) {
    rms_norm(x, ly->in_norm, h, B, E, eps);
    int64_t width = project_qkv(ly, h, proj, att, kvbuf, B, threads);
    if (width < 0) return 1;
    int err;
    attn_prep(proj, width, B, ly->H, ly->Hkv, ly->D, ly->k_eq_v, ly->q_norm_w, ly->q_norm_w != NULL,
              ly->k_norm_w, ly->k_norm_w != NULL, ly->v_norm, eps, rp->cos, rp->ssin, q,
              ly->shared ? NULL : ly->kc, ly->shared ? NULL : ly->vc, ly->S1, st->slot, rows, threads);
    attend_decode(q, ly->kc, ly->vc, ly->slot_pos, qpos, rows, B, ly->H, ly->Hkv, ly->D, ly->S1, st->n_slots,
                  ly->window, ly->scale, ly->softcap, att, scratch, chunk, attention_parts(st->n_slots, chunk),
                  threads);
    if ((err = matmul(&ly->o, att, h, B, threads))) return err;
    add_normed(x, h, ly->post_attn_norm, tmp, B, E, eps);
    return 0;
}

// x (B, E) in place through layers [0, L). qpos (B,): each token's position; rows (B,) its cache row, or NULL
// for token b -> row b. ple: Gemma 4's per-layer inputs, a row of ple_stride floats per token (NULL without).
// chunk: cache slots per split-K range of attention. Returns 0, or nonzero when a buffer could not be
// allocated or a matmul refused its shape (x is then partly updated).
int decode_layers(const Layer *layers, int64_t L, const StepSlots *slots, const StepRope *ropes, float *x,
                  int64_t B, int64_t E, const int64_t *qpos, const int64_t *rows, const float *ple,
                  int64_t ple_stride, float eps, int64_t chunk, int threads) {
    int64_t width = 0, ffn = 0, attn = 0, scratch_n = 0, P = 0, kv = 1;
    for (int64_t l = 0; l < L; l++) {
        const Layer *ly = &layers[l];
        int64_t nkv = ly->k_sep.q ? ly->k_sep.N + (ly->v_sep.q ? ly->v_sep.N : 0) : 0;
        if (ly->qkv.N + nkv > width) width = ly->qkv.N + nkv;
        if (nkv > kv) kv = nkv;
        if (ly->qkv.N > attn) attn = ly->qkv.N;
        if (ly->gate_up.N > ffn) ffn = ly->gate_up.N;
        if (ly->H * ly->D > attn) attn = ly->H * ly->D;
        if (ly->ple_gate.q && ly->ple_gate.N > P) P = ly->ple_gate.N;
        int64_t need = B * ly->H * attention_parts(slots[ly->slots_id].n_slots, chunk) * (ly->D + 2);
        if (need > scratch_n) scratch_n = need;
    }
    float *h = malloc(sizeof(float) * B * E), *tmp = malloc(sizeof(float) * B * E);
    float *proj = malloc(sizeof(float) * B * (width > ffn ? width : ffn));
    float *q = malloc(sizeof(float) * B * attn), *att = malloc(sizeof(float) * B * attn);
    float *act = malloc(sizeof(float) * B * (ffn / 2 > P ? ffn / 2 : P));
    float *scratch = malloc(sizeof(float) * scratch_n);
    float *g = malloc(sizeof(float) * B * (P ? P : 1)), *kvbuf = malloc(sizeof(float) * B * kv);
    int err = !h || !tmp || !proj || !q || !att || !act || !scratch || !g || !kvbuf;
    for (int64_t l = 0; l < L && !err; l++) {
        const Layer *ly = &layers[l];
        err = attention_block(ly, &slots[ly->slots_id], &ropes[ly->rope_id], x, h, tmp, proj, q, att, kvbuf, scratch,
                              B, E, qpos, rows, eps, chunk, threads);
        if (err) break;
        rms_norm(x, ly->pre_ffn_norm, h, B, E, eps);
        if ((err = matmul(&ly->gate_up, h, proj, B, threads))) break;
        geglu(proj, act, B, ly->gate_up.N / 2, threads);
        if ((err = matmul(&ly->down, act, h, B, threads))) break;
        add_normed(x, h, ly->post_ffn_norm, tmp, B, E, eps);
        if (ly->ple_gate.q && ple && (err = per_layer_input(ly, x, ple, ple_stride, g, act, h, tmp, B, E, eps, threads)))
            break;
        if (ly->layer_scalar != 1.f)
            for (int64_t i = 0; i < B * E; i++) x[i] = x[i] * ly->layer_scalar;
    }
    free(h), free(tmp), free(proj), free(q), free(att), free(act), free(scratch), free(g), free(kvbuf);
    return err;
}
