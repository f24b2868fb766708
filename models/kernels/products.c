/* y = W x for the vision tower's F16 matrices, as a ggml custom op over weights packed once (`lva_pack`),
 * in one of three arithmetics:
 *
 *   F32    the weights widened exactly from F16, the activations as they are, F32 fused multiply-adds in
 *          register tiles (tile.h): no rounding but the sums', at the CPU's FMA rate.
 *   INT16  weights rounded to 14-bit integers and activations to 13-bit ones, each with one F32 scale per
 *          64 values along k, so 64 products of 8191 x 4095 fit an int32 (2146697280 < 2^31). About as fine
 *          as F16's rounding for all but a block's smallest values. vpmaddwd (VNNI's vpdpwssd on AVX-512)
 *          makes two multiply-adds per 32-bit lane, up to twice the FMA's rate.
 *   INT8   weights rounded to 7-bit integers (±127), each with one F32 scale per 64 values along k, and
 *          activations to the unsigned bytes VNNI's vpdpbusd takes: each 64 values of a token spread over
 *          0..255 from their smallest to their largest (0 included), with a scale and the integer `zero`
 *          that stands for 0. That is twice as fine as ±127 where a block's values are all of one sign
 *          and about as fine where they are symmetric; GELU's outputs, which the MLP's second product
 *          takes, are nearly all >= -0.17. Four multiply-adds per lane: up to four times the FMA's rate.
 *          AVX-512 with VNNI only. The few input
 *          channels a trained ViT's residual stream makes far larger than the rest would set the scale of
 *          their blocks and round the other values there away (the error grew 4x on the outlier checkpoint
 *          of bench/accuracy_bench.py), so in each block of tokens the channels whose largest value is more
 *          than OUTLIER_RATIO times the channels' mean largest are taken out (at most MAX_OUTLIERS) and
 *          multiplied in F32 by the weights of the F16 matrix, src[2]: a few multiply-adds per output.
 * Each block's int32 sums (less `zero` x the block's weight sum, for INT8) are scaled into the F32 outputs;
 * every instruction set computes the same integers and the same F32 operations in the same order, so the
 * paths agree to the bit with the reference, for every arithmetic.
 *
 * Layouts: src[0] = the packed W (lva_pack; an I8 tensor of lva_packed_bytes(arithmetic, k, n) / n bytes
 * per output, rounded up), src[1] = x [k, tokens] F32 with contiguous rows, (INT8) src[2] = W as it was
 * packed, F16 [k, n] with contiguous rows, dst = y [n, tokens] F32. The
 * userdata is a `struct lva_product_params`. Packed weights, outputs padded to 32 and k to 64 with zeros:
 *   F32           [n/32][k][32] F16: 32 outputs side by side for each input
 *   INT16, INT8   [n/16][k/g][16][g] integers (g = 2 int16 or 4 int8: the values one 32-bit lane takes),
 *                 then the scales [n/16][k/64][16] F32, then (INT8) [n/16][k/64][16] int32: each
 *                 block's integer sum.
 * Work split: threads take blocks of TOKEN_BLOCK tokens in turn and compute all their outputs: they copy
 * (F32) or round (integers) their tokens into their own scratch, then run tiles of a few tokens by two
 * vectors of outputs, OUTPUT_BLOCK outputs at a time so that the weights they read stay in L2.
 */

#include "lva.h"

/* ---------------------------------------------------------------------------------------- shared */

enum { BLOCK = 64, GROUP = 16, PANEL = 32, TOKEN_BLOCK = 96, OUTPUT_BLOCK = 256, K_CHUNK = 512, INT_ROWS = 4,
       MAX_OUTLIERS = 64 };
static const float OUTLIER_RATIO = 8.0f;

struct lva_product_params {
    int32_t arithmetic;                        /* enum lva_arithmetic */
    int32_t isa;                               /* enum lva_isa */
};

