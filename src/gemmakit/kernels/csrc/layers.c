// The decoder layers of one decode step (one token per row) in one call: the same kernels, in the same order
// and on the same inputs, as the PyTorch-side loop over the fused pieces (model.py with kernels/fused.py), so the
// results are bitwise the same; only the ~150 us of Python per layer around them is gone.
//
// Per layer: h = norm(x); q|k|v = h W_qkv; q/k norms, RoPE and the cache write (attn_prep); attention over the
// visible cache slots (attend_decode); o = attn W_o; x += post_norm(o); h = norm(x); x += post_norm(geglu(h
// W_gate_up) W_down). Layers without post norms (Gemma 1) skip them. What this does not cover (Gemma 4's
// per-layer inputs, shared KV, experts, layer scalars; float weights) stays on the Python loop.
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
int decode_layers(const Layer *layers, int64_t L, const StepSlots *slots, const StepRope *ropes, float *x,
                  int64_t B, int64_t E, const int64_t *qpos, const int64_t *rows, float eps, int64_t chunk,
                  int threads) {
    int64_t width = 0, ffn = 0, attn = 0, scratch_n = 0;
    for (int64_t l = 0; l < L; l++) {
        const Layer *ly = &layers[l];
        if (ly->qkv.N > width) width = ly->qkv.N;
        if (ly->gate_up.N > ffn) ffn = ly->gate_up.N;
        if (ly->H * ly->D > attn) attn = ly->H * ly->D;
        int64_t need = B * ly->H * attention_parts(slots[ly->slots_id].n_slots, chunk) * (ly->D + 2);
        if (need > scratch_n) scratch_n = need;
    }
    float *h = malloc(sizeof(float) * B * E), *tmp = malloc(sizeof(float) * B * E);
    float *proj = malloc(sizeof(float) * B * (width > ffn ? width : ffn));
    float *q = malloc(sizeof(float) * B * attn), *att = malloc(sizeof(float) * B * attn);
    float *act = malloc(sizeof(float) * B * (ffn / 2));
    float *scratch = malloc(sizeof(float) * scratch_n);
    int err = !h || !tmp || !proj || !q || !att || !act || !scratch;
    for (int64_t l = 0; l < L && !err; l++) {
        const Layer *ly = &layers[l];
        const StepSlots *st = &slots[ly->slots_id];
        const StepRope *rp = &ropes[ly->rope_id];
        rms_norm(x, ly->in_norm, h, B, E, eps);
        if ((err = matmul(&ly->qkv, h, proj, B, threads))) break;
        attn_prep(proj, ly->qkv.N, B, ly->H, ly->Hkv, ly->D, 0, ly->q_norm_w, ly->q_norm_w != NULL, ly->k_norm_w,
                  ly->k_norm_w != NULL, 0, eps, rp->cos, rp->ssin, q, ly->kc, ly->vc, ly->S1, st->slot, rows,
                  threads);
        attend_decode(q, ly->kc, ly->vc, ly->slot_pos, qpos, rows, B, ly->H, ly->Hkv, ly->D, ly->S1, st->n_slots,
                      ly->window, ly->scale, ly->softcap, att, scratch, chunk, attention_parts(st->n_slots, chunk),
                      threads);
        if ((err = matmul(&ly->o, att, h, B, threads))) break;
        add_normed(x, h, ly->post_attn_norm, tmp, B, E, eps);
        rms_norm(x, ly->pre_ffn_norm, h, B, E, eps);
        if ((err = matmul(&ly->gate_up, h, proj, B, threads))) break;
        geglu(proj, act, B, ly->gate_up.N / 2, threads);
        if ((err = matmul(&ly->down, act, h, B, threads))) break;
        add_normed(x, h, ly->post_ffn_norm, tmp, B, E, eps);
    }
    free(h), free(tmp), free(proj), free(q), free(att), free(act), free(scratch);
    return err;
}
