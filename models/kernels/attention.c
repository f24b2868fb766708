/* The vision encoder's fused softmax attention, as a ggml custom op.
 *
 * What it computes, for every head h (hd = d / heads values of a row) and query token t:
 *     out[t, h] = softmax_s(scale * q[t, h] . k[s, h]) . v[s, h]
 * over the keys s < n_kv for the queries t < real, and over the keys s < real for the queries t >= real.
 * That is the encoder's real-first token order (models/mllama/vision.py, `encoder_order`): real tokens see
 * every token, padding sees only the real ones, so attention needs no mask.
 *
 * Layouts, ggml order (ne[0] is contiguous): src[0] = q [d, n_q], src[1] = k [d, n_kv], src[2] = v [d, n_kv],
 * dst = out [d, n_q]; all F32 with contiguous rows (nb[0] = 4). The userdata is a `struct lva_attention_params`.
 *
 * Work split: every CPU graph thread calls the op with its ith of nth. The work is the list of
 * (head, block of queries) items in head order; each thread takes a contiguous run of them of equal cost
 * (queries x keys). A thread packs the K/V of each head it meets into its own scratch memory, allocated and
 * freed within the call, so nothing is shared between threads.
 *
 * Arithmetics (the SIMD ones are flash attention: an online softmax in F32 over blocks of KEY_BLOCK keys,
 * queries in blocks of QUERY_BLOCK, register-blocked products; after torch's aten/src/ATen/native/cpu/
 * FlashAttentionKernel.cpp (BSD-3-Clause) in structure, the code our own):
 *   F32     Q.K^T and P.V in F32 fused multiply-adds (tile.h): the CPU's FMA rate, no rounding of operands.
 *           Any instruction set; the reference instruction set computes it row by row, the tests' yardstick.
 *   INT16   Q and K rounded to 13-bit integers with one scale per row of a head, P to 12-bit ones per row of
 *           a key block and V to 13-bit ones per dimension of a key block; Q.K^T and P.V summed in int32
 *           (96 x 4095^2 and 256 x 2047 x 4095 are under 2^31) and scaled into F32. 16 multiply-adds an
 *           instruction per 8 lanes (vpmaddwd; VNNI's vpdpwssd on AVX-512): up to twice the FMA's rate.
 *   BF16    Q, K, V and the probabilities rounded to BF16, as torch's BF16 flash attention does, multiplied
 *           with _mm512_dpbf16_ps (AVX512_BF16 only).
 */

#include "lva.h"

/* ---------------------------------------------------------------------------------------- shared */

struct lva_attention_params {
    int32_t heads;
    int32_t real;                             /* queries before it see all keys; the rest see keys < real */
    float scale;
    int32_t arithmetic;                       /* enum lva_arithmetic */
    int32_t isa;                              /* enum lva_isa */
};

struct problem {
    int64_t hd, heads, n_q, n_kv, real;
    float scale;
    const char *q, *k, *v;
    char *out;
    size_t q_row, k_row, v_row, out_row;      /* bytes from one token to the next */
};

static inline const float *q_at(const struct problem *p, int64_t t, int64_t h) {
    return (const float *)(p->q + t * p->q_row) + h * p->hd;
}
static inline const float *k_at(const struct problem *p, int64_t s, int64_t h) {
    return (const float *)(p->k + s * p->k_row) + h * p->hd;
}
static inline const float *v_at(const struct problem *p, int64_t s, int64_t h) {
    return (const float *)(p->v + s * p->v_row) + h * p->hd;
}
static inline float *out_at(const struct problem *p, int64_t t, int64_t h) {
    return (float *)(p->out + t * p->out_row) + h * p->hd;
}

enum { QUERY_BLOCK = 96, KEY_BLOCK = 256, MAX_HEAD_DIM = 96 };   /* S for a block: 96 x 256 F32 = 96 KiB, in L2 */

/* One path: how many queries it takes at a time, its scratch size, packing a head's K/V, and attending. */
struct path {
    int64_t query_block;
    size_t (*scratch_bytes)(const struct problem *p);
    void (*pack_head)(const struct problem *p, int64_t head, void *scratch);
    void (*attend)(const struct problem *p, int64_t head, int64_t first, int64_t count, int64_t keys, void *scratch);
};