struct product {
    int arithmetic;
    int64_t k, n, tokens;                      /* as given */
    int64_t k_pad, n_pad;                      /* as packed */
    const void *w;                             /* packed values */
    const float *w_scales;                     /* INT16, INT8: their scales */
    const int32_t *w_sums;                     /* INT8: each block's sum of integer weights */
    const char *x;                             /* tokens of k F32 values, x_row bytes apart */
    char *y;                                   /* tokens of n F32 values, y_row bytes apart */
    size_t x_row, y_row;
    const char *original;                      /* INT8: W as F16, n rows of k, original_row bytes apart */
    size_t original_row;
};

/* Bytes of an integer value, and values per 32-bit lane; the largest integer of weights (and INT16 inputs). */
static inline int value_bytes(int arithmetic) { return arithmetic == LVA_INT8 ? 1 : 2; }
static inline int per_lane(int arithmetic) { return arithmetic == LVA_INT8 ? 4 : 2; }
static inline float weight_largest(int arithmetic) { return arithmetic == LVA_INT8 ? 127.0f : 8191.0f; }
enum { INT16_INPUT_LARGEST = 4095 };

/* Where value i of output o sits in a packed integer matrix (in values). */
static inline int64_t packed_at(int64_t o, int64_t i, int64_t k_pad, int g) {
    return (((o / GROUP) * (k_pad / g) + i / g) * GROUP + o % GROUP) * g + i % g;
}

/* One block of 64 values rounded to integers of at most `largest`, stored as int16 or int8; returns the
 * block's scale. Each instruction set has one. */
typedef float (*round_block_fn)(const float *values, void *q, float largest, int arithmetic);
float round_block_avx2(const float *values, void *q, float largest, int arithmetic);
float round_block_avx512(const float *values, void *q, float largest, int arithmetic);
/* One block of 64 INT8 inputs spread over the bytes 0..255, *zero standing for 0; returns the scale. */
typedef float (*spread_block_fn)(const float *values, uint8_t *q, int32_t *zero);
float spread_block_avx2(const float *values, uint8_t *q, int32_t *zero);
float spread_block_avx512(const float *values, uint8_t *q, int32_t *zero);
typedef void (*widen_fn)(const uint16_t *h, float *out, int64_t n);
void widen_avx2(const uint16_t *h, float *out, int64_t n);
void widen_avx512(const uint16_t *h, float *out, int64_t n);

void f32_product_avx2(const struct product *p, int64_t first, int64_t count, float *a);
void f32_product_avx512(const struct product *p, int64_t first, int64_t count, float *a);
void int_tile_avx2(const struct product *p, const void *q, const float *q_scales, const int32_t *q_zeros, int64_t n0,
                   float *out);
void int_tile_avx512(const struct product *p, const void *q, const float *q_scales, const int32_t *q_zeros, int64_t n0,
                     float *out);
/* y[i] = fmaf(a, x[i], y[i]) for i < n */
typedef void (*axpy_fn)(int64_t n, float a, const float *x, float *y);
void axpy_avx2(int64_t n, float a, const float *x, float *y);
void axpy_avx512(int64_t n, float a, const float *x, float *y);

/* The factor that spreads [low, high] (low <= 0 <= high) over 255 steps, and the scale of one step. */
static inline float spread_to_int(float low, float high) { return high > low ? 255.0f / (high - low) : 0.0f; }
static inline float spread_scale(float low, float high) { return (high - low) / 255.0f; }

#ifndef LVA_SIMD_WIDTH
/* ---------------------------------------------------------------------------------------- compiled once */

static float round_block_reference(const float *values, void *q, float largest, int arithmetic) {
    int32_t rounded[BLOCK];
    const float scale = lva_round_to_int(values, rounded, BLOCK, largest);
    for (int i = 0; i < BLOCK; i++) {
        if (arithmetic == LVA_INT16) ((int16_t *)q)[i] = (int16_t)rounded[i];
        else ((int8_t *)q)[i] = (int8_t)rounded[i];
    }
    return scale;
}

