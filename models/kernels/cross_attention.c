/* The decoder's cross-attention for a few rows (a decoded token's), against an image's F16 K/V, as a ggml
 * custom op:
 *     out[:, i, h] = softmax_t(scale * q[:, i, h] . key[:, t, h]) . value_t[t, :, h]
 * for the n_q = (query heads per KV head) x rows queries i of each KV head h. ggml runs this as a product,
 * a transposed copy, a softmax and a second product, each a pass with its own threads' sync; here each
 * KV head's keys and values are read once, in one pass each, which is what a decoded token's time is
 * made of (8 KV heads x 6404 tokens x 128 x 2 x 2 bytes = 26 MB per layer with a 4-tile image). The scores
 * stay in F32 (ggml's ops round the queries and probabilities to F16).
 *
 * Layouts, ggml order: src[0] = q [hd, n_q, kv] F32, src[1] = key [hd, T, kv] F16, src[2] = value_t
 * [T, hd, kv] F16 (rows contiguous), dst = out [hd, n_q, kv] F32 contiguous. Threads take whole KV heads.
 * The scores of a head (n_q x T floats) are this thread's scratch. SIMD bodies need hd % 16 == 0.
 */

#include "lva.h"

/* ---------------------------------------------------------------------------------------- shared */

enum { CROSS_MAX_QUERIES = 32 };           /* n_q at most: a few rows of the query heads of one KV head */

struct lva_cross_params {
    float scale;
    int32_t isa;
};

struct cross {
    int64_t hd, n_q, tokens;
    float scale;
    const float *q;                           /* one head's queries, n_q rows of hd */
    const uint16_t *key, *value_t;            /* one head's keys (T rows of hd), values (hd rows of T) */
    size_t key_row, value_row;                /* elements from one row to the next */
    float *out, *p;                           /* n_q rows of hd; the scores, n_q rows of T */
};

void cross_attention_avx2(const struct cross *c);
void cross_attention_avx512(const struct cross *c);

#ifndef LVA_SIMD_WIDTH
/* ---------------------------------------------------------------------------------------- compiled once */

/* p[i] = exp(p[i] - max) over a row of scores, returning 1 / their sum. */
static float softmax_row_reference(float *p, int64_t n) {
    float max = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < n; t++) max = fmaxf(max, p[t]);
    for (int64_t t = 0; t < n; t++) sum += p[t] = expf(p[t] - max);
    return 1.0f / sum;
}

static void cross_attention_reference(const struct cross *c) {
    for (int64_t t = 0; t < c->tokens; t++) {
        const uint16_t *k = c->key + t * c->key_row;
        for (int64_t i = 0; i < c->n_q; i++) {
            float s = 0.0f;
            for (int64_t d = 0; d < c->hd; d++) s += c->q[i * c->hd + d] * lva_f32_of_f16(k[d]);
            c->p[i * c->tokens + t] = s * c->scale;
        }
    }
    for (int64_t i = 0; i < c->n_q; i++) {
        const float inverse = softmax_row_reference(c->p + i * c->tokens, c->tokens);
        for (int64_t d = 0; d < c->hd; d++) {
            const uint16_t *v = c->value_t + d * c->value_row;
            float s = 0.0f;
            for (int64_t t = 0; t < c->tokens; t++) s += c->p[i * c->tokens + t] * lva_f32_of_f16(v[t]);
            c->out[i * c->hd + d] = s * inverse;
        }
    }
}

void lva_cross_attention(struct ggml_tensor *dst, int ith, int nth, void *userdata);
void lva_cross_attention(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const struct lva_cross_params *params = userdata;
    const struct ggml_tensor *q = dst->src[0], *key = dst->src[1], *value_t = dst->src[2];
    const int64_t hd = q->ne[0], n_q = q->ne[1], heads = q->ne[2], tokens = key->ne[1];
    void (*attend)(const struct cross *) = LVA_FOR_ISA(params->isa, cross_attention, cross_attention_reference);
    float *scores = NULL;
    for (int64_t h = heads * ith / nth; h < heads * (ith + 1) / nth; h++) {
        if (!scores) scores = lva_scratch((size_t)(n_q * tokens) * sizeof(float));
        const struct cross c = {
            .hd = hd, .n_q = n_q, .tokens = tokens, .scale = params->scale,
            .q = (const float *)((const char *)q->data + h * q->nb[2]),
            .key = (const uint16_t *)((const char *)key->data + h * key->nb[2]),
            .value_t = (const uint16_t *)((const char *)value_t->data + h * value_t->nb[2]),
            .key_row = key->nb[1] / 2, .value_row = value_t->nb[1] / 2,
            .out = (float *)((char *)dst->data + h * dst->nb[2]), .p = scores,
        };
        attend(&c);
    }
    free(scores);
}