/* Each instruction set's path for an arithmetic, or NULL where it has none. */
const struct path *attention_path_avx2(int arithmetic);
const struct path *attention_path_avx512(int arithmetic);

/* The SIMD paths' scratch, carved out of one allocation. hdp = hd padded to 16 (zeros); `element` is the
 * bytes of a packed Q, K or V value (4 for F32, 2 for BF16 and int16). */
struct blocks {
    int64_t hdp, key_blocks;
    void *k, *v;                              /* a head's packed keys and values, every key block */
    void *q;                                  /* the query block, packed */
    float *s;                                 /* scores, then probabilities: [QUERY_BLOCK][KEY_BLOCK] */
    uint16_t *p;                              /* probabilities, BF16 or int16: [QUERY_BLOCK][KEY_BLOCK] */
    float *o, *max, *sum;                     /* [QUERY_BLOCK][hdp], [QUERY_BLOCK], [QUERY_BLOCK] */
    float *k_scale, *v_scale;                 /* (INT16) per key; per key block and dimension */
    float *q_scale, *p_scale;                 /* (INT16) per query row; per row of the key block */
};

static inline size_t blocks_bytes(const struct problem *p, size_t element) {
    const int64_t hdp = round_up(p->hd, 16), keys = round_up(p->n_kv, KEY_BLOCK);
    return 2 * (size_t)keys * hdp * element + (size_t)QUERY_BLOCK * hdp * element
         + (size_t)QUERY_BLOCK * KEY_BLOCK * (4 + 2) + (size_t)QUERY_BLOCK * (hdp + 2) * 4
         + ((size_t)keys + (size_t)(keys / KEY_BLOCK) * hdp + 2 * QUERY_BLOCK) * 4 + 12 * 64;
}

static inline struct blocks blocks_in(const struct problem *p, void *scratch, size_t element) {
    struct blocks b;
    char *at = scratch;
    b.hdp = round_up(p->hd, 16);
    b.key_blocks = round_up(p->n_kv, KEY_BLOCK) / KEY_BLOCK;
    const size_t packed = (size_t)b.key_blocks * KEY_BLOCK * b.hdp * element;
#define TAKE(field, bytes) (b.field = (void *)at, at += round_up((int64_t)(bytes), 64))
    TAKE(k, packed);
    TAKE(v, packed);
    TAKE(q, (size_t)QUERY_BLOCK * b.hdp * element);
    TAKE(s, (size_t)QUERY_BLOCK * KEY_BLOCK * 4);
    TAKE(p, (size_t)QUERY_BLOCK * KEY_BLOCK * 2);
    TAKE(o, (size_t)QUERY_BLOCK * b.hdp * 4);
    TAKE(max, QUERY_BLOCK * 4);
    TAKE(sum, QUERY_BLOCK * 4);
    TAKE(k_scale, (size_t)b.key_blocks * KEY_BLOCK * 4);
    TAKE(v_scale, (size_t)b.key_blocks * b.hdp * 4);
    TAKE(q_scale, QUERY_BLOCK * 4);
    TAKE(p_scale, QUERY_BLOCK * 4);
#undef TAKE
    return b;
}

static inline void start_rows(const struct blocks *b) {
    memset(b->o, 0, (size_t)QUERY_BLOCK * b->hdp * 4);
    for (int r = 0; r < QUERY_BLOCK; r++) {
        b->max[r] = -INFINITY;
        b->sum[r] = 0;
    }
}

/* After the last key block: out = O / sum for the block's real rows. */
static inline void write_rows(const struct problem *p, const struct blocks *b, int64_t h, int64_t first,
                              int64_t count) {
    for (int64_t r = 0; r < count; r++) {
        float *out = out_at(p, first + r, h);
        const float *o = b->o + r * b->hdp, inverse = 1.0f / b->sum[r];
        for (int64_t i = 0; i < p->hd; i++) out[i] = o[i] * inverse;
    }
}

#ifndef LVA_SIMD_WIDTH
/* ---------------------------------------------------------------------------------------- compiled once */