static float spread_block_reference(const float *values, uint8_t *q, int32_t *zero) {
    float low = 0.0f, high = 0.0f;
    for (int i = 0; i < BLOCK; i++) {
        low = fminf(low, values[i]);
        high = fmaxf(high, values[i]);
    }
    const float to_int = spread_to_int(low, high);
    *zero = -(int32_t)lrintf(low * to_int);
    for (int i = 0; i < BLOCK; i++) {
        const int32_t u = (int32_t)lrintf(values[i] * to_int) + *zero;
        q[i] = (uint8_t)(u < 0 ? 0 : u > 255 ? 255 : u);
    }
    return spread_scale(low, high);
}

static round_block_fn round_block_for(int isa) {
    return LVA_FOR_ISA(isa, round_block, round_block_reference);
}

static void widen_reference(const uint16_t *h, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = lva_f32_of_f16(h[i]);
}

/* Bytes of a packed k x n matrix. */
int64_t lva_packed_bytes(int arithmetic, int64_t k, int64_t n);
int64_t lva_packed_bytes(int arithmetic, int64_t k, int64_t n) {
    const int64_t k_pad = round_up(k, BLOCK), n_pad = round_up(n, PANEL), blocks = n_pad * (k_pad / BLOCK);
    if (arithmetic == LVA_F32) return n_pad * k * 2;
    return n_pad * k_pad * value_bytes(arithmetic) + blocks * 4 + (arithmetic == LVA_INT8 ? blocks * 4 : 0);
}

static void pack_f32(const uint16_t *w, int64_t k, int64_t n, size_t row_bytes, uint16_t *packed) {
    for (int64_t o = 0; o < round_up(n, PANEL); o++) {
        const uint16_t *row = (const uint16_t *)((const char *)w + o * row_bytes);
        uint16_t *panel = packed + (o / PANEL) * k * PANEL + o % PANEL;
        for (int64_t i = 0; i < k; i++) panel[i * PANEL] = o < n ? row[i] : 0;
    }
}

static void pack_integers(int arithmetic, int isa, const uint16_t *w, int64_t k, int64_t n, size_t row_bytes,
                          void *packed) {
    const round_block_fn round_block = round_block_for(isa);
    const widen_fn widen = LVA_FOR_ISA(isa, widen, widen_reference);
    const int64_t k_pad = round_up(k, BLOCK), n_pad = round_up(n, PANEL), blocks = k_pad / BLOCK;
    const int g = per_lane(arithmetic), bytes = value_bytes(arithmetic);
    float *scales = (float *)((char *)packed + n_pad * k_pad * bytes), values[BLOCK];
    int32_t *sums = (int32_t *)(scales + n_pad * blocks);
    int16_t q[BLOCK];                          /* int16 values, or int8 ones in its first 64 bytes */
    for (int64_t o = 0; o < n_pad; o++)
        for (int64_t b = 0; b < blocks; b++) {
            const uint16_t *row = (const uint16_t *)((const char *)w + o * row_bytes);
            if (o < n && (b + 1) * BLOCK <= k) widen(row + b * BLOCK, values, BLOCK);
            else
                for (int64_t i = 0; i < BLOCK; i++)
                    values[i] = o < n && b * BLOCK + i < k ? lva_f32_of_f16(row[b * BLOCK + i]) : 0.0f;
            const int64_t at = ((o / GROUP) * blocks + b) * GROUP + o % GROUP;
            scales[at] = round_block(values, q, weight_largest(arithmetic), arithmetic);
            int32_t sum = 0;
            for (int i = 0; i < BLOCK; i++) {
                const int64_t to = packed_at(o, b * BLOCK + i, k_pad, g);
                if (bytes == 2) ((int16_t *)packed)[to] = q[i];
                else sum += ((int8_t *)packed)[to] = ((const int8_t *)q)[i];
            }
            if (arithmetic == LVA_INT8) sums[at] = sum;
        }
}

