/* lva's CPU kernels where ggml 0.3.36's are slow, as ggml custom ops (`ggml_custom_4d`), one section each:
 * the vision encoder's fused softmax attention (first), its vectorised GELU, the decoder's cross-attention
 * of a decoded token's rows over an image's K/V, and the vision tower's matrix products in 16-bit integers
 * for CPUs without BF16 arithmetic.
 *
 * Attention
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
 * (queries x keys). A thread packs the K/V of each head it meets into its own scratch memory, which this
 * file allocates and frees within the call, so nothing is shared between threads.
 *
 * Paths (chosen by the caller; `lva_attention_paths` says which this CPU runs, detected at run time):
 *   reference    plain C in F32, row by row: the yardstick for the tests.
 *   avx2         AVX2 + FMA + F16C: Q, K, P and V rounded to 16-bit integers with F32 scales (see its
 *                section), Q.K^T and P.V in int32 with vpmaddwd, online softmax in F32.
 *   avx512bf16   AVX-512F/BW + AVX512_BF16: Q, K, V and the probabilities P rounded to BF16, as torch's BF16
 *                flash attention does; Q.K^T and P.V with _mm512_dpbf16_ps, online softmax in F32.
 * The SIMD paths are flash attention (online softmax over blocks of KEY_BLOCK keys, queries in blocks of
 * QUERY_BLOCK) with register-blocked micro-kernels, after torch's aten/src/ATen/native/cpu/
 * FlashAttentionKernel.cpp (BSD-3-Clause) in structure; the code is our own.
 * The exp is Cephes' expf (Cody-Waite reduction and its polynomial, public domain), vectorised.
 *
 * The few fields of `struct ggml_tensor` read here mirror ggml.h of llama-cpp-python 0.3.36, as
 * models/ggml.py's TensorStruct does; `lva_attention_tensor_offsets` lets Python check they agree.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define LVA_X86 1
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------------------------------- ggml's tensor */

struct ggml_tensor {                          /* ggml.h, llama-cpp-python 0.3.36 */
    int type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
    int op;
    int32_t op_params[16];
    int32_t flags;
    struct ggml_tensor *src[10];
    struct ggml_tensor *view_src;
    size_t view_offs;
    void *data;
    char name[64];
    void *extra;
    char padding[8];
};

/* Offsets of the fields read here, and the struct's size, for the layout check on the Python side. */
void lva_attention_tensor_offsets(size_t out[5]) {
    out[0] = offsetof(struct ggml_tensor, ne);
    out[1] = offsetof(struct ggml_tensor, nb);
    out[2] = offsetof(struct ggml_tensor, src);
    out[3] = offsetof(struct ggml_tensor, data);
    out[4] = sizeof(struct ggml_tensor);
}

int lva_attention_paths(void);              /* the entry points, at the end */

/* ---------------------------------------------------------------------------------------- the problem */

enum { PATH_REFERENCE = 0, PATH_AVX2 = 1, PATH_AVX512BF16 = 2 };