/* This thread's share of the items, in head order, so that it packs each head it meets once. */
static void run(const struct path *path, const struct problem *p, int ith, int nth) {
    const double per_head = (double)p->real * p->n_kv + (double)(p->n_q - p->real) * p->real;
    const double total = per_head * p->heads, lo = total * ith / nth, hi = total * (ith + 1) / nth;
    void *scratch = NULL;
    int64_t packed = -1;
    double done = 0;
    for (int64_t h = 0; h < p->heads; h++) {
        for (int region = 0; region < 2; region++) {
            const int64_t begin = region ? p->real : 0, end = region ? p->n_q : p->real;
            const int64_t keys = region ? p->real : p->n_kv;
            for (int64_t first = begin; first < end; first += path->query_block) {
                const int64_t count = min64(path->query_block, end - first);
                const double cost = (double)count * keys, middle = done + cost / 2;
                done += cost;
                if (middle < lo || middle >= hi) continue;
                if (!scratch) scratch = lva_scratch(path->scratch_bytes(p));
                if (packed != h) {
                    path->pack_head(p, h, scratch);
                    packed = h;
                }
                path->attend(p, h, first, count, keys, scratch);
            }
        }
    }
    free(scratch);
}

/* The reference: F32, one query row at a time, reading q, k, v in place. */
static size_t reference_scratch_bytes(const struct problem *p) { return (size_t)p->n_kv * sizeof(float); }

static void reference_pack_head(const struct problem *p, int64_t head, void *scratch) {
    (void)p, (void)head, (void)scratch;
}

static void reference_attend(const struct problem *p, int64_t h, int64_t first, int64_t count, int64_t keys,
                             void *scratch) {
    float *scores = scratch;
    for (int64_t t = first; t < first + count; t++) {
        const float *q = q_at(p, t, h);
        float max = -INFINITY, sum = 0;
        for (int64_t s = 0; s < keys; s++) {
            const float *k = k_at(p, s, h);
            float dot = 0;
            for (int64_t i = 0; i < p->hd; i++) dot += q[i] * k[i];
            scores[s] = dot * p->scale;
            if (scores[s] > max) max = scores[s];
        }
        for (int64_t s = 0; s < keys; s++) {
            scores[s] = expf(scores[s] - max);
            sum += scores[s];
        }
        float *out = out_at(p, t, h);
        for (int64_t i = 0; i < p->hd; i++) out[i] = 0;
        for (int64_t s = 0; s < keys; s++) {
            const float *v = v_at(p, s, h), weight = scores[s] / sum;
            for (int64_t i = 0; i < p->hd; i++) out[i] += weight * v[i];
        }
    }
}

static const struct path reference_path = {1, reference_scratch_bytes, reference_pack_head, reference_attend};

static const struct path *path_for(int arithmetic, int isa) {
    const struct path *(*paths)(int) = LVA_FOR_ISA(isa, attention_path, NULL);
    if (paths) return arithmetic == LVA_BF16 && isa != LVA_AVX512_BF16 ? NULL : paths(arithmetic); /* BF16 pairs */
    return isa == LVA_REFERENCE && arithmetic == LVA_F32 ? &reference_path : NULL;
}

/* Whether this build has a path for the arithmetic on the instruction set (the CPU's support aside). */
int lva_attention_has(int arithmetic, int isa);
int lva_attention_has(int arithmetic, int isa) { return path_for(arithmetic, isa) != NULL; }

/* The largest head dim the SIMD paths take (six 16-wide vectors of a value row). */
int lva_attention_max_head_dim(void);
int lva_attention_max_head_dim(void) { return MAX_HEAD_DIM; }

void lva_attention(struct ggml_tensor *dst, int ith, int nth, void *userdata);
void lva_attention(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const struct lva_attention_params *params = userdata;
    const struct ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2];
    const struct problem p = {
        .hd = q->ne[0] / params->heads, .heads = params->heads, .n_q = q->ne[1], .n_kv = k->ne[1],
        .real = params->real, .scale = params->scale,
        .q = q->data, .k = k->data, .v = v->data, .out = dst->data,
        .q_row = q->nb[1], .k_row = k->nb[1], .v_row = v->nb[1], .out_row = dst->nb[1],
    };
    const struct path *path = path_for(params->arithmetic, params->isa);
    run(path ? path : &reference_path, &p, ith, nth);   /* Python never asks for a path that is missing */
}

#else
/* ---------------------------------------------------------------------------------------- per instruction set */

