// The next token of each row of logits: penalties, logit bias, a grammar's mask, temperature, top-k, top-p,
// min-p and the draw, without a full-vocabulary sort or softmax unless the knobs need one.
//
// Per row (rows run in parallel, each independent of the others):
//   1. Sparse edits in place (repetition penalty on seen tokens, presence / frequency penalties on generated
//      ones, logit bias, banned tokens to -inf); the original values are put back before returning, so the
//      caller's logits (and the log-probabilities it reports from them) are unchanged.
//   2. One pass: the max over the allowed tokens, its first index, and the NaN check. Greedy returns here.
//   3. With top-k: a bounded min-heap finds the k-th largest value and a second, gated pass collects the
//      candidates (ties with the k-th included) in id order; top-p, min-p and the draw then see only them.
//      Without top-k: one pass of exponentials gives the normalizer in blocks; top-p collects the tokens above
//      a probability threshold that provably holds the nucleus (1e-3, else (1 - p) / V) and finds the cut in
//      that set by a weighted quickselect (no sort); with no top-p, the draw walks the block sums, then one block.
//   4. The draw: one uniform number u from (seed, counter) (SplitMix64, counter-based: the same request gives
//      the same number whatever the batch), and the first token, in id order, whose cumulative weight passes u
//      times the total (inverse CDF).
// Probabilities follow the reference order (sampling.py): temperature, top-k, top-p on the distribution top-k
// left, then min-p (relative to the largest probability, which no filter removes).
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gemmakit_kernels.h"
#include "vecmath.h"

#define BLOCK 4096  // tokens per block of the normalizer (the draw recomputes one block)
#define EXP_FLOOR -87.f  // exp16 clamps below this; such weights (< 2e-38 of the max) count as 0

// -- the random number ---------------------------------------------------------------------------------------

uint64_t sample_uniform_bits(uint64_t seed, uint64_t counter) {
    uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;  // SplitMix64's state after counter + 1 steps
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t seed, uint64_t counter) {
    return (double)(sample_uniform_bits(seed, counter) >> 11) * 0x1.0p-53;  // [0, 1), 53 random bits
}

// -- sparse edits --------------------------------------------------------------------------------------------

typedef struct {
    int64_t id;
    float value;
} Saved;

static void save_and_set(float *x, int64_t V, int64_t id, float value, Saved *saved, int64_t *n) {
    if (id < 0 || id >= V) return;
    saved[*n].id = id;
    saved[*n].value = x[id];
    (*n)++;
    x[id] = value;
}

// Apply the row's edits to x in place, in the reference order; returns how many values were saved.
static int64_t apply_edits(float *x, int64_t V, const SampleRow *p, Saved *saved) {
    int64_t n = 0;
    if (p->repetition_penalty != 1.f)
        for (int64_t i = 0; i < p->n_seen; i++) {
            int64_t id = p->seen_ids[i];
            if (id < 0 || id >= V) continue;
            float v = x[id], r = v > 0 ? v / p->repetition_penalty : v * p->repetition_penalty;
            save_and_set(x, V, id, r > FLT_MAX ? FLT_MAX : r, saved, &n);  // FLT_MAX: as the reference clamps
        }
    if (p->presence_penalty != 0.f || p->frequency_penalty != 0.f)
        for (int64_t i = 0; i < p->n_counts; i++) {
            int64_t id = p->count_ids[i];
            if (id < 0 || id >= V) continue;
            float c = p->counts[i];
            save_and_set(x, V, id, (x[id] - p->presence_penalty * (c > 0)) - p->frequency_penalty * c, saved, &n);
        }
    for (int64_t i = 0; i < p->n_bias; i++)
        if (p->bias_ids[i] >= 0 && p->bias_ids[i] < V)
            save_and_set(x, V, p->bias_ids[i], x[p->bias_ids[i]] + p->bias[i], saved, &n);
    for (int64_t i = 0; i < p->n_banned; i++) save_and_set(x, V, p->banned_ids[i], -INFINITY, saved, &n);
    return n;
}