/* Packs w, F16 [k, n] in ggml order (n rows of k, row_bytes apart), for `arithmetic`, into `packed`
 * (lva_packed_bytes of memory). The result does not depend on the instruction set. */
void lva_pack(int arithmetic, int isa, const uint16_t *w, int64_t k, int64_t n, size_t row_bytes, void *packed);
void lva_pack(int arithmetic, int isa, const uint16_t *w, int64_t k, int64_t n, size_t row_bytes, void *packed) {
    if (arithmetic == LVA_F32) pack_f32(w, k, n, row_bytes, packed);
    else pack_integers(arithmetic, isa, w, k, n, row_bytes, packed);
}

/* Whether this build has the arithmetic on the instruction set (the CPU's support aside). */
int lva_product_has(int arithmetic, int isa);
int lva_product_has(int arithmetic, int isa) {
    if (arithmetic == LVA_BF16) return 0;
    if (isa == LVA_REFERENCE) return 1;
#ifdef LVA_X86
    return arithmetic != LVA_INT8 || isa == LVA_AVX512 || isa == LVA_AVX512_BF16;
#else
    return 0;
#endif
}

/* The reference tile: INT_ROWS tokens x 2 * 16 outputs from n0, each block's exact int32 sum scaled in. */
static void int_tile_reference(const struct product *p, const void *q, const float *q_scales, const int32_t *q_zeros,
                               int64_t n0, float *out) {
    const int64_t k = p->k_pad, blocks = k / BLOCK, columns = 2 * GROUP;
    const int g = per_lane(p->arithmetic);
    for (int64_t b = 0; b < blocks; b++)
        for (int r = 0; r < INT_ROWS; r++)
            for (int c = 0; c < columns; c++) {
                const int64_t o = n0 + c, at = ((o / GROUP) * blocks + b) * GROUP + o % GROUP;
                int32_t sum = 0;
                for (int64_t i = b * BLOCK; i < (b + 1) * BLOCK; i++) {
                    const int64_t w_at = packed_at(o, i, k, g);
                    if (p->arithmetic == LVA_INT16)
                        sum += (int32_t)((const int16_t *)q)[r * k + i] * ((const int16_t *)p->w)[w_at];
                    else
                        sum += (int32_t)((const uint8_t *)q)[r * k + i] * ((const int8_t *)p->w)[w_at];
                }
                if (p->arithmetic == LVA_INT8) sum -= q_zeros[r * blocks + b] * p->w_sums[at];
                const float scale = p->w_scales[at] * q_scales[r * blocks + b];
                out[r * columns + c] = fmaf((float)sum, scale, out[r * columns + c]);
            }
}

/* The reference F32 product of a block of tokens (a: its rows, zero-padded, k apart): fmaf chains in k order. */
static void f32_product_reference(const struct product *p, int64_t first, int64_t count, float *a) {
    for (int64_t t = 0; t < count; t++)
        for (int64_t o = 0; o < p->n; o++) {
            const uint16_t *panel = (const uint16_t *)p->w + (o / PANEL) * p->k * PANEL + o % PANEL;
            float sum = 0.0f;
            for (int64_t i = 0; i < p->k; i++) sum = fmaf(a[t * p->k + i], lva_f32_of_f16(panel[i * PANEL]), sum);
            ((float *)(p->y + (first + t) * p->y_row))[o] = sum;
        }
}