#include "tile.h"

/* Online softmax of one row of scores over `valid` keys (the row is `span` long): S becomes
 * exp(scale S - max) in place, zero past `valid`; the row's max and sum and its output so far are updated. */
static void online_softmax_row(float *s, int64_t valid, int64_t span, float scale, float *row_max, float *row_sum, float *o,
                        int64_t hdp) {
    vf32 vmax = vf32_set1(-INFINITY);
    for (int64_t j = 0; j < valid; j += LANES) vmax = vf32_max(vmax, vf32_keep(vf32_load(s + j), valid - j, -INFINITY));
    const float old_max = *row_max, new_max = fmaxf(old_max, vf32_hmax(vmax) * scale);
    const vf32 shift = vf32_set1(-new_max), vscale = vf32_set1(scale);
    vf32 vsum = vf32_zero();
    for (int64_t j = 0; j < span; j += LANES) {
        const vf32 e = vf32_keep(vf32_exp(vf32_fma(vf32_load(s + j), vscale, shift)), valid - j, 0.0f);
        vsum = vf32_add(vsum, e);
        vf32_store(s + j, e);
    }
    const float alpha = expf(old_max - new_max);      /* 0 on the first block (old_max = -inf) */
    *row_sum = *row_sum * alpha + vf32_hsum(vsum);
    *row_max = new_max;
    if (alpha != 1.0f)
        for (int64_t i = 0; i < hdp; i++) o[i] *= alpha;
}

/* ---- F32: keys as [key block][hdp][KEY_BLOCK] (a dimension of every key of the block in a row), values as
 * [key][hdp]; both tiles of tile.h. */

static size_t f32_scratch_bytes(const struct problem *p) { return blocks_bytes(p, 4); }

static void f32_pack_head(const struct problem *p, int64_t h, void *scratch) {
    const struct blocks b = blocks_in(p, scratch, 4);
    float *k = b.k, *v = b.v;
    for (int64_t s = 0; s < b.key_blocks * KEY_BLOCK; s++) {
        const float *ks = s < p->n_kv ? k_at(p, s, h) : NULL, *vs = s < p->n_kv ? v_at(p, s, h) : NULL;
        float *key = k + (s / KEY_BLOCK) * KEY_BLOCK * b.hdp + s % KEY_BLOCK;
        for (int64_t i = 0; i < b.hdp; i++) {
            key[i * KEY_BLOCK] = ks && i < p->hd ? ks[i] : 0.0f;
            v[s * b.hdp + i] = vs && i < p->hd ? vs[i] : 0.0f;
        }
    }
}

static void f32_attend(const struct problem *p, int64_t h, int64_t first, int64_t count, int64_t keys, void *scratch) {
    const struct blocks b = blocks_in(p, scratch, 4);
    const int64_t hdp = b.hdp;
    float *q = b.q;
    for (int64_t r = 0; r < QUERY_BLOCK; r++)
        for (int64_t i = 0; i < hdp; i++) q[r * hdp + i] = r < count && i < p->hd ? q_at(p, first + r, h)[i] : 0.0f;
    start_rows(&b);
    for (int64_t block = 0; block * KEY_BLOCK < keys; block++) {
        const int64_t valid = min64(KEY_BLOCK, keys - block * KEY_BLOCK), span = round_up(valid, 2 * LANES);
        const float *k = (const float *)b.k + block * KEY_BLOCK * hdp, *v = (const float *)b.v + block * KEY_BLOCK * hdp;
        for (int64_t r = 0; r < QUERY_BLOCK; r += TILE_ROWS)
            for (int64_t j = 0; j < span; j += 2 * LANES)
                tile_f32(q + r * hdp, hdp, k + j, KEY_BLOCK, 0, hdp, b.s + r * KEY_BLOCK + j, KEY_BLOCK, 0, 2);
        for (int64_t r = 0; r < QUERY_BLOCK; r++)
            online_softmax_row(b.s + r * KEY_BLOCK, valid, span, p->scale, b.max + r, b.sum + r, b.o + r * hdp, hdp);
        for (int64_t r = 0; r < QUERY_BLOCK; r += TILE_ROWS)
            for (int64_t i = 0; i < hdp; i += 2 * LANES) {
                float *o = b.o + r * hdp + i;
                if (hdp - i >= 2 * LANES) tile_f32(b.s + r * KEY_BLOCK, KEY_BLOCK, v + i, hdp, 0, span, o, hdp, 1, 2);
                else tile_f32(b.s + r * KEY_BLOCK, KEY_BLOCK, v + i, hdp, 0, span, o, hdp, 1, 1);
            }
    }
    write_rows(p, &b, h, first, count);
}