static void restore_edits(float *x, const Saved *saved, int64_t n) {
    for (int64_t i = n - 1; i >= 0; i--) x[saved[i].id] = saved[i].value;  // reverse: a twice-edited id ends original
}

// -- passes over the vocabulary ------------------------------------------------------------------------------

static inline int allowed_at(const int32_t *bits, int64_t i) {
    return !bits || (((uint32_t)bits[i >> 5] >> (i & 31)) & 1u);
}

static inline uint32_t mask16_at(const int32_t *bits, int64_t i) {  // i a multiple of 16
    return bits ? (((uint32_t)bits[i >> 5]) >> (i & 31)) & 0xFFFFu : 0xFFFFu;
}

// Max of the allowed entries and its first index; returns 1 when an allowed entry is NaN.
static int max_pass(const float *x, int64_t V, const int32_t *bits, float *max_out, int64_t *arg_out) {
    float m = -INFINITY;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 mv = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (; i + 16 <= V; i += 16) {
        __mmask16 ok = (__mmask16)mask16_at(bits, i);
        __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_mask_cmp_ps_mask(ok, v, v, _CMP_UNORD_Q);
        mv = _mm512_mask_max_ps(mv, ok, mv, v);
    }
    if (nan) return 1;
    m = _mm512_reduce_max_ps(mv);
#endif
    for (; i < V; i++) {
        if (!allowed_at(bits, i)) continue;
        if (x[i] != x[i]) return 1;
        if (x[i] > m) m = x[i];
    }
    *arg_out = -1;
    *max_out = m;
    i = 0;
#if defined(__AVX512F__)
    for (const __m512 mv = _mm512_set1_ps(m); i + 16 <= V; i += 16) {
        __mmask16 hit = _mm512_mask_cmp_ps_mask((__mmask16)mask16_at(bits, i), _mm512_loadu_ps(x + i), mv, _CMP_EQ_OQ);
        if (hit) {
            *arg_out = i + __builtin_ctz(hit);
            return 0;
        }
    }
#endif
    for (; i < V; i++)
        if (x[i] == m && allowed_at(bits, i)) {
            *arg_out = i;
            break;
        }
    return 0;
}

// Weights exp((x - m) * inv_t) of the allowed entries [start, start + n), 0 below w_min; stored in w when
// given; returns their sum. The same arithmetic serves the normalizer and the draw's block.
static double block_weights(const float *x, const int32_t *bits, int64_t start, int64_t n, float m, float inv_t,
                            float w_min, float *w) {
    double total = 0;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m), tv = _mm512_set1_ps(inv_t), floor_v = _mm512_set1_ps(EXP_FLOOR);
    const __m512 wmin_v = _mm512_set1_ps(w_min);
    for (; i + 16 <= n && (start + i) % 16 == 0; i += 16) {
        int64_t at = start + i;
        __mmask16 ok = (__mmask16)mask16_at(bits, at);
        __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + at), mv), tv);
        ok &= _mm512_cmp_ps_mask(z, floor_v, _CMP_GT_OQ);
        __m512 e = _mm512_maskz_mov_ps(ok, exp16(z));
        e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, wmin_v, _CMP_GE_OQ), e);
        if (w) _mm512_storeu_ps(w + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    total = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) {
        int64_t at = start + i;
        float z = (x[at] - m) * inv_t, e = 0.f;
        if (allowed_at(bits, at) && z > EXP_FLOOR) e = expf(z);
        if (e < w_min) e = 0.f;
        if (w) w[i] = e;
        total += e;
    }
    return total;
}

// -- candidates ----------------------------------------------------------------------------------------------

typedef struct {
    int64_t *ids;
    float *w;  // weight relative to the max (exp of the tempered logit difference)
    int64_t n, cap;
} Candidates;

static int push_candidate(Candidates *c, int64_t id) {
    if (c->n == c->cap) {
        int64_t cap = c->cap ? c->cap * 2 : 256;
        int64_t *ids = realloc(c->ids, sizeof(int64_t) * cap);
        if (!ids) return 1;
        c->ids = ids;
        c->cap = cap;
    }
    c->ids[c->n++] = id;
    return 0;
}