int lva_cross_attention_max_queries(void);
int lva_cross_attention_max_queries(void) { return CROSS_MAX_QUERIES; }

#else
/* ---------------------------------------------------------------------------------------- per instruction set */

/* p[i] = exp(p[i] - max) over a row of scores, returning 1 / their sum. */
static float softmax_row(float *p, int64_t n) {
    vf32 vmax = vf32_set1(-INFINITY);
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES) vmax = vf32_max(vmax, vf32_load(p + t));
    float max = vf32_hmax(vmax), sum = 0.0f;
    for (int64_t u = t; u < n; u++) max = fmaxf(max, p[u]);
    vf32 vsum = vf32_zero();
    for (t = 0; t + LANES <= n; t += LANES) {
        const vf32 e = vf32_exp(vf32_sub(vf32_load(p + t), vf32_set1(max)));
        vf32_store(p + t, e);
        vsum = vf32_add(vsum, e);
    }
    for (; t < n; t++) sum += p[t] = expf(p[t] - max);
    return 1.0f / (sum + vf32_hsum(vsum));
}

/* rows[j] = row i0 + j of an F32 matrix, the last row standing in past its end (computed, not stored). */
static inline void four_rows(const float *rows[4], const float *matrix, int64_t i0, int64_t count, int64_t stride) {
    for (int j = 0; j < 4; j++) rows[j] = matrix + min64(i0 + j, count - 1) * stride;
}

/* acc[j] = lane sums of x * rows[j] over the first `len` values (a multiple of LANES), x in F16. */
static inline void dot_four(const uint16_t *x, const float *const rows[4], int64_t len, vf32 acc[4]) {
    for (int j = 0; j < 4; j++) acc[j] = vf32_zero();
    for (int64_t d = 0; d < len; d += LANES) {
        const vf32 xs = vf32_load_f16(x + d);
        for (int j = 0; j < 4; j++) acc[j] = vf32_fma(xs, vf32_load(rows[j] + d), acc[j]);
    }
}

/* Queries go four at a time, their accumulators in registers. hd is a multiple of LANES; the tokens'
 * tail past the last whole vector is summed in scalars. */
void SIMD(cross_attention)(const struct cross *c) {
    const int64_t hd = c->hd, n = c->tokens, body = n / LANES * LANES;
    vf32 acc[4];
    for (int64_t i0 = 0; i0 < c->n_q; i0 += 4) {
        const float *q[4];
        four_rows(q, c->q, i0, c->n_q, hd);
        for (int64_t t = 0; t < n; t++) {
            dot_four(c->key + t * c->key_row, q, hd, acc);
            for (int j = 0; j < 4 && i0 + j < c->n_q; j++) c->p[(i0 + j) * n + t] = vf32_hsum(acc[j]) * c->scale;
        }
    }
    float inverse[CROSS_MAX_QUERIES];
    for (int64_t i = 0; i < c->n_q; i++) inverse[i] = softmax_row(c->p + i * n, n);
    for (int64_t i0 = 0; i0 < c->n_q; i0 += 4) {
        const float *p[4];
        four_rows(p, c->p, i0, c->n_q, n);
        for (int64_t d = 0; d < hd; d++) {
            const uint16_t *v = c->value_t + d * c->value_row;
            dot_four(v, p, body, acc);
            for (int j = 0; j < 4 && i0 + j < c->n_q; j++) {
                float sum = vf32_hsum(acc[j]);
                for (int64_t u = body; u < n; u++) sum += p[j][u] * lva_f32_of_f16(v[u]);
                c->out[(i0 + j) * hd + d] = sum * inverse[i0 + j];
            }
        }
    }
}

#endif /* LVA_SIMD_WIDTH */