static const struct path f32_path = {QUERY_BLOCK, f32_scratch_bytes, f32_pack_head, f32_attend};

/* ---- INT16: keys as [key block][hdp/2][KEY_BLOCK][2] (a pair of dimensions of each key in a 32-bit lane),
 * values as [key block][KEY_BLOCK/2][hdp][2] (a pair of keys of each dimension in a lane); with their
 * scales. The products are tiles of 4 rows by 2 vectors of int32 sums. */

enum { I16_QK_LARGEST = 4095, I16_P_LARGEST = 2047, I16_ROWS = 4 };

static size_t int16_scratch_bytes(const struct problem *p) { return blocks_bytes(p, 2); }

static void int16_pack_head(const struct problem *p, int64_t h, void *scratch) {
    const struct blocks b = blocks_in(p, scratch, 2);
    const int64_t hdp = b.hdp, keys = b.key_blocks * KEY_BLOCK;
    int16_t *k = b.k, *v = b.v;
    int32_t q[MAX_HEAD_DIM], column[KEY_BLOCK];
    float row[MAX_HEAD_DIM];
    for (int64_t s = 0; s < keys; s++) {
        const float *ks = s < p->n_kv ? k_at(p, s, h) : NULL;
        for (int64_t i = 0; i < hdp; i++) row[i] = ks && i < p->hd ? ks[i] : 0.0f;
        b.k_scale[s] = lva_round_to_int(row, q, (int)hdp, I16_QK_LARGEST);
        int16_t *key = k + (s / KEY_BLOCK) * KEY_BLOCK * hdp + (s % KEY_BLOCK) * 2;
        for (int64_t i = 0; i < hdp; i++) key[(i / 2) * KEY_BLOCK * 2 + (i & 1)] = (int16_t)q[i];
    }
    float values[KEY_BLOCK];
    for (int64_t block = 0; block < b.key_blocks; block++)
        for (int64_t i = 0; i < hdp; i++) {
            for (int64_t j = 0; j < KEY_BLOCK; j++) {
                const int64_t s = block * KEY_BLOCK + j;
                values[j] = s < p->n_kv && i < p->hd ? v_at(p, s, h)[i] : 0.0f;
            }
            b.v_scale[block * hdp + i] = lva_round_to_int(values, column, KEY_BLOCK, I16_QK_LARGEST);
            int16_t *value = v + block * KEY_BLOCK * hdp + i * 2;
            for (int64_t j = 0; j < KEY_BLOCK; j++) value[(j / 2) * hdp * 2 + (j & 1)] = (int16_t)column[j];
        }
}

/* S[4 rows][2 LANES keys] = Q . K^T: int32 sums over the dimension pairs, scaled into F32. */
LVA_INLINE void int16_scores(const int16_t *q, int64_t hdp, const int16_t *k, const float *q_scale,
                             const float *k_scale, float *s) {
    const int32_t *x = (const int32_t *)q;
    const int64_t pairs = hdp / 2;
    vi32 acc[I16_ROWS][2];
    for (int r = 0; r < I16_ROWS; r++) acc[r][0] = acc[r][1] = vi32_zero();
    for (int64_t i = 0; i < pairs; i++) {
        const vi32 k0 = vi32_load(k + i * KEY_BLOCK * 2), k1 = vi32_load(k + i * KEY_BLOCK * 2 + 2 * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < I16_ROWS; r++) {
            const vi32 xr = vi32_set1(x[r * pairs + i]);
            acc[r][0] = vi32_dot_i16(acc[r][0], xr, k0);
            acc[r][1] = vi32_dot_i16(acc[r][1], xr, k1);
        }
    }
    const vf32 ks[2] = {vf32_load(k_scale), vf32_load(k_scale + LANES)};
    for (int r = 0; r < I16_ROWS; r++) {
        const vf32 qs = vf32_set1(q_scale[r]);
        for (int c = 0; c < 2; c++)
            vf32_store(s + r * KEY_BLOCK + c * LANES, vf32_mul(vf32_of_i32(acc[r][c]), vf32_mul(ks[c], qs)));
    }
}