struct lva_attention_params {
    int32_t heads;
    int32_t real;                             /* queries before it see all keys; the rest see keys < real */
    float scale;
    int32_t path;
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

static inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* One path: how many queries it takes at a time, its scratch size, packing a head's K/V, and attending. */
struct path {
    int64_t query_block;
    size_t (*scratch_bytes)(const struct problem *p);
    void (*pack_head)(const struct problem *p, int64_t head, void *scratch);
    void (*attend)(const struct problem *p, int64_t head, int64_t first, int64_t count, int64_t keys, void *scratch);
};

static void *scratch_alloc(size_t bytes) {
    void *memory = aligned_alloc(64, (size_t)round_up((int64_t)bytes, 64));
    if (!memory) {
        fprintf(stderr, "lva kernels: out of memory for %zu bytes of scratch\n", bytes);
        abort();                              /* as ggml does when a CPU op cannot get memory */
    }
    return memory;
}

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
                if (!scratch) scratch = scratch_alloc(path->scratch_bytes(p));
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

/* ---------------------------------------------------------------------------------------- reference */

static size_t reference_scratch_bytes(const struct problem *p) { return (size_t)p->n_kv * sizeof(float); }

static void reference_pack_head(const struct problem *p, int64_t head, void *scratch) {
    (void)p, (void)head, (void)scratch;       /* reads q, k, v in place */
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

/* ---------------------------------------------------------------------------------------- shared by the SIMD paths */

/* Rounds `values` (n of them, F32) to integers of at most `limit` (16-bit integer arithmetic: the AVX2
 * attention, the int16 products); returns their scale. lrintf rounds to nearest even, as cvtps does. */
static float int16_round_reference(const float *values, int16_t *q, int n, float limit) {
    float largest = 0.0f;
    for (int i = 0; i < n; i++) largest = fmaxf(largest, fabsf(values[i]));
    const float to_int = largest > 0.0f ? limit / largest : 0.0f;
    for (int i = 0; i < n; i++) q[i] = (int16_t)lrintf(values[i] * to_int);
    return largest / limit;
}

enum { QUERY_BLOCK = 96, KEY_BLOCK = 256 };   /* S and P for a block: 96 x 256 F32 = 96 KiB, in L2 */

/* The SIMD paths' scratch, carved out of one allocation. hdp = hd padded to 16 (zeros). */
struct blocks {
    int64_t hdp, key_blocks;
    uint16_t *k, *v;                          /* a head's packed keys and values, every key block */
    void *q;                                  /* the query block, packed */
    float *s;                                 /* scores, then (AVX2) probabilities: [QUERY_BLOCK][KEY_BLOCK] */
    uint16_t *p;                              /* probabilities, BF16 or (AVX2) int16: [QUERY_BLOCK][KEY_BLOCK] */
    float *o, *max, *sum;                     /* [QUERY_BLOCK][hdp], [QUERY_BLOCK], [QUERY_BLOCK] */
    float *k_scale, *v_scale;                 /* (AVX2) per key; per key block and dimension */
    float *q_scale, *p_scale;                 /* (AVX2) per query row; per row of the key block */
};

static size_t blocks_bytes(const struct problem *p, size_t q_element) {
    const int64_t hdp = round_up(p->hd, 16), keys = round_up(p->n_kv, KEY_BLOCK);
    return 2 * (size_t)keys * hdp * 2 + (size_t)QUERY_BLOCK * hdp * q_element
         + (size_t)QUERY_BLOCK * KEY_BLOCK * (4 + 2) + (size_t)QUERY_BLOCK * (hdp + 2) * 4
         + ((size_t)keys + (size_t)(keys / KEY_BLOCK) * hdp + 2 * QUERY_BLOCK) * 4 + 12 * 64;
}

static struct blocks blocks_in(const struct problem *p, void *scratch, size_t q_element) {
    struct blocks b;
    char *at = scratch;
    b.hdp = round_up(p->hd, 16);
    b.key_blocks = round_up(p->n_kv, KEY_BLOCK) / KEY_BLOCK;
    const size_t packed = (size_t)b.key_blocks * KEY_BLOCK * b.hdp * 2;
#define TAKE(field, bytes) (b.field = (void *)at, at += round_up((int64_t)(bytes), 64))
    TAKE(k, packed);
    TAKE(v, packed);
    TAKE(q, (size_t)QUERY_BLOCK * b.hdp * q_element);
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

/* After the last key block: out = O / sum for the block's real rows. */
static void write_rows(const struct problem *p, const struct blocks *b, int64_t h, int64_t first, int64_t count) {
    for (int64_t r = 0; r < count; r++) {
        float *out = out_at(p, first + r, h);
        const float *o = b->o + r * b->hdp, inverse = 1.0f / b->sum[r];
        for (int64_t i = 0; i < p->hd; i++) out[i] = o[i] * inverse;
    }
}

static void start_rows(const struct blocks *b) {
    memset(b->o, 0, (size_t)QUERY_BLOCK * b->hdp * 4);
    for (int r = 0; r < QUERY_BLOCK; r++) {
        b->max[r] = -INFINITY;
        b->sum[r] = 0;
    }
}

#ifdef LVA_X86

/* ---------------------------------------------------------------------------------------- AVX2 + FMA + F16C */

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* Cephes' expf for x <= 0; below -87 the result is a tiny normal number instead of 0 (and is masked or
 * negligible next to the row's largest term, which is 1). */
AVX2_INLINE __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(power));
}

AVX2_INLINE float hmax_avx2(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

AVX2_INLINE float hsum_avx2(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* q[0..16) = a and b times to_int, rounded to nearest even (as lrintf) and narrowed to int16, in order. */
AVX2_INLINE void avx2_store_int16(__m256 a, __m256 b, __m256 to_int, int16_t *q) {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(a, to_int)), hi = _mm256_cvtps_epi32(_mm256_mul_ps(b, to_int));
    _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
}

/* The AVX2 path multiplies 16-bit integers (vpmaddwd: 16 multiply-adds an instruction, about twice AVX2's
 * F32 FMA rate): Q and K rounded to 13-bit integers with one scale per row of a head (96 x 4095^2 < 2^31),
 * P to 12-bit ones per row of a key block and V to 13-bit ones per dimension of a key block (256 x 2047 x
 * 4095 < 2^31); the int32 sums are scaled into F32 scores and outputs, and the softmax is F32. */
enum { I16_QK_LARGEST = 4095, I16_P_LARGEST = 2047 };

static size_t avx2_scratch_bytes(const struct problem *p) { return blocks_bytes(p, 2); }

/* Keys as [key block][hdp/2][KEY_BLOCK][2] (a pair of dimensions of 8 keys in a vector), values as
 * [key block][KEY_BLOCK/2][hdp][2] (a pair of keys of 8 dimensions in a vector); int16, with their scales. */
AVX2 static void avx2_pack_head(const struct problem *p, int64_t h, void *scratch) {
    struct blocks b = blocks_in(p, scratch, 2);
    const int64_t hdp = b.hdp, keys = b.key_blocks * KEY_BLOCK;
    int16_t *k = (int16_t *)b.k, *v = (int16_t *)b.v, q[96];
    float row[96];
    for (int64_t s = 0; s < keys; s++) {
        const float *ks = s < p->n_kv ? k_at(p, s, h) : NULL;
        for (int64_t i = 0; i < hdp; i++) row[i] = ks && i < p->hd ? ks[i] : 0.0f;
        b.k_scale[s] = int16_round_reference(row, q, (int)hdp, I16_QK_LARGEST);
        int16_t *key = k + (s / KEY_BLOCK) * KEY_BLOCK * hdp + (s % KEY_BLOCK) * 2;
        for (int64_t i = 0; i < hdp; i++) key[(i / 2) * KEY_BLOCK * 2 + (i & 1)] = q[i];
    }
    for (int64_t block = 0; block < b.key_blocks; block++)
        for (int64_t i = 0; i < hdp; i++) {
            float largest = 0.0f;
            for (int64_t j = 0; j < KEY_BLOCK; j++) {
                const int64_t s = block * KEY_BLOCK + j;
                if (s < p->n_kv && i < p->hd) largest = fmaxf(largest, fabsf(v_at(p, s, h)[i]));
            }
            const float to_int = largest > 0.0f ? I16_QK_LARGEST / largest : 0.0f;
            b.v_scale[block * hdp + i] = largest / I16_QK_LARGEST;
            int16_t *value = v + block * KEY_BLOCK * hdp + i * 2;
            for (int64_t j = 0; j < KEY_BLOCK; j++) {
                const int64_t s = block * KEY_BLOCK + j;
                value[(j / 2) * hdp * 2 + (j & 1)] =
                    (int16_t)(s < p->n_kv && i < p->hd ? lrintf(v_at(p, s, h)[i] * to_int) : 0);
            }
        }
}

/* S[4 rows][16 keys] = Q . K^T: int32 sums over the dimension pairs, scaled into F32. */
AVX2_INLINE void avx2_scores_4x16(const int16_t *q, int64_t hdp, const int16_t *k, const float *q_scale,
                                  const float *k_scale, float *s) {
    const int32_t *x = (const int32_t *)q;
    const int64_t pairs = hdp / 2;
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
            a31 = a00;
    for (int64_t i = 0; i < pairs; i++) {
        const __m256i k0 = _mm256_loadu_si256((const __m256i *)(k + i * KEY_BLOCK * 2));
        const __m256i k1 = _mm256_loadu_si256((const __m256i *)(k + i * KEY_BLOCK * 2 + 16));
        __m256i xr;
#define LVA_QK_ROW(r)                                                      \
    xr = _mm256_set1_epi32(x[(r) * pairs + i]);                            \
    a##r##0 = _mm256_add_epi32(a##r##0, _mm256_madd_epi16(xr, k0));        \
    a##r##1 = _mm256_add_epi32(a##r##1, _mm256_madd_epi16(xr, k1));
        LVA_QK_ROW(0) LVA_QK_ROW(1) LVA_QK_ROW(2) LVA_QK_ROW(3)
#undef LVA_QK_ROW
    }
    const __m256i sums[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    const __m256 ks[2] = {_mm256_loadu_ps(k_scale), _mm256_loadu_ps(k_scale + 8)};
    for (int r = 0; r < 4; r++) {
        const __m256 qs = _mm256_set1_ps(q_scale[r]);
        for (int c = 0; c < 2; c++)
            _mm256_storeu_ps(s + r * KEY_BLOCK + 8 * c, _mm256_mul_ps(_mm256_cvtepi32_ps(sums[r][c]),
                                                                      _mm256_mul_ps(ks[c], qs)));
    }
}

/* O[4 rows][16 dims] += P . V: int32 sums over the key pairs, scaled into F32. */
AVX2_INLINE void avx2_values_4x16(const int16_t *prob, const int16_t *v, int64_t hdp, int64_t span,
                                  const float *p_scale, const float *v_scale, float *o) {
    const int32_t *x = (const int32_t *)prob;
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
            a31 = a00;
    for (int64_t j = 0; j < span / 2; j++) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(v + j * hdp * 2));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(v + j * hdp * 2 + 16));
        __m256i xr;
#define LVA_PV_ROW(r)                                                      \
    xr = _mm256_set1_epi32(x[(r) * (KEY_BLOCK / 2) + j]);                  \
    a##r##0 = _mm256_add_epi32(a##r##0, _mm256_madd_epi16(xr, v0));        \
    a##r##1 = _mm256_add_epi32(a##r##1, _mm256_madd_epi16(xr, v1));
        LVA_PV_ROW(0) LVA_PV_ROW(1) LVA_PV_ROW(2) LVA_PV_ROW(3)
#undef LVA_PV_ROW
    }
    const __m256i sums[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    const __m256 vs[2] = {_mm256_loadu_ps(v_scale), _mm256_loadu_ps(v_scale + 8)};
    for (int r = 0; r < 4; r++) {
        const __m256 ps = _mm256_set1_ps(p_scale[r]);
        for (int c = 0; c < 2; c++) {
            float *out = o + r * hdp + 8 * c;
            _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][c]), _mm256_mul_ps(vs[c], ps),
                                                  _mm256_loadu_ps(out)));
        }
    }
}