// The allowed ids with x >= lo (x > lo when strict), in id order.
static int collect_at_least(const float *x, int64_t V, const int32_t *bits, float lo, int strict, Candidates *c) {
    c->n = 0;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 lo_v = _mm512_set1_ps(lo);
    for (; i + 16 <= V; i += 16) {
        __mmask16 ok = (__mmask16)mask16_at(bits, i);
        __m512 v = _mm512_loadu_ps(x + i);
        ok &= strict ? _mm512_cmp_ps_mask(v, lo_v, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, lo_v, _CMP_GE_OQ);
        for (; ok; ok &= ok - 1)
            if (push_candidate(c, i + __builtin_ctz(ok))) return 1;
    }
#endif
    for (; i < V; i++)
        if (allowed_at(bits, i) && (strict ? x[i] > lo : x[i] >= lo) && push_candidate(c, i)) return 1;
    return 0;
}

static void heap_sift_down(float *h, int64_t n, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, s = i;
        if (l < n && h[l] < h[s]) s = l;
        if (r < n && h[r] < h[s]) s = r;
        if (s == i) return;
        float t = h[i];
        h[i] = h[s], h[s] = t;
        i = s;
    }
}

static void heap_push_up(float *h, int64_t i) {
    while (i > 0 && h[(i - 1) / 2] > h[i]) {
        float t = h[i];
        h[i] = h[(i - 1) / 2], h[(i - 1) / 2] = t;
        i = (i - 1) / 2;
    }
}

// The k-th largest of the allowed finite entries (-inf when fewer than k are finite); 1 when out of memory.
static int kth_largest(const float *x, int64_t V, const int32_t *bits, int64_t k, float *kth) {
    float *h = malloc(sizeof(float) * k);
    if (!h) return 1;
    int64_t n = 0, i = 0;
    for (; i < V; i++) {
#if defined(__AVX512F__)
        // Once the heap is full, skip 16 entries at a time while none beats its minimum (nearly all of them).
        if (n == k && i % 16 == 0)
            while (i + 16 <= V && !_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_set1_ps(h[0]), _CMP_GT_OQ))
                i += 16;
        if (i >= V) break;
#endif
        float v = x[i];
        if (n == k && !(v > h[0])) continue;  // below the current k-th (also -inf)
        if (!allowed_at(bits, i) || v == -INFINITY) continue;
        if (n < k) h[n] = v, heap_push_up(h, n++);
        else h[0] = v, heap_sift_down(h, n, 0);
    }
    *kth = n < k ? -INFINITY : h[0];
    free(h);
    return 0;
}

typedef struct {
    float w;
    int64_t j;  // index into the candidates (id order)
} Weighted;

// Top-p's cut without a sort: the smallest weight `cut` such that the candidates heavier than it, plus the first
// `ties` of those equal to it (in id order), are the fewest heaviest whose mass reaches `need` (a weighted
// quickselect: expected O(n)). Returns 1 when out of memory.
static int top_p_cut(const float *w, int64_t n, double need, float *cut, int64_t *ties) {
    Weighted *a = malloc(sizeof(Weighted) * (n ? n : 1));
    if (!a) return 1;
    int64_t lo = 0, hi = 0;
    for (int64_t j = 0; j < n; j++)
        if (w[j] > 0.f) a[hi].w = w[j], a[hi++].j = j;
    *cut = 0.f, *ties = n;  // nothing reaches `need` (rounding): keep every candidate with weight
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2].w;
        int64_t gt = lo, i = lo, lt = hi;  // [lo, gt) > pivot, [gt, i) == pivot, [lt, hi) < pivot
        while (i < lt) {
            Weighted t = a[i];
            if (t.w > pivot) a[i++] = a[gt], a[gt++] = t;
            else if (t.w < pivot) a[i] = a[--lt], a[lt] = t;
            else i++;
        }
        double sum_gt = 0, sum_eq = 0;
        for (int64_t k = lo; k < gt; k++) sum_gt += a[k].w;
        sum_eq = (double)pivot * (double)(lt - gt);
        if (sum_gt >= need && gt > lo) {
            hi = gt;  // the cut is among the heavier ones
        } else if (sum_gt + sum_eq >= need) {
            *cut = pivot;
            *ties = (int64_t)ceil((need - sum_gt) / pivot);
            if (*ties < 1) *ties = 1;
            break;
        } else {
            need -= sum_gt + sum_eq;
            lo = lt;
        }
    }
    free(a);
    return 0;
}

