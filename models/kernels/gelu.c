/* y = gelu(x + bias), gelu(x) = x/2 (1 + erf(x/√2)), as a ggml custom op: the activation of the encoder's
 * MLP (the model's erf form), with the bias of the product before it added on the way, which saves the
 * graph a pass over the [5120, tokens] activations. ggml 0.3.36 computes GELU one element at a time
 * (libm's erff, or a lookup in an F16 table of the tanh form); this one is vectorised.
 *
 * erf is the rational approximation Eigen and XLA use for float (coefficients from Eigen's
 * generic_fast_erf_float, MPL-2.0): x·P(x²)/Q(x²) on [-4, 4], beyond which erf is ±1 in float. Every
 * instruction set evaluates the same formula; within 2.5e-7 × max(1, |x|) of the exact GELU.
 *
 * Layouts: src[0] = x [n, rows...] and dst F32 and contiguous, src[1] an F32 bias of n values or absent.
 * The userdata is the instruction set (an int32). Each thread takes a contiguous run of rows.
 */

#include "lva.h"

/* ---------------------------------------------------------------------------------------- shared */

static const float ERF_P[7] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                               -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                               -1.60960333262415e-02f};
static const float ERF_Q[5] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                               -7.37332916720468e-03f, -1.42647390514189e-02f};
#define SQRT_HALF 0.70710678118654752f

/* One row of n values; bias is NULL or n values. The SIMD bodies finish their rows' tails with it. */
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

void gelu_avx2(const float *x, const float *bias, float *y, int64_t n);
void gelu_avx512(const float *x, const float *bias, float *y, int64_t n);

#ifndef LVA_SIMD_WIDTH
/* ---------------------------------------------------------------------------------------- compiled once */

void lva_gelu(struct ggml_tensor *dst, int ith, int nth, void *userdata);
void lva_gelu(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const int32_t isa = *(const int32_t *)userdata;
    const struct ggml_tensor *x = dst->src[0], *bias = dst->src[1];
    const int64_t n = x->ne[0], rows = x->ne[1] * x->ne[2] * x->ne[3];
    const int64_t first = rows * ith / nth, end = rows * (ith + 1) / nth;
    void (*gelu)(const float *, const float *, float *, int64_t) = LVA_FOR_ISA(isa, gelu, gelu_reference);
    for (int64_t r = first; r < end; r++)
        gelu((const float *)x->data + r * n, bias ? bias->data : NULL, (float *)dst->data + r * n, n);
}

#else
/* ---------------------------------------------------------------------------------------- per instruction set */

void SIMD(gelu)(const float *x, const float *bias, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf32 v = vf32_load(x + i);
        if (bias) v = vf32_add(v, vf32_load(bias + i));
        const vf32 z = vf32_min(vf32_max(vf32_mul(v, vf32_set1(SQRT_HALF)), vf32_set1(-4.0f)), vf32_set1(4.0f));
        const vf32 z2 = vf32_mul(z, z);
        vf32 p = vf32_set1(ERF_P[0]), q = vf32_set1(ERF_Q[0]);
        for (int c = 1; c < 7; c++) p = vf32_fma(p, z2, vf32_set1(ERF_P[c]));
        for (int c = 1; c < 5; c++) q = vf32_fma(q, z2, vf32_set1(ERF_Q[c]));
        const vf32 erf = vf32_div(vf32_mul(z, p), q), half_v = vf32_mul(v, vf32_set1(0.5f));
        vf32_store(y + i, vf32_fma(half_v, erf, half_v));
    }
    gelu_reference(x + i, bias ? bias + i : NULL, y + i, n - i);
}

#endif /* LVA_SIMD_WIDTH */