/* A row of probabilities (>= 0, `span` of them) as int16 of at most I16_P_LARGEST; returns their scale. */
AVX2 static float avx2_round_probabilities(const float *prob, int64_t span, int16_t *q) {
    __m256 m = _mm256_setzero_ps();
    for (int64_t j = 0; j < span; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(prob + j));
    const float largest = hmax_avx2(m);
    const __m256 to_int = _mm256_set1_ps(largest > 0.0f ? I16_P_LARGEST / largest : 0.0f);
    for (int64_t j = 0; j < span; j += 16)
        avx2_store_int16(_mm256_loadu_ps(prob + j), _mm256_loadu_ps(prob + j + 8), to_int, q + j);
    return largest / I16_P_LARGEST;
}

/* Online softmax of one row of scores over `valid` keys (the row is `span` long): P in place of S. */
AVX2 static void avx2_softmax_row(float *s, int64_t valid, int64_t span, float scale, float *row_max, float *row_sum,
                                  float *o, int64_t hdp) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < valid; j += 8) {
        const __m256 in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(valid - j)), lane));
        vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + j), in));
    }
    const float old_max = *row_max, new_max = fmaxf(old_max, hmax_avx2(vmax) * scale);
    const __m256 shift = _mm256_set1_ps(new_max), vscale = _mm256_set1_ps(scale);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < span; j += 8) {
        const __m256 in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(valid - j)), lane));
        const __m256 e = _mm256_and_ps(exp_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vscale, shift)), in);
        vsum = _mm256_add_ps(vsum, e);
        _mm256_storeu_ps(s + j, e);
    }
    const float alpha = expf(old_max - new_max);      /* 0 on the first block (old_max = -inf) */
    *row_sum = *row_sum * alpha + hsum_avx2(vsum);
    *row_max = new_max;
    if (alpha != 1.0f)
        for (int64_t i = 0; i < hdp; i++) o[i] *= alpha;
}

AVX2 static void avx2_attend(const struct problem *p, int64_t h, int64_t first, int64_t count, int64_t keys,
                             void *scratch) {
    struct blocks b = blocks_in(p, scratch, 2);
    const int64_t hdp = b.hdp;
    int16_t *q = b.q, *prob = (int16_t *)b.p;
    float row[96];
    for (int64_t r = 0; r < QUERY_BLOCK; r++) {
        for (int64_t i = 0; i < hdp; i++) row[i] = r < count && i < p->hd ? q_at(p, first + r, h)[i] : 0.0f;
        b.q_scale[r] = int16_round_reference(row, q + r * hdp, (int)hdp, I16_QK_LARGEST);
    }
    start_rows(&b);
    for (int64_t block = 0; block * KEY_BLOCK < keys; block++) {
        const int64_t valid = min64(KEY_BLOCK, keys - block * KEY_BLOCK), span = round_up(valid, 16);
        const int16_t *k = (const int16_t *)b.k + block * KEY_BLOCK * hdp;
        const int16_t *v = (const int16_t *)b.v + block * KEY_BLOCK * hdp;
        for (int64_t r = 0; r < QUERY_BLOCK; r += 4)
            for (int64_t j = 0; j < span; j += 16)
                avx2_scores_4x16(q + r * hdp, hdp, k + j * 2, b.q_scale + r, b.k_scale + block * KEY_BLOCK + j,
                                 b.s + r * KEY_BLOCK + j);
        for (int64_t r = 0; r < QUERY_BLOCK; r++) {
            avx2_softmax_row(b.s + r * KEY_BLOCK, valid, span, p->scale, b.max + r, b.sum + r, b.o + r * hdp, hdp);
            b.p_scale[r] = avx2_round_probabilities(b.s + r * KEY_BLOCK, span, prob + r * KEY_BLOCK);
        }
        for (int64_t r = 0; r < QUERY_BLOCK; r += 4)
            for (int64_t i = 0; i < hdp; i += 16)
                avx2_values_4x16(prob + r * KEY_BLOCK, v + i * 2, hdp, span, b.p_scale + r, b.v_scale + block * hdp + i,
                                 b.o + r * hdp + i);
    }
    write_rows(p, &b, h, first, count);
}

static const struct path avx2_path = {QUERY_BLOCK, avx2_scratch_bytes, avx2_pack_head, avx2_attend};

/* ---------------------------------------------------------------------------------------- AVX-512 BF16 */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

AVX512_INLINE __m512 exp_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

/* Round to BF16, to nearest even (as torch and ggml do). */
static inline uint16_t bf16_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);   /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static size_t avx512_scratch_bytes(const struct problem *p) { return blocks_bytes(p, 2); }

/* In BF16 pairs, as _mm512_dpbf16_ps takes them: keys as [key block][hdp/2][KEY_BLOCK][2] (dimension pairs
 * of 16 keys per vector), values as [key block][KEY_BLOCK/2][hdp][2] (key pairs of 16 dimensions). */
static void avx512_pack_head(const struct problem *p, int64_t h, void *scratch) {
    struct blocks b = blocks_in(p, scratch, 2);
    const int64_t keys = b.key_blocks * KEY_BLOCK;
    for (int64_t s = 0; s < keys; s++) {
        const int64_t block = s / KEY_BLOCK, j = s % KEY_BLOCK;
        uint16_t *k = b.k + block * KEY_BLOCK * b.hdp + j * 2;
        uint16_t *v = b.v + block * KEY_BLOCK * b.hdp + (j / 2) * b.hdp * 2 + (j & 1);
        const float *ks = s < p->n_kv ? k_at(p, s, h) : NULL, *vs = s < p->n_kv ? v_at(p, s, h) : NULL;
        for (int64_t i = 0; i < b.hdp; i++) {
            const int real = ks && i < p->hd;
            k[(i / 2) * KEY_BLOCK * 2 + (i & 1)] = bf16_of(real ? ks[i] : 0.0f);
            v[i * 2] = bf16_of(real ? vs[i] : 0.0f);
        }
    }
}