static void f32_run(const struct product *p, int isa, int ith, int nth) {
    void (*block)(const struct product *, int64_t, int64_t, float *) =
        LVA_FOR_ISA(isa, f32_product, f32_product_reference);
    float *a = NULL;
    for (int64_t first = ith * TOKEN_BLOCK; first < p->tokens; first += (int64_t)nth * TOKEN_BLOCK) {
        if (!a) a = lva_scratch((size_t)(TOKEN_BLOCK * p->k) * sizeof(float));
        const int64_t count = min64(TOKEN_BLOCK, p->tokens - first);
        for (int64_t t = 0; t < TOKEN_BLOCK; t++) {
            if (t < count) memcpy(a + t * p->k, p->x + (first + t) * p->x_row, (size_t)p->k * sizeof(float));
            else memset(a + t * p->k, 0, (size_t)p->k * sizeof(float));
        }
        block(p, first, count, a);
    }
    free(a);
}

static void axpy_reference(int64_t n, float a, const float *x, float *y) {
    for (int64_t i = 0; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

/* INT8's outlier channels of a block of tokens, in channel order: the channels whose largest |x| exceeds
 * OUTLIER_RATIO times the mean of every channel's, at most MAX_OUTLIERS (the largest). `largest` is k floats
 * of scratch. */
static int find_outliers(const struct product *p, int64_t first, int64_t count, float *largest, int64_t *channels) {
    memset(largest, 0, (size_t)p->k * sizeof(float));
    for (int64_t t = 0; t < count; t++) {
        const float *row = (const float *)(p->x + (first + t) * p->x_row);
        for (int64_t c = 0; c < p->k; c++) {
            const float v = fabsf(row[c]);
            largest[c] = v > largest[c] ? v : largest[c];          /* maxps: vectorised */
        }
    }
    double mean = 0;
    for (int64_t c = 0; c < p->k; c++) mean += largest[c];
    const float threshold = (float)(OUTLIER_RATIO * mean / (double)p->k);
    int found = 0;
    while (found < MAX_OUTLIERS) {                 /* the largest first, until none is above the threshold */
        int64_t top = -1;
        for (int64_t c = 0; c < p->k; c++)
            if (largest[c] > threshold && (top < 0 || largest[c] > largest[top])) top = c;
        if (top < 0) break;
        channels[found++] = top;
        largest[top] = 0.0f;
    }
    for (int i = 1; i < found; i++)                /* channel order: the F32 sums go in a fixed order */
        for (int j = i; j > 0 && channels[j - 1] > channels[j]; j--) {
            const int64_t swap = channels[j];
            channels[j] = channels[j - 1];
            channels[j - 1] = swap;
        }
    return found;
}

/* The F16 weights of the outlier channels, widened: columns[j][o] = W[o][channels[j]]. */
static void gather_columns(const struct product *p, const int64_t *channels, int found, float *columns) {
    for (int j = 0; j < found; j++)
        for (int64_t o = 0; o < p->n; o++)
            columns[j * p->n + o] = lva_f32_of_f16(((const uint16_t *)(p->original + o * p->original_row))[channels[j]]);
}

static void int_run(const struct product *p, int isa, int ith, int nth) {
    round_block_fn round_block = round_block_for(isa);
    spread_block_fn spread_block = LVA_FOR_ISA(isa, spread_block, spread_block_reference);
    void (*tile)(const struct product *, const void *, const float *, const int32_t *, int64_t, float *) =
        LVA_FOR_ISA(isa, int_tile, int_tile_reference);
    axpy_fn axpy = LVA_FOR_ISA(isa, axpy, axpy_reference);
    const int64_t k = p->k_pad, blocks = k / BLOCK, bytes = value_bytes(p->arithmetic);
    const int split = p->arithmetic == LVA_INT8;
    char *q = NULL;
    float *q_scales = NULL, *row = NULL, *columns = NULL;
    int32_t *q_zeros = NULL;
    int64_t channels[MAX_OUTLIERS];
    for (int64_t first = ith * TOKEN_BLOCK; first < p->tokens; first += (int64_t)nth * TOKEN_BLOCK) {
        if (!q) {
            q = lva_scratch((size_t)(TOKEN_BLOCK * k * bytes));
            q_scales = lva_scratch((size_t)(TOKEN_BLOCK * blocks) * sizeof(float));
            q_zeros = lva_scratch((size_t)(TOKEN_BLOCK * blocks) * sizeof(int32_t));
            row = lva_scratch((size_t)k * sizeof(float));
            if (split) columns = lva_scratch((size_t)(MAX_OUTLIERS * p->n) * sizeof(float));
        }
        const int64_t count = min64(TOKEN_BLOCK, p->tokens - first), rows = round_up(count, INT_ROWS);
        const int outliers = split ? find_outliers(p, first, count, row, channels) : 0;
        for (int64_t t = 0; t < count; t++) {      /* the tokens, zero-padded to k_pad, less their outliers */
            memcpy(row, p->x + (first + t) * p->x_row, (size_t)p->k * sizeof(float));
            memset(row + p->k, 0, (size_t)(k - p->k) * sizeof(float));
            for (int j = 0; j < outliers; j++) row[channels[j]] = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                char *into = q + (t * k + b * BLOCK) * bytes;
                q_scales[t * blocks + b] = split ? spread_block(row + b * BLOCK, (uint8_t *)into, q_zeros + t * blocks + b)
                                                 : round_block(row + b * BLOCK, into, INT16_INPUT_LARGEST, LVA_INT16);
            }
        }
        memset(q + count * k * bytes, 0, (size_t)((rows - count) * k * bytes));        /* a last partial tile */
        memset(q_scales + count * blocks, 0, (size_t)((rows - count) * blocks) * sizeof(float));
        memset(q_zeros + count * blocks, 0, (size_t)((rows - count) * blocks) * sizeof(int32_t));
        for (int64_t outputs = 0; outputs < p->n_pad; outputs += OUTPUT_BLOCK)
            for (int64_t t = 0; t < count; t += INT_ROWS)
                for (int64_t n0 = outputs; n0 < min64(outputs + OUTPUT_BLOCK, p->n_pad); n0 += 2 * GROUP) {
                    float out[INT_ROWS * 2 * GROUP] = {0};
                    tile(p, q + t * k * bytes, q_scales + t * blocks, q_zeros + t * blocks, n0, out);
                    for (int64_t r = 0; r < min64(INT_ROWS, count - t); r++)
                        memcpy((float *)(p->y + (first + t + r) * p->y_row) + n0, out + r * 2 * GROUP,
                               (size_t)min64(2 * GROUP, p->n - n0) * sizeof(float));
                }
        if (!outliers) continue;
        gather_columns(p, channels, outliers, columns);
        for (int64_t t = 0; t < count; t++) {      /* the outlier channels' share, in F32 */
            const float *x = (const float *)(p->x + (first + t) * p->x_row);
            for (int j = 0; j < outliers; j++)
                axpy(p->n, x[channels[j]], columns + j * p->n, (float *)(p->y + (first + t) * p->y_row));
        }
    }
    free(q);
    free(q_scales);
    free(q_zeros);
    free(row);
    free(columns);
}

void lva_product(struct ggml_tensor *dst, int ith, int nth, void *userdata);
void lva_product(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const struct lva_product_params *params = userdata;
    const struct ggml_tensor *w = dst->src[0], *x = dst->src[1], *original = dst->src[2];
    const int64_t k = x->ne[0], n = dst->ne[0], k_pad = round_up(k, BLOCK), n_pad = round_up(n, PANEL);
    const int64_t values = n_pad * k_pad * value_bytes(params->arithmetic);
    const float *scales = (const float *)((const char *)w->data + values);
    const struct product p = {
        .arithmetic = params->arithmetic, .k = k, .n = n, .tokens = x->ne[1], .k_pad = k_pad, .n_pad = n_pad,
        .w = w->data, .w_scales = scales, .w_sums = (const int32_t *)(scales + n_pad * (k_pad / BLOCK)),
        .x = x->data, .y = dst->data, .x_row = x->nb[1], .y_row = dst->nb[1],
        .original = original ? original->data : NULL, .original_row = original ? original->nb[1] : 0,
    };
    if (params->arithmetic == LVA_F32) f32_run(&p, params->isa, ith, nth);
    else int_run(&p, params->isa, ith, nth);
}

#else
/* ---------------------------------------------------------------------------------------- per instruction set */

#include "tile.h"

void SIMD(widen)(const uint16_t *h, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) vf32_store(out + i, vf32_load_f16(h + i));
    for (; i < n; i++) out[i] = lva_f32_of_f16(h[i]);
}