/* O[4 rows][vectors LANES dims] += P . V: int32 sums over the key pairs, scaled into F32. */
LVA_INLINE void int16_values(const int16_t *prob, const int16_t *v, int64_t hdp, int64_t span, const float *p_scale,
                             const float *v_scale, float *o, const int vectors) {
    const int32_t *x = (const int32_t *)prob;
    vi32 acc[I16_ROWS][2];
    for (int r = 0; r < I16_ROWS; r++) acc[r][0] = acc[r][1] = vi32_zero();
    for (int64_t j = 0; j < span / 2; j++) {
        vi32 column[2];
        for (int c = 0; c < vectors; c++) column[c] = vi32_load(v + j * hdp * 2 + c * 2 * LANES);
#pragma GCC unroll 4
        for (int r = 0; r < I16_ROWS; r++) {
            const vi32 xr = vi32_set1(x[r * (KEY_BLOCK / 2) + j]);
            for (int c = 0; c < vectors; c++) acc[r][c] = vi32_dot_i16(acc[r][c], xr, column[c]);
        }
    }
    for (int r = 0; r < I16_ROWS; r++) {
        const vf32 ps = vf32_set1(p_scale[r]);
        for (int c = 0; c < vectors; c++) {
            float *out = o + r * hdp + c * LANES;
            vf32_store(out, vf32_fma(vf32_of_i32(acc[r][c]), vf32_mul(vf32_load(v_scale + c * LANES), ps),
                                     vf32_load(out)));
        }
    }
}

/* A row of probabilities (>= 0, `span` of them) as int16 of at most I16_P_LARGEST; returns their scale. */
static float int16_round_probabilities(const float *prob, int64_t span, int16_t *q) {
    vf32 m = vf32_zero();
    for (int64_t j = 0; j < span; j += LANES) m = vf32_max(m, vf32_load(prob + j));
    const float largest = vf32_hmax(m);
    const vf32 to_int = vf32_set1(largest > 0.0f ? I16_P_LARGEST / largest : 0.0f);
    for (int64_t j = 0; j < span; j += LANES) vi32_store_i16(q + j, vf32_round(vf32_mul(vf32_load(prob + j), to_int)));
    return largest / I16_P_LARGEST;
}

static void int16_attend(const struct problem *p, int64_t h, int64_t first, int64_t count, int64_t keys,
                         void *scratch) {
    const struct blocks b = blocks_in(p, scratch, 2);
    const int64_t hdp = b.hdp;
    int16_t *q = b.q, *prob = (int16_t *)b.p;
    float row[MAX_HEAD_DIM];
    int32_t rounded[MAX_HEAD_DIM];
    for (int64_t r = 0; r < QUERY_BLOCK; r++) {
        for (int64_t i = 0; i < hdp; i++) row[i] = r < count && i < p->hd ? q_at(p, first + r, h)[i] : 0.0f;
        b.q_scale[r] = lva_round_to_int(row, rounded, (int)hdp, I16_QK_LARGEST);
        for (int64_t i = 0; i < hdp; i++) q[r * hdp + i] = (int16_t)rounded[i];
    }
    start_rows(&b);
    for (int64_t block = 0; block * KEY_BLOCK < keys; block++) {
        const int64_t valid = min64(KEY_BLOCK, keys - block * KEY_BLOCK), span = round_up(valid, 2 * LANES);
        const int16_t *k = (const int16_t *)b.k + block * KEY_BLOCK * hdp;
        const int16_t *v = (const int16_t *)b.v + block * KEY_BLOCK * hdp;
        for (int64_t r = 0; r < QUERY_BLOCK; r += I16_ROWS)
            for (int64_t j = 0; j < span; j += 2 * LANES)
                int16_scores(q + r * hdp, hdp, k + j * 2, b.q_scale + r, b.k_scale + block * KEY_BLOCK + j,
                             b.s + r * KEY_BLOCK + j);
        for (int64_t r = 0; r < QUERY_BLOCK; r++) {
            online_softmax_row(b.s + r * KEY_BLOCK, valid, span, p->scale, b.max + r, b.sum + r, b.o + r * hdp, hdp);
            b.p_scale[r] = int16_round_probabilities(b.s + r * KEY_BLOCK, span, prob + r * KEY_BLOCK);
        }
        for (int64_t r = 0; r < QUERY_BLOCK; r += I16_ROWS)
            for (int64_t i = 0; i < hdp; i += 2 * LANES) {
                const float *scale = b.v_scale + block * hdp + i;
                float *o = b.o + r * hdp + i;
                if (hdp - i >= 2 * LANES) int16_values(prob + r * KEY_BLOCK, v + i * 2, hdp, span, b.p_scale + r, scale, o, 2);
                else int16_values(prob + r * KEY_BLOCK, v + i * 2, hdp, span, b.p_scale + r, scale, o, 1);
            }
    }
    write_rows(p, &b, h, first, count);
}