/* S[6 rows][64 keys] = Q . K^T: each step takes a pair of dimensions. */
AVX512_INLINE void avx512_scores_6x64(const uint16_t *q, int64_t hdp, const uint16_t *k, float *s) {
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

/* O[4 rows][16 * VECTORS dims] += P . V: each step takes a pair of keys. */
AVX512_INLINE void avx512_values_4xn(const uint16_t *prob, const uint16_t *v, int64_t hdp, int64_t pairs, float *o,
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

AVX512 static void avx512_values(const uint16_t *prob, const uint16_t *v, int64_t hdp, int64_t pairs, float *o) {
    switch (hdp / 16) {                       /* hd <= 96: checked by the caller */
        case 1: avx512_values_4xn(prob, v, hdp, pairs, o, 1); break;
        case 2: avx512_values_4xn(prob, v, hdp, pairs, o, 2); break;
        case 3: avx512_values_4xn(prob, v, hdp, pairs, o, 3); break;
        case 4: avx512_values_4xn(prob, v, hdp, pairs, o, 4); break;
        case 5: avx512_values_4xn(prob, v, hdp, pairs, o, 5); break;
        default: avx512_values_4xn(prob, v, hdp, pairs, o, 6); break;
    }
}

/* Online softmax of one row over `valid` keys (the row is `span` long); P rounded to BF16, the sum in F32. */
AVX512 static void avx512_softmax_row(const float *s, int64_t valid, int64_t span, float scale, float *row_max,
                                      float *row_sum, uint16_t *prob, float *o, int64_t hdp) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < valid; j += 16) {
        const __mmask16 in = valid - j >= 16 ? 0xffff : (__mmask16)((1u << (valid - j)) - 1);
        vmax = _mm512_mask_max_ps(vmax, in, vmax, _mm512_maskz_loadu_ps(in, s + j));
    }
    const float old_max = *row_max, new_max = fmaxf(old_max, _mm512_reduce_max_ps(vmax) * scale);
    const __m512 shift = _mm512_set1_ps(new_max), vscale = _mm512_set1_ps(scale);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < span; j += 16) {
        const __mmask16 in = valid - j >= 16 ? 0xffff : valid > j ? (__mmask16)((1u << (valid - j)) - 1) : 0;
        const __m512 e = _mm512_maskz_mov_ps(in, exp_avx512(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vscale, shift)));
        vsum = _mm512_add_ps(vsum, e);
        _mm256_storeu_si256((__m256i *)(prob + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    const float alpha = expf(old_max - new_max);
    *row_sum = *row_sum * alpha + _mm512_reduce_add_ps(vsum);
    *row_max = new_max;
    if (alpha != 1.0f)
        for (int64_t i = 0; i < hdp; i++) o[i] *= alpha;
}

AVX512 static void avx512_attend(const struct problem *p, int64_t h, int64_t first, int64_t count, int64_t keys,
                                 void *scratch) {
    struct blocks b = blocks_in(p, scratch, 2);
    uint16_t *q = b.q;
    for (int64_t r = 0; r < QUERY_BLOCK; r++)
        for (int64_t i = 0; i < b.hdp; i++)
            q[r * b.hdp + i] = bf16_of(r < count && i < p->hd ? q_at(p, first + r, h)[i] : 0.0f);
    start_rows(&b);
    for (int64_t block = 0; block * KEY_BLOCK < keys; block++) {
        const int64_t valid = min64(KEY_BLOCK, keys - block * KEY_BLOCK), span = round_up(valid, 64);
        const uint16_t *k = b.k + block * KEY_BLOCK * b.hdp, *v = b.v + block * KEY_BLOCK * b.hdp;
        for (int64_t r = 0; r < QUERY_BLOCK; r += 6)
            for (int64_t j = 0; j < span; j += 64)
                avx512_scores_6x64(q + r * b.hdp, b.hdp, k + j * 2, b.s + r * KEY_BLOCK + j);
        for (int64_t r = 0; r < QUERY_BLOCK; r++)
            avx512_softmax_row(b.s + r * KEY_BLOCK, valid, span, p->scale, b.max + r, b.sum + r, b.p + r * KEY_BLOCK,
                               b.o + r * b.hdp, b.hdp);
        for (int64_t r = 0; r < QUERY_BLOCK; r += 4)
            avx512_values(b.p + r * KEY_BLOCK, v, b.hdp, span / 2, b.o + r * b.hdp);
    }
    write_rows(p, &b, h, first, count);
}

static const struct path avx512_path = {QUERY_BLOCK, avx512_scratch_bytes, avx512_pack_head, avx512_attend};

#endif /* LVA_X86 */

/* ---------------------------------------------------------------------------------------- GELU */

/* y = gelu(x + bias), gelu(x) = x/2 (1 + erf(x/√2)): the activation of the encoder's MLP (the model's erf
 * form), with the bias of the product before it added on the way, which saves the graph a pass over the
 * [5120, tokens] activations. ggml 0.3.36 computes GELU one element at a time (libm's erff, or a lookup
 * in an F16 table of the tanh form); this one is vectorised. erf is the rational approximation Eigen and
 * XLA use for float (coefficients from Eigen's generic_fast_erf_float, MPL-2.0): x·P(x²)/Q(x²) on
 * [-4, 4], beyond which erf is ±1 in float. Every path evaluates the same formula. */

static const float ERF_P[7] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                               -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                               -1.60960333262415e-02f};
static const float ERF_Q[5] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                               -7.37332916720468e-03f, -1.42647390514189e-02f};
#define SQRT_HALF 0.70710678118654752f

/* One row of n values; bias is NULL or n values. */
static void gelu_reference(const float *x, const float *bias, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float v = bias ? x[i] + bias[i] : x[i];
        const float z = fminf(fmaxf(v * SQRT_HALF, -4.0f), 4.0f), z2 = z * z;
        float p = ERF_P[0], q = ERF_Q[0];
        for (int c = 1; c < 7; c++) p = p * z2 + ERF_P[c];
        for (int c = 1; c < 5; c++) q = q * z2 + ERF_Q[c];
        y[i] = 0.5f * v * (1.0f + z * p / q);
    }
}

#ifdef LVA_X86