float SIMD(round_block)(const float *values, void *q, float largest, int arithmetic) {
    vf32 m = vf32_zero();
    for (int i = 0; i < BLOCK; i += LANES) m = vf32_max(m, vf32_abs(vf32_load(values + i)));
    const float block_largest = vf32_hmax(m);
    const vf32 to_int = vf32_set1(block_largest > 0.0f ? largest / block_largest : 0.0f);
    for (int i = 0; i < BLOCK; i += LANES) {
        const vi32 rounded = vf32_round(vf32_mul(vf32_load(values + i), to_int));
        if (arithmetic == LVA_INT16) vi32_store_i16((int16_t *)q + i, rounded);
        else vi32_store_i8((int8_t *)q + i, rounded);
    }
    return block_largest / largest;
}

float SIMD(spread_block)(const float *values, uint8_t *q, int32_t *zero) {
    vf32 low = vf32_zero(), high = vf32_zero();
    for (int i = 0; i < BLOCK; i += LANES) {
        low = vf32_min(low, vf32_load(values + i));
        high = vf32_max(high, vf32_load(values + i));
    }
    const float block_low = vf32_hmin(low), block_high = vf32_hmax(high), to_int = spread_to_int(block_low, block_high);
    *zero = -(int32_t)lrintf(block_low * to_int);
    const vi32 offset = vi32_set1(*zero);
    for (int i = 0; i < BLOCK; i += LANES)       /* >= 0: x >= low; stored with saturation at 255 */
        vi32_store_u8(q + i, vi32_add(vf32_round(vf32_mul(vf32_load(values + i), vf32_set1(to_int))), offset));
    return spread_scale(block_low, block_high);
}