static const struct path int16_path = {QUERY_BLOCK, int16_scratch_bytes, int16_pack_head, int16_attend};

#if LANES == 16
/* ---- BF16 (AVX512_BF16): in BF16 pairs, as _mm512_dpbf16_ps takes them: keys as [key block][hdp/2][KEY_BLOCK][2]
 * (dimension pairs of 16 keys per vector), values as [key block][KEY_BLOCK/2][hdp][2] (key pairs of 16
 * dimensions). */

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))
#define BF16_INLINE static inline __attribute__((always_inline)) BF16

static size_t bf16_scratch_bytes(const struct problem *p) { return blocks_bytes(p, 2); }

static void bf16_pack_head(const struct problem *p, int64_t h, void *scratch) {
    const struct blocks b = blocks_in(p, scratch, 2);
    uint16_t *keys = b.k, *values = b.v;
    for (int64_t s = 0; s < b.key_blocks * KEY_BLOCK; s++) {
        const int64_t block = s / KEY_BLOCK, j = s % KEY_BLOCK;
        uint16_t *k = keys + block * KEY_BLOCK * b.hdp + j * 2;
        uint16_t *v = values + block * KEY_BLOCK * b.hdp + (j / 2) * b.hdp * 2 + (j & 1);
        const float *ks = s < p->n_kv ? k_at(p, s, h) : NULL, *vs = s < p->n_kv ? v_at(p, s, h) : NULL;
        for (int64_t i = 0; i < b.hdp; i++) {
            const int real = ks && i < p->hd;
            k[(i / 2) * KEY_BLOCK * 2 + (i & 1)] = lva_bf16_of(real ? ks[i] : 0.0f);
            v[i * 2] = lva_bf16_of(real ? vs[i] : 0.0f);
        }
    }
}

/* S[6 rows][64 keys] = Q . K^T: each step takes a pair of dimensions. */
BF16_INLINE void bf16_scores_6x64(const uint16_t *q, int64_t hdp, const uint16_t *k, float *s) {
    __m512 acc[6][4];
    for (int r = 0; r < 6; r++)
        for (int n = 0; n < 4; n++) acc[r][n] = _mm512_setzero_ps();
    for (int64_t pair = 0; pair < hdp / 2; pair++) {
        const uint16_t *kp = k + pair * KEY_BLOCK * 2;
        __m512bh w[4];
        for (int n = 0; n < 4; n++) w[n] = (__m512bh)_mm512_loadu_si512(kp + 32 * n);
        for (int r = 0; r < 6; r++) {
            int32_t pair_bits;
            memcpy(&pair_bits, q + r * hdp + 2 * pair, 4);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair_bits);
            for (int n = 0; n < 4; n++) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], a, w[n]);
        }
    }
    for (int r = 0; r < 6; r++)
        for (int n = 0; n < 4; n++) _mm512_storeu_ps(s + r * KEY_BLOCK + 16 * n, acc[r][n]);
}