AVX2 static void gelu_avx2(const float *x, const float *bias, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + i));
        const __m256 z = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, _mm256_set1_ps(SQRT_HALF)),
                                                     _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
        const __m256 z2 = _mm256_mul_ps(z, z);
        __m256 p = _mm256_set1_ps(ERF_P[0]), q = _mm256_set1_ps(ERF_Q[0]);
        for (int c = 1; c < 7; c++) p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(ERF_P[c]));
        for (int c = 1; c < 5; c++) q = _mm256_fmadd_ps(q, z2, _mm256_set1_ps(ERF_Q[c]));
        const __m256 erf = _mm256_div_ps(_mm256_mul_ps(z, p), q);
        const __m256 half_v = _mm256_mul_ps(v, _mm256_set1_ps(0.5f));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(half_v, erf, half_v));
    }
    gelu_reference(x + i, bias ? bias + i : NULL, y + i, n - i);
}

AVX512 static void gelu_avx512(const float *x, const float *bias, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + i));
        const __m512 z = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, _mm512_set1_ps(SQRT_HALF)),
                                                     _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
        const __m512 z2 = _mm512_mul_ps(z, z);
        __m512 p = _mm512_set1_ps(ERF_P[0]), q = _mm512_set1_ps(ERF_Q[0]);
        for (int c = 1; c < 7; c++) p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(ERF_P[c]));
        for (int c = 1; c < 5; c++) q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(ERF_Q[c]));
        const __m512 erf = _mm512_div_ps(_mm512_mul_ps(z, p), q);
        const __m512 half_v = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(half_v, erf, half_v));
    }
    gelu_reference(x + i, bias ? bias + i : NULL, y + i, n - i);
}

#endif /* LVA_X86 */

/* ---------------------------------------------------------------------------------------- cross-attention */

/* The decoder's cross-attention for a few rows (a decoded token's), against an image's F16 K/V:
 *     out[:, i, h] = softmax_t(scale * q[:, i, h] . key[:, t, h]) . value_t[t, :, h]
 * for the n_q = (query heads per KV head) x rows queries i of each KV head h. ggml runs this as a product,
 * a transposed copy, a softmax and a second product, each a pass with its own threads' sync; here each
 * KV head's keys and values are read once, in one pass each, which is what a decoded token's time is
 * made of (8 KV heads x 6404 tokens x 128 x 2 x 2 bytes = 26 MB per layer with a 4-tile image).
 *
 * Layouts, ggml order: src[0] = q [hd, n_q, kv] F32, src[1] = key [hd, T, kv] F16, src[2] = value_t
 * [T, hd, kv] F16 (rows contiguous), dst = out [hd, n_q, kv] F32 contiguous. Threads take whole KV heads.
 * The scores of a head (n_q x T floats) are this thread's scratch. SIMD paths need hd % 16 == 0. */

enum { CROSS_MAX_QUERIES = 32 };           /* n_q at most: a few rows of the query heads of one KV head */

struct lva_cross_params {
    float scale;
    int32_t path;
};

struct cross {
    int64_t hd, n_q, tokens;
    float scale;
    const float *q;                           /* one head's queries, n_q rows of hd */
    const uint16_t *key, *value_t;            /* one head's keys (T rows of hd), values (hd rows of T) */
    size_t key_row, value_row;                /* elements from one row to the next */
    float *out, *p;                           /* n_q rows of hd; the scores, n_q rows of T */
};

static float f32_of_f16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float f;
    if (exponent == 0) {                      /* zero or subnormal: mantissa x 2^-24 */
        f = (float)mantissa * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    const uint32_t u = sign | (exponent == 0x1f ? 0x7f800000 | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13));
    memcpy(&f, &u, 4);
    return f;
}

/* p[i] = exp(p[i] - max) over a row of scores, returning 1 / their sum. */
static float softmax_row_reference(float *p, int64_t n) {
    float max = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < n; t++) max = fmaxf(max, p[t]);
    for (int64_t t = 0; t < n; t++) sum += p[t] = expf(p[t] - max);
    return 1.0f / sum;
}

static void cross_reference(const struct cross *c) {
    for (int64_t t = 0; t < c->tokens; t++) {
        const uint16_t *k = c->key + t * c->key_row;
        for (int64_t i = 0; i < c->n_q; i++) {
            float s = 0.0f;
            for (int64_t d = 0; d < c->hd; d++) s += c->q[i * c->hd + d] * f32_of_f16(k[d]);
            c->p[i * c->tokens + t] = s * c->scale;
        }
    }
    for (int64_t i = 0; i < c->n_q; i++) {
        const float inverse = softmax_row_reference(c->p + i * c->tokens, c->tokens);
        for (int64_t d = 0; d < c->hd; d++) {
            const uint16_t *v = c->value_t + d * c->value_row;
            float s = 0.0f;
            for (int64_t t = 0; t < c->tokens; t++) s += c->p[i * c->tokens + t] * f32_of_f16(v[t]);
            c->out[i * c->hd + d] = s * inverse;
        }
    }
}

#ifdef LVA_X86

AVX2 static float softmax_row_avx2(float *p, int64_t n) {
    float max = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < n; t++) max = fmaxf(max, p[t]);
    __m256 vsum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(max)));
        _mm256_storeu_ps(p + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    for (; t < n; t++) sum += p[t] = expf(p[t] - max);
    return 1.0f / (sum + hsum_avx2(vsum));
}

/* Queries go four at a time, their accumulators in registers; a last group of fewer repeats its last
 * query (computed, not stored). */
AVX2 static void cross_avx2(const struct cross *c) {
    const int64_t hd = c->hd, n = c->tokens;
    for (int64_t i0 = 0; i0 < c->n_q; i0 += 4) {
        const float *q[4];
        for (int j = 0; j < 4; j++) q[j] = c->q + min64(i0 + j, c->n_q - 1) * hd;
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *k = c->key + t * c->key_row;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < hd; d += 8) {
                const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + d)));
                a0 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q[0] + d), a0);
                a1 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q[1] + d), a1);
                a2 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q[2] + d), a2);
                a3 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q[3] + d), a3);
            }
            const float sums[4] = {hsum_avx2(a0), hsum_avx2(a1), hsum_avx2(a2), hsum_avx2(a3)};
            for (int j = 0; j < 4 && i0 + j < c->n_q; j++) c->p[(i0 + j) * n + t] = sums[j] * c->scale;
        }
    }
    float inverse[CROSS_MAX_QUERIES];
    for (int64_t i = 0; i < c->n_q; i++) inverse[i] = softmax_row_avx2(c->p + i * n, n);
    for (int64_t i0 = 0; i0 < c->n_q; i0 += 4) {
        const float *p[4];
        for (int j = 0; j < 4; j++) p[j] = c->p + min64(i0 + j, c->n_q - 1) * n;
        for (int64_t d = 0; d < hd; d++) {
            const uint16_t *v = c->value_t + d * c->value_row;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t t = 0;
            for (; t + 8 <= n; t += 8) {
                const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + t)));
                a0 = _mm256_fmadd_ps(vv, _mm256_loadu_ps(p[0] + t), a0);
                a1 = _mm256_fmadd_ps(vv, _mm256_loadu_ps(p[1] + t), a1);
                a2 = _mm256_fmadd_ps(vv, _mm256_loadu_ps(p[2] + t), a2);
                a3 = _mm256_fmadd_ps(vv, _mm256_loadu_ps(p[3] + t), a3);
            }
            float sums[4] = {hsum_avx2(a0), hsum_avx2(a1), hsum_avx2(a2), hsum_avx2(a3)};
            for (int j = 0; j < 4 && i0 + j < c->n_q; j++) {
                for (int64_t u = t; u < n; u++) sums[j] += p[j][u] * f32_of_f16(v[u]);
                c->out[(i0 + j) * hd + d] = sums[j] * inverse[i0 + j];
            }
        }
    }
}