/* A block of tokens against every output, K_CHUNK inputs at a time: each tile reads its slice of a panel
 * (K_CHUNK x 2 LANES halves) from L1 and the block's rows from L2. */
void SIMD(f32_product)(const struct product *p, int64_t first, int64_t count, float *a) {
    const uint16_t *w = p->w;
    float spill[TILE_ROWS * 2 * LANES];
    for (int64_t kc = 0; kc < p->k; kc += K_CHUNK) {
        const int64_t depth = min64(K_CHUNK, p->k - kc);
        for (int64_t n0 = 0; n0 < p->n; n0 += 2 * LANES) {
            const uint16_t *slice = w + (n0 / PANEL) * p->k * PANEL + kc * PANEL + n0 % PANEL;
            for (int64_t t = 0; t < count; t += TILE_ROWS) {
                float *c = (float *)(p->y + (first + t) * p->y_row) + n0;
                const size_t ldc = p->y_row / sizeof(float);
                const int64_t rows = min64(TILE_ROWS, count - t), columns = min64(2 * LANES, p->n - n0);
                if (rows == TILE_ROWS && columns == 2 * LANES) {
                    tile_f32(a + (t * p->k + kc), (size_t)p->k, slice, PANEL, 1, depth, c, ldc, kc > 0, 2);
                    continue;
                }
                for (int64_t r = 0; r < rows && kc > 0; r++) memcpy(spill + r * 2 * LANES, c + r * ldc, (size_t)columns * 4);
                tile_f32(a + (t * p->k + kc), (size_t)p->k, slice, PANEL, 1, depth, spill, 2 * LANES, kc > 0, 2);
                for (int64_t r = 0; r < rows; r++) memcpy(c + r * ldc, spill + r * 2 * LANES, (size_t)columns * 4);
            }
        }
    }
}