// Weights of the candidates, then top-p (against `norm`, the mass of the whole distribution top-p sees) and
// min-p zero the dropped ones. Returns 1 on allocation failure.
static int filter_candidates(const float *x, Candidates *c, float m, float inv_t, double norm, float top_p,
                             float min_p) {
    float *w = malloc(sizeof(float) * (c->n ? c->n : 1));
    if (!w) return 1;
    for (int64_t j = 0; j < c->n; j++) {
        float z = (x[c->ids[j]] - m) * inv_t;
        w[j] = z > EXP_FLOOR ? expf(z) : 0.f;
    }
    if (norm <= 0) {
        norm = 0;
        for (int64_t j = 0; j < c->n; j++) norm += w[j];
    }
    if (top_p < 1.f) {
        float cut;
        int64_t ties;
        if (top_p_cut(w, c->n, top_p * norm, &cut, &ties)) {
            free(w);
            return 1;
        }
        for (int64_t j = 0; j < c->n; j++)
            if (w[j] < cut || (w[j] == cut && ties-- <= 0)) w[j] = 0.f;
    }
    if (min_p > 0.f)
        for (int64_t j = 0; j < c->n; j++)
            if (w[j] < min_p) w[j] = 0.f;  // the max's weight is exactly 1
    free(c->w);
    c->w = w;
    return 0;
}

// Inverse CDF over the candidates' weights in id order.
static int64_t draw_candidate(const Candidates *c, double u) {
    double total = 0, run = 0;
    int64_t last = -1;
    for (int64_t j = 0; j < c->n; j++) total += c->w[j];
    double target = u * total;
    for (int64_t j = 0; j < c->n; j++) {
        if (c->w[j] <= 0.f) continue;
        last = c->ids[j];
        run += c->w[j];
        if (run > target) return last;
    }
    return last;  // rounding put the target past the end: the last token with weight
}

// Inverse CDF over the whole vocabulary through block sums (no top-k, no top-p).
static int64_t draw_full(const float *x, int64_t V, const int32_t *bits, float m, float inv_t, float w_min,
                         double u) {
    int64_t n_blocks = (V + BLOCK - 1) / BLOCK;
    double *sums = malloc(sizeof(double) * n_blocks);
    float *w = malloc(sizeof(float) * BLOCK);
    int64_t pick = -1;
    if (sums && w) {
        double total = 0;
        for (int64_t b = 0; b < n_blocks; b++) {
            int64_t n = b == n_blocks - 1 ? V - b * BLOCK : BLOCK;
            total += sums[b] = block_weights(x, bits, b * BLOCK, n, m, inv_t, w_min, NULL);
        }
        double target = u * total, run = 0;
        int64_t b = 0;
        while (b < n_blocks - 1 && (run + sums[b] <= target || sums[b] <= 0)) run += sums[b++];
        while (b > 0 && sums[b] <= 0) b--;  // the target fell past the last block with weight
        int64_t n = b == n_blocks - 1 ? V - b * BLOCK : BLOCK;
        block_weights(x, bits, b * BLOCK, n, m, inv_t, w_min, w);
        for (int64_t i = 0; i < n; i++) {
            if (w[i] <= 0.f) continue;
            pick = b * BLOCK + i;
            run += w[i];
            if (run > target) break;
        }
    }
    free(sums), free(w);
    return pick;
}