AVX512 static float softmax_row_avx512(float *p, int64_t n) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p + t));
    float max = _mm512_reduce_max_ps(vmax), sum = 0.0f;
    for (int64_t u = t; u < n; u++) max = fmaxf(max, p[u]);
    __m512 vsum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(p + t), _mm512_set1_ps(max)));
        _mm512_storeu_ps(p + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    for (; t < n; t++) sum += p[t] = expf(p[t] - max);
    return 1.0f / (sum + _mm512_reduce_add_ps(vsum));
}

/* Queries go four at a time, their accumulators in registers; a last group of fewer repeats its last
 * query (computed, not stored). */
AVX512 static void cross_avx512(const struct cross *c) {
    const int64_t hd = c->hd, n = c->tokens;
    for (int64_t i0 = 0; i0 < c->n_q; i0 += 4) {
        const float *q[4];
        for (int j = 0; j < 4; j++) q[j] = c->q + min64(i0 + j, c->n_q - 1) * hd;
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *k = c->key + t * c->key_row;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < hd; d += 16) {
                const __m512 kv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + d)));
                a0 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q[0] + d), a0);
                a1 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q[1] + d), a1);
                a2 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q[2] + d), a2);
                a3 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q[3] + d), a3);
            }
            const float sums[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                   _mm512_reduce_add_ps(a3)};
            for (int j = 0; j < 4 && i0 + j < c->n_q; j++) c->p[(i0 + j) * n + t] = sums[j] * c->scale;
        }
    }
    float inverse[CROSS_MAX_QUERIES];
    for (int64_t i = 0; i < c->n_q; i++) inverse[i] = softmax_row_avx512(c->p + i * n, n);
    for (int64_t i0 = 0; i0 < c->n_q; i0 += 4) {
        const float *p[4];
        for (int j = 0; j < 4; j++) p[j] = c->p + min64(i0 + j, c->n_q - 1) * n;
        for (int64_t d = 0; d < hd; d++) {
            const uint16_t *v = c->value_t + d * c->value_row;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t t = 0;
            for (; t + 16 <= n; t += 16) {
                const __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + t)));
                a0 = _mm512_fmadd_ps(vv, _mm512_loadu_ps(p[0] + t), a0);
                a1 = _mm512_fmadd_ps(vv, _mm512_loadu_ps(p[1] + t), a1);
                a2 = _mm512_fmadd_ps(vv, _mm512_loadu_ps(p[2] + t), a2);
                a3 = _mm512_fmadd_ps(vv, _mm512_loadu_ps(p[3] + t), a3);
            }
            float sums[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                             _mm512_reduce_add_ps(a3)};
            for (int j = 0; j < 4 && i0 + j < c->n_q; j++) {
                for (int64_t u = t; u < n; u++) sums[j] += p[j][u] * f32_of_f16(v[u]);
                c->out[(i0 + j) * hd + d] = sums[j] * inverse[i0 + j];
            }
        }
    }
}

#endif /* LVA_X86 */

/* ---------------------------------------------------------------------------------------- int16 products
 *
 * y = W x for the vision tower's F16 matrices where the CPU multiplies no BF16: AVX2 multiplies 16-bit
 * integers (vpmaddwd, 16 multiply-adds an instruction) at up to twice its F32 FMA rate. The weights are
 * rounded to 14-bit integers and the activations to 13-bit ones, each with one F32 scale per 64 values
 * along k, so 64 products of 8191 x 4095 fit an int32 (2146697280 < 2^31). For all but a block's smallest
 * values that rounding is about as fine as F16's, which ggml's F16 product applies to the activations.
 * Each block's int32 sums are scaled into the F32 outputs.
 *
 * Packed weights (`lva_int16_pack`, once per matrix; k padded with zeros to a multiple of 64, n to one of
 * 16): for each group of 8 outputs the pairs (w[k], w[k+1]) of the 8 side by side, [n/8][k/2][8][2] int16,
 * then the scales, [n/8][k/64][8] F32. Work split: threads take blocks of tokens in turn, round them into
 * their own scratch ([token][k] int16, [token][k/64] scales) and compute all their outputs, in tiles of
 * 4 tokens x 16 outputs. The paths compute the same integers and the same F32 operations in the same order.
 */

enum { I16_BLOCK = 64, I16_ROWS = 4, I16_COLUMNS = 16, I16_TOKEN_BLOCK = 96, I16_OUTPUT_BLOCK = 256 };
static const float I16_WEIGHT_LARGEST = 8191.0f, I16_INPUT_LARGEST = 4095.0f;

struct lva_int16_params {
    int32_t path;
};

struct int16_product {
    int64_t k, n, tokens;                      /* as given */
    int64_t k_pad, n_pad;                      /* as packed */
    const int16_t *w;                          /* packed values */
    const float *w_scales;                     /* and their scales */
    const char *x;                             /* tokens of k F32 values, x_row bytes apart */
    char *y;                                   /* tokens of n F32 values, y_row bytes apart */
    size_t x_row, y_row;
};

typedef float int16_tile_t[I16_ROWS][I16_COLUMNS];

/* int16 elements of a packed k x n matrix: its values, then its scales (two int16 each) */
int64_t lva_int16_packed_elements(int64_t k, int64_t n) {
    const int64_t k_pad = round_up(k, I16_BLOCK), n_pad = round_up(n, I16_COLUMNS);
    return k_pad * n_pad + 2 * n_pad * (k_pad / I16_BLOCK);
}

/* Block b of a row of k values, zero-padded past k into `padded` when it runs past the end. */
static const float *int16_block_of(const float *row, int64_t k, int64_t b, float padded[I16_BLOCK]) {
    if ((b + 1) * I16_BLOCK <= k) return row + b * I16_BLOCK;
    for (int64_t i = 0; i < I16_BLOCK; i++) padded[i] = b * I16_BLOCK + i < k ? row[b * I16_BLOCK + i] : 0.0f;
    return padded;
}