/* O[4 rows][16 * vectors dims] += P . V: each step takes a pair of keys. */
BF16_INLINE void bf16_values_4xn(const uint16_t *prob, const uint16_t *v, int64_t hdp, int64_t pairs, float *o,
                                 const int vectors) {
    __m512 acc[4][6];
    for (int r = 0; r < 4; r++)
        for (int n = 0; n < vectors; n++) acc[r][n] = _mm512_loadu_ps(o + r * hdp + 16 * n);
    for (int64_t pair = 0; pair < pairs; pair++) {
        const uint16_t *vp = v + pair * hdp * 2;
        __m512bh w[6];
        for (int n = 0; n < vectors; n++) w[n] = (__m512bh)_mm512_loadu_si512(vp + 32 * n);
        for (int r = 0; r < 4; r++) {
            int32_t pair_bits;
            memcpy(&pair_bits, prob + r * KEY_BLOCK + 2 * pair, 4);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair_bits);
            for (int n = 0; n < vectors; n++) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], a, w[n]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int n = 0; n < vectors; n++) _mm512_storeu_ps(o + r * hdp + 16 * n, acc[r][n]);
}

BF16 static void bf16_values(const uint16_t *prob, const uint16_t *v, int64_t hdp, int64_t pairs, float *o) {
    switch (hdp / 16) {                       /* hd <= 96: checked by the caller */
        case 1: bf16_values_4xn(prob, v, hdp, pairs, o, 1); break;
        case 2: bf16_values_4xn(prob, v, hdp, pairs, o, 2); break;
        case 3: bf16_values_4xn(prob, v, hdp, pairs, o, 3); break;
        case 4: bf16_values_4xn(prob, v, hdp, pairs, o, 4); break;
        case 5: bf16_values_4xn(prob, v, hdp, pairs, o, 5); break;
        default: bf16_values_4xn(prob, v, hdp, pairs, o, 6); break;
    }
}

/* The probabilities of a row (softmax_row's output) rounded to BF16. */
BF16 static void bf16_round_probabilities(const float *s, int64_t span, uint16_t *prob) {
    for (int64_t j = 0; j < span; j += 16)
        _mm256_storeu_si256((__m256i *)(prob + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + j)));
}

BF16 static void bf16_attend(const struct problem *p, int64_t h, int64_t first, int64_t count, int64_t keys,
                             void *scratch) {
    const struct blocks b = blocks_in(p, scratch, 2);
    uint16_t *q = b.q;
    for (int64_t r = 0; r < QUERY_BLOCK; r++)
        for (int64_t i = 0; i < b.hdp; i++)
            q[r * b.hdp + i] = lva_bf16_of(r < count && i < p->hd ? q_at(p, first + r, h)[i] : 0.0f);
    start_rows(&b);
    for (int64_t block = 0; block * KEY_BLOCK < keys; block++) {
        const int64_t valid = min64(KEY_BLOCK, keys - block * KEY_BLOCK), span = round_up(valid, 64);
        const uint16_t *k = (const uint16_t *)b.k + block * KEY_BLOCK * b.hdp;
        const uint16_t *v = (const uint16_t *)b.v + block * KEY_BLOCK * b.hdp;
        for (int64_t r = 0; r < QUERY_BLOCK; r += 6)
            for (int64_t j = 0; j < span; j += 64) bf16_scores_6x64(q + r * b.hdp, b.hdp, k + j * 2, b.s + r * KEY_BLOCK + j);
        for (int64_t r = 0; r < QUERY_BLOCK; r++) {
            online_softmax_row(b.s + r * KEY_BLOCK, valid, span, p->scale, b.max + r, b.sum + r, b.o + r * b.hdp, b.hdp);
            bf16_round_probabilities(b.s + r * KEY_BLOCK, span, b.p + r * KEY_BLOCK);
        }
        for (int64_t r = 0; r < QUERY_BLOCK; r += 4) bf16_values(b.p + r * KEY_BLOCK, v, b.hdp, span / 2, b.o + r * b.hdp);
    }
    write_rows(p, &b, h, first, count);
}

static const struct path bf16_path = {QUERY_BLOCK, bf16_scratch_bytes, bf16_pack_head, bf16_attend};
#endif /* LANES == 16 */

const struct path *SIMD(attention_path)(int arithmetic) {
    switch (arithmetic) {
        case LVA_F32: return &f32_path;
        case LVA_INT16: return &int16_path;
#if LANES == 16
        case LVA_BF16: return &bf16_path;
#endif
        default: return NULL;
    }
}

#endif /* LVA_SIMD_WIDTH */