// -- one row -------------------------------------------------------------------------------------------------

// The nucleus candidates without top-k: every token above a probability threshold, the threshold low enough
// that the tokens above it hold at least top_p of the mass (then the nucleus, a prefix of them, is inside).
static int nucleus_candidates(const float *x, int64_t V, const int32_t *bits, float m, float inv_t, float top_p,
                              double *norm, Candidates *c) {
    double total = 0;
    for (int64_t b = 0; b * BLOCK < V; b++)
        total += block_weights(x, bits, b * BLOCK, b * BLOCK + BLOCK <= V ? BLOCK : V - b * BLOCK, m, inv_t, 0.f,
                               NULL);
    *norm = total;
    const double thresholds[3] = {1e-3, (1.0 - top_p) / (double)V, 0.0};
    for (int t = 0; t < 3; t++) {
        // weight >= thresholds[t] * total  <=>  x >= m + log(thresholds[t] * total) / inv_t
        double lw = thresholds[t] > 0 ? log(thresholds[t] * total) : -INFINITY;
        float lo = thresholds[t] > 0 ? (float)(m + lw / inv_t) : -INFINITY;
        if (collect_at_least(x, V, bits, lo, lo == -INFINITY, c)) return 1;
        double mass = 0;
        for (int64_t j = 0; j < c->n; j++) {
            float z = (x[c->ids[j]] - m) * inv_t;
            mass += z > EXP_FLOOR ? expf(z) : 0.f;
        }
        if (mass >= top_p * total || thresholds[t] == 0.0) return 0;
    }
    return 0;
}

// Returns the token, -1 for logits the row cannot sample from (NaN or +inf), -2 when no token is allowed,
// -3 when memory ran out.
static int64_t sample_row(float *x, int64_t V, const SampleRow *p) {
    float m;
    int64_t arg;
    if (max_pass(x, V, p->bitmask, &m, &arg)) return -1;
    if (arg < 0 || m == -INFINITY) return -2;
    if (p->temperature == 0.f || p->top_k == 1) return arg;
    if (m == INFINITY) return -1;
    float inv_t = 1.f / (p->temperature > 1e-30f ? p->temperature : 1e-30f);
    double u = uniform01(p->seed, p->counter);
    if ((p->top_k <= 0 || p->top_k >= V) && p->top_p >= 1.f)
        return draw_full(x, V, p->bitmask, m, inv_t, p->min_p, u);
    Candidates c = {0};
    double norm = 0;  // 0: the candidates are the whole distribution (top-k's)
    int64_t pick = -3;
    int err;
    if (p->top_k > 0 && p->top_k < V) {
        float kth;
        err = kth_largest(x, V, p->bitmask, p->top_k, &kth) ||
              collect_at_least(x, V, p->bitmask, kth, kth == -INFINITY, &c);
    } else {
        err = nucleus_candidates(x, V, p->bitmask, m, inv_t, p->top_p, &norm, &c);
    }
    if (!err && !filter_candidates(x, &c, m, inv_t, norm, p->top_p, p->min_p)) pick = draw_candidate(&c, u);
    free(c.ids), free(c.w);
    return pick;
}

int sample_rows(float *logits, int64_t rows, int64_t V, const SampleRow *params, int64_t *out, int threads) {
    int failed = 0;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (rows > 1) reduction(| : failed)
    for (int64_t r = 0; r < rows; r++) {
        const SampleRow *p = &params[r];
        float *x = logits + r * V;
        int64_t n_edits = p->n_seen + p->n_counts + p->n_bias + p->n_banned;
        Saved *saved = n_edits ? malloc(sizeof(Saved) * n_edits) : NULL;
        if (n_edits && !saved) {
            out[r] = -3;
            failed = 1;
            continue;
        }
        int64_t n = saved ? apply_edits(x, V, p, saved) : 0;
        out[r] = sample_row(x, V, p);
        restore_edits(x, saved, n);
        free(saved);
        failed |= out[r] < 0;
    }
    return failed;
}