#ifdef LVA_X86
/* A whole block of 64 F16 weights rounded as int16_round_reference rounds them, eight at a time. */
AVX2 static float int16_weight_block_avx2(const uint16_t *w, int16_t q[I16_BLOCK]) {
    __m256 values[I16_BLOCK / 8], m = _mm256_setzero_ps();
    for (int i = 0; i < I16_BLOCK / 8; i++) {
        values[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 8 * i)));
        m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), values[i]));
    }
    const float largest = hmax_avx2(m);
    const __m256 to_int = _mm256_set1_ps(largest > 0.0f ? I16_WEIGHT_LARGEST / largest : 0.0f);
    for (int i = 0; i < I16_BLOCK / 8; i += 2) avx2_store_int16(values[i], values[i + 1], to_int, q + 8 * i);
    return largest / I16_WEIGHT_LARGEST;
}
#endif

/* Packs w, F16 [k, n] in ggml order (n rows of k, row_bytes apart), into `packed`. */
void lva_int16_pack(const uint16_t *w, int64_t k, int64_t n, size_t row_bytes, int16_t *packed) {
    const int64_t k_pad = round_up(k, I16_BLOCK), n_pad = round_up(n, I16_COLUMNS), blocks = k_pad / I16_BLOCK;
    float *scales = (float *)(packed + k_pad * n_pad), values[I16_BLOCK];
    int16_t q[I16_BLOCK];
    int avx2 = 0;
#ifdef LVA_X86
    avx2 = (lva_attention_paths() >> PATH_AVX2) & 1;
#endif
    for (int64_t o = 0; o < n_pad; o++)
        for (int64_t b = 0; b < blocks; b++) {
            const uint16_t *row = (const uint16_t *)((const char *)w + o * row_bytes);
            float *scale = scales + ((o / 8) * blocks + b) * 8 + o % 8;
            if (avx2 && o < n && (b + 1) * I16_BLOCK <= k) {
#ifdef LVA_X86
                *scale = int16_weight_block_avx2(row + b * I16_BLOCK, q);
#endif
            } else {
                for (int64_t i = 0; i < I16_BLOCK; i++)
                    values[i] = o < n && b * I16_BLOCK + i < k ? f32_of_f16(row[b * I16_BLOCK + i]) : 0.0f;
                *scale = int16_round_reference(values, q, I16_BLOCK, I16_WEIGHT_LARGEST);
            }
            for (int i = 0; i < I16_BLOCK; i++)
                packed[(((o / 8) * (k_pad / 2) + (b * I16_BLOCK + i) / 2) * 8 + o % 8) * 2 + (i & 1)] = q[i];
        }
}

static void int16_tokens_reference(const struct int16_product *p, int64_t first, int64_t count, int16_t *q,
                                   float *scales) {
    const int64_t blocks = p->k_pad / I16_BLOCK;
    float padded[I16_BLOCK];
    for (int64_t t = 0; t < count; t++)
        for (int64_t b = 0; b < blocks; b++)
            scales[t * blocks + b] = int16_round_reference(
                int16_block_of((const float *)(p->x + (first + t) * p->x_row), p->k, b, padded),
                q + t * p->k_pad + b * I16_BLOCK, I16_BLOCK, I16_INPUT_LARGEST);
}

static void int16_tile_reference(const struct int16_product *p, const int16_t *q, const float *q_scales,
                                 int64_t n0, int16_tile_t out) {
    const int64_t k = p->k_pad, blocks = k / I16_BLOCK;
    for (int64_t b = 0; b < blocks; b++)
        for (int r = 0; r < I16_ROWS; r++)
            for (int c = 0; c < I16_COLUMNS; c++) {
                const int64_t o = n0 + c;
                int32_t sum = 0;
                for (int64_t i = b * I16_BLOCK; i < (b + 1) * I16_BLOCK; i++)
                    sum += (int32_t)q[r * k + i] * p->w[(((o / 8) * (k / 2) + i / 2) * 8 + o % 8) * 2 + (i & 1)];
                const float scale = p->w_scales[((o / 8) * blocks + b) * 8 + o % 8] * q_scales[r * blocks + b];
                out[r][c] = fmaf((float)sum, scale, out[r][c]);
            }
}

#ifdef LVA_X86

AVX2 static void int16_tokens_avx2(const struct int16_product *p, int64_t first, int64_t count, int16_t *q,
                                   float *scales) {
    const int64_t blocks = p->k_pad / I16_BLOCK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    float padded[I16_BLOCK];
    for (int64_t t = 0; t < count; t++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *v = int16_block_of((const float *)(p->x + (first + t) * p->x_row), p->k, b, padded);
            __m256 m = _mm256_setzero_ps();
            for (int i = 0; i < I16_BLOCK; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
            const float largest = hmax_avx2(m);
            const __m256 to_int = _mm256_set1_ps(largest > 0.0f ? I16_INPUT_LARGEST / largest : 0.0f);
            scales[t * blocks + b] = largest / I16_INPUT_LARGEST;
            for (int i = 0; i < I16_BLOCK; i += 16)
                avx2_store_int16(_mm256_loadu_ps(v + i), _mm256_loadu_ps(v + i + 8), to_int,
                                 q + t * p->k_pad + b * I16_BLOCK + i);
        }
}

/* 4 tokens x 16 outputs: each block's int32 sums in 8 registers, then scaled into `out` (in L1). */
AVX2 static void int16_tile_avx2(const struct int16_product *p, const int16_t *q, const float *q_scales,
                                 int64_t n0, int16_tile_t out) {
    const int64_t k = p->k_pad, blocks = k / I16_BLOCK, pairs = k / 2;
    const int16_t *w0 = p->w + (n0 / 8) * pairs * 16, *w1 = w0 + pairs * 16;
    const float *s0 = p->w_scales + (n0 / 8) * blocks * 8, *s1 = s0 + blocks * 8;
    const int32_t *x = (const int32_t *)q;
    for (int64_t b = 0; b < blocks; b++) {
        __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
                a31 = a00;
        for (int64_t i = b * I16_BLOCK / 2; i < (b + 1) * I16_BLOCK / 2; i++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + i * 16));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w1 + i * 16));
            __m256i xr;
#define LVA_I16_ROW(r)                                                   \
    xr = _mm256_set1_epi32(x[(r) * pairs + i]);                          \
    a##r##0 = _mm256_add_epi32(a##r##0, _mm256_madd_epi16(xr, v0));      \
    a##r##1 = _mm256_add_epi32(a##r##1, _mm256_madd_epi16(xr, v1));
            LVA_I16_ROW(0) LVA_I16_ROW(1) LVA_I16_ROW(2) LVA_I16_ROW(3)
#undef LVA_I16_ROW
        }
        const __m256i sums[I16_ROWS][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
        const __m256 w_scale[2] = {_mm256_loadu_ps(s0 + b * 8), _mm256_loadu_ps(s1 + b * 8)};
        for (int r = 0; r < I16_ROWS; r++) {
            const __m256 x_scale = _mm256_set1_ps(q_scales[r * blocks + b]);
            for (int c = 0; c < 2; c++)
                _mm256_storeu_ps(out[r] + 8 * c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][c]),
                                                                 _mm256_mul_ps(w_scale[c], x_scale),
                                                                 _mm256_loadu_ps(out[r] + 8 * c)));
        }
    }
}