/* INT_ROWS tokens x 2 * 16 outputs from n0 (two vectors at AVX-512's 16 lanes, four at AVX2's 8): each
 * block's int32 sums in registers, then scaled into `out` (in L1). */
LVA_INLINE void int_tile(const struct product *p, const void *q, const float *q_scales, const int32_t *q_zeros,
                         int64_t n0, float *out, const int int8) {
    enum { VECTORS = 2 * GROUP / LANES };
    const int64_t k = p->k_pad, blocks = k / BLOCK;
    const int g = int8 ? 4 : 2, bytes = int8 ? 1 : 2;
    const int64_t lanes_k = k / g;            /* 32-bit lanes along k */
    const char *w[VECTORS];
    for (int v = 0; v < VECTORS; v++) {
        const int64_t o = n0 + v * LANES;
        w[v] = (const char *)p->w + ((o / GROUP) * lanes_k * GROUP + o % GROUP) * g * bytes;
    }
    const int32_t *x = q;
    for (int64_t b = 0; b < blocks; b++) {
        vi32 acc[INT_ROWS][VECTORS];
        for (int r = 0; r < INT_ROWS; r++)
            for (int v = 0; v < VECTORS; v++) acc[r][v] = vi32_zero();
        for (int64_t i = b * BLOCK / g; i < (b + 1) * BLOCK / g; i++) {
            vi32 column[VECTORS];
            for (int v = 0; v < VECTORS; v++) column[v] = vi32_load(w[v] + i * GROUP * 4);
#pragma GCC unroll 4
            for (int r = 0; r < INT_ROWS; r++) {
                const vi32 xr = vi32_set1(x[r * lanes_k + i]);
                for (int v = 0; v < VECTORS; v++)
#ifdef LVA_SIMD_DOT_U8I8
                    acc[r][v] = int8 ? vi32_dot_u8i8(acc[r][v], xr, column[v]) : vi32_dot_i16(acc[r][v], xr, column[v]);
#else
                    acc[r][v] = vi32_dot_i16(acc[r][v], xr, column[v]);
#endif
            }
        }
        for (int v = 0; v < VECTORS; v++) {
            const int64_t o = n0 + v * LANES, at = ((o / GROUP) * blocks + b) * GROUP + o % GROUP;
            const vf32 w_scale = vf32_load(p->w_scales + at);
            const vi32 w_sum = int8 ? vi32_load(p->w_sums + at) : vi32_zero();
            for (int r = 0; r < INT_ROWS; r++) {
                float *into = out + r * 2 * GROUP + v * LANES;
                const vf32 scale = vf32_mul(w_scale, vf32_set1(q_scales[r * blocks + b]));
                const vi32 sum = int8 ? vi32_sub(acc[r][v], vi32_mul(w_sum, vi32_set1(q_zeros[r * blocks + b]))) : acc[r][v];
                vf32_store(into, vf32_fma(vf32_of_i32(sum), scale, vf32_load(into)));
            }
        }
    }
}

void SIMD(axpy)(int64_t n, float a, const float *x, float *y) {
    const vf32 va = vf32_set1(a);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) vf32_store(y + i, vf32_fma(va, vf32_load(x + i), vf32_load(y + i)));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

void SIMD(int_tile)(const struct product *p, const void *q, const float *q_scales, const int32_t *q_zeros, int64_t n0,
                    float *out) {
#ifdef LVA_SIMD_DOT_U8I8
    if (p->arithmetic == LVA_INT8) {
        int_tile(p, q, q_scales, q_zeros, n0, out, 1);
        return;
    }
#endif
    int_tile(p, q, q_scales, q_zeros, n0, out, 0);
}

#endif /* LVA_SIMD_WIDTH */