#endif /* LVA_X86 */

static void int16_run(const struct int16_product *p, int path, int ith, int nth) {
    void (*round_tokens)(const struct int16_product *, int64_t, int64_t, int16_t *, float *) = int16_tokens_reference;
    void (*tile)(const struct int16_product *, const int16_t *, const float *, int64_t, int16_tile_t) =
        int16_tile_reference;
#ifdef LVA_X86
    if (path == PATH_AVX2 || path == PATH_AVX512BF16) round_tokens = int16_tokens_avx2, tile = int16_tile_avx2;
#else
    (void)path;
#endif
    const int64_t k = p->k_pad, blocks = k / I16_BLOCK;
    int16_t *q = NULL;
    float *q_scales = NULL;
    for (int64_t first = ith * I16_TOKEN_BLOCK; first < p->tokens; first += (int64_t)nth * I16_TOKEN_BLOCK) {
        if (!q) {
            q = scratch_alloc((size_t)(I16_TOKEN_BLOCK * k) * sizeof(int16_t));
            q_scales = scratch_alloc((size_t)(I16_TOKEN_BLOCK * blocks) * sizeof(float));
        }
        const int64_t count = min64(I16_TOKEN_BLOCK, p->tokens - first), rows = round_up(count, I16_ROWS);
        round_tokens(p, first, count, q, q_scales);
        memset(q + count * k, 0, (size_t)((rows - count) * k) * sizeof(int16_t));        /* a last partial tile */
        memset(q_scales + count * blocks, 0, (size_t)((rows - count) * blocks) * sizeof(float));
        for (int64_t outputs = 0; outputs < p->n_pad; outputs += I16_OUTPUT_BLOCK)
            for (int64_t t = 0; t < count; t += I16_ROWS)
                for (int64_t n0 = outputs; n0 < min64(outputs + I16_OUTPUT_BLOCK, p->n_pad); n0 += I16_COLUMNS) {
                    int16_tile_t out = {{0}};
                    tile(p, q + t * k, q_scales + t * blocks, n0, out);
                    for (int64_t r = 0; r < min64(I16_ROWS, count - t); r++)
                        memcpy((float *)(p->y + (first + t + r) * p->y_row) + n0, out[r],
                               (size_t)min64(I16_COLUMNS, p->n - n0) * sizeof(float));
                }
    }
    free(q);
    free(q_scales);
}

/* ---------------------------------------------------------------------------------------- entry points */

/* Bit `path` is set for each path this CPU can run (the OS saving the wider registers included). */
int lva_attention_paths(void) {
    int paths = 1 << PATH_REFERENCE;
#ifdef LVA_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths |= 1 << PATH_AVX2;  /* F16C: AVX2 CPUs */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bf16"))
        paths |= 1 << PATH_AVX512BF16;
#endif
    return paths;
}

/* The largest head dim the SIMD paths take (six 16-wide vectors of a value row). */
int lva_attention_max_head_dim(void) { return 96; }

void lva_attention(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const struct lva_attention_params *params = userdata;
    const struct ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2];
    const struct problem p = {
        .hd = q->ne[0] / params->heads, .heads = params->heads, .n_q = q->ne[1], .n_kv = k->ne[1],
        .real = params->real, .scale = params->scale,
        .q = q->data, .k = k->data, .v = v->data, .out = dst->data,
        .q_row = q->nb[1], .k_row = k->nb[1], .v_row = v->nb[1], .out_row = dst->nb[1],
    };
    const struct path *path = &reference_path;
#ifdef LVA_X86
    if (params->path == PATH_AVX2) path = &avx2_path;
    if (params->path == PATH_AVX512BF16) path = &avx512_path;
#endif
    run(path, &p, ith, nth);
}

/* dst = gelu(src[0] + src[1]): src[0] [n, rows] and dst F32 and contiguous, src[1] an F32 bias of n values
 * or absent; the userdata is the path (an int32). Each thread takes a contiguous run of rows. */
void lva_gelu(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const int32_t path = *(const int32_t *)userdata;
    const struct ggml_tensor *x = dst->src[0], *bias = dst->src[1];
    const int64_t n = x->ne[0], rows = x->ne[1] * x->ne[2] * x->ne[3];
    const int64_t first = rows * ith / nth, end = rows * (ith + 1) / nth;
    void (*gelu)(const float *, const float *, float *, int64_t) = gelu_reference;
#ifdef LVA_X86
    if (path == PATH_AVX2) gelu = gelu_avx2;
    if (path == PATH_AVX512BF16) gelu = gelu_avx512;
#endif
    for (int64_t r = first; r < end; r++)
        gelu((const float *)x->data + r * n, bias ? bias->data : NULL, (float *)dst->data + r * n, n);
}

/* dst = cross-attention of src[0] (queries) over src[1] (key) and src[2] (value_t); see its section. */
void lva_cross_attention(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const struct lva_cross_params *params = userdata;
    const struct ggml_tensor *q = dst->src[0], *key = dst->src[1], *value_t = dst->src[2];
    const int64_t hd = q->ne[0], n_q = q->ne[1], heads = q->ne[2], tokens = key->ne[1];
    void (*attend)(const struct cross *) = cross_reference;
#ifdef LVA_X86
    if (params->path == PATH_AVX2) attend = cross_avx2;
    if (params->path == PATH_AVX512BF16) attend = cross_avx512;
#endif
    float *scores = NULL;
    for (int64_t h = heads * ith / nth; h < heads * (ith + 1) / nth; h++) {
        if (!scores) scores = scratch_alloc((size_t)(n_q * tokens) * sizeof(float));
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

int lva_cross_attention_max_queries(void) { return CROSS_MAX_QUERIES; }

/* dst [n, tokens] = W x: src[0] the packed W (int16, lva_int16_pack: n rows of at least
 * lva_int16_packed_elements(k, n) / n), src[1] x [k, tokens] F32 with contiguous rows; dst F32. The userdata
 * is a `struct lva_int16_params`. */
void lva_int16_product(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const struct lva_int16_params *params = userdata;
    const struct ggml_tensor *w = dst->src[0], *x = dst->src[1];
    const int64_t k = x->ne[0], n = dst->ne[0], k_pad = round_up(k, I16_BLOCK), n_pad = round_up(n, I16_COLUMNS);
    const struct int16_product p = {
        .k = k, .n = n, .tokens = x->ne[1], .k_pad = k_pad, .n_pad = n_pad,
        .w = w->data, .w_scales = (const float *)((const int16_t *)w->data + k_pad * n_pad),
        .x = x->data, .y = dst->data, .x_row = x->nb[1], .y_row = dst->nb[1],
    };
    int16_run(&p, params->path, ith, nth);
}
