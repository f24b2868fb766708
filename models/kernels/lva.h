/* What every kernel file shares: ggml's tensor as lva reads it, the instruction sets and arithmetics a
 * kernel runs in, scratch memory, and the 16-bit float conversions.
 *
 * The library is lva's CPU kernels where ggml 0.3.36's are slow, as ggml custom ops (`ggml_custom_4d`),
 * one file per kernel: attention.c (the vision encoder's fused attention), gelu.c, cross_attention.c (a
 * decoded token's attention over an image's K/V), products.c (the vision tower's matrix products).
 *
 * One body per kernel. Each kernel file is compiled three times: on its own (its entry point, the work
 * split and a scalar reference path), and inside isa_avx2.c and isa_avx512.c, which set LVA_SIMD_WIDTH
 * and the instruction set; there only the file's SIMD section is compiled, written once over the width
 * layer of simd.h (as ggml's ggml-cpu/simd-mappings.h does), so the AVX2 and AVX-512 versions cannot
 * drift apart. Which instruction set runs is the caller's choice (models/kernels/paths.py), made by
 * measuring them; `lva_isas` says which this CPU can run.
 */

#ifndef LVA_H
#define LVA_H

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

/* The fields of `struct ggml_tensor` read here mirror ggml.h of llama-cpp-python 0.3.36, as models/ggml.py's
 * TensorStruct does; `lva_tensor_offsets` lets Python check that they agree before any kernel runs. */
struct ggml_tensor {
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

/* ---------------------------------------------------------------------------------------- paths */

/* Instruction sets (bits of `lva_isas`). AVX2 means AVX2 + FMA + F16C; AVX-512 means F, BW, DQ, VL and
 * VNNI (Cascade Lake, Ice Lake, Zen 4 and later); AVX512_BF16 additionally BF16 dot products. */
enum lva_isa { LVA_REFERENCE = 0, LVA_AVX2 = 1, LVA_AVX512 = 2, LVA_AVX512_BF16 = 3 };

/* The copy of function `name` compiled for `isa` (name_avx2 or name_avx512, see isa_*.c), or `fallback`
 * where this build has none: every kernel dispatches this one way. */
#ifdef LVA_X86
#define LVA_FOR_ISA(isa, name, fallback) \
    ((isa) == LVA_AVX2 ? name##_avx2 : ((isa) == LVA_AVX512 || (isa) == LVA_AVX512_BF16) ? name##_avx512 : (fallback))
#else
#define LVA_FOR_ISA(isa, name, fallback) ((void)(isa), (fallback))
#endif

/* What follows LVA_TARGET_BEGIN("avx2,fma,...") is compiled for those instruction sets, up to LVA_TARGET_END
 * (isa_avx2.c, isa_avx512.c); the rest of the library stays baseline x86-64. */
#define LVA_PRAGMA(text) _Pragma(#text)
#if defined(__clang__)
#define LVA_TARGET_BEGIN(features) \
    LVA_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define LVA_TARGET_END LVA_PRAGMA(clang attribute pop)
#else
#define LVA_TARGET_BEGIN(features) LVA_PRAGMA(GCC push_options) LVA_PRAGMA(GCC target(features))
#define LVA_TARGET_END LVA_PRAGMA(GCC pop_options)
#endif

/* The arithmetic of a kernel (models/kernels/paths.py: Arithmetic). */
enum lva_arithmetic { LVA_F32 = 0, LVA_INT16 = 1, LVA_INT8 = 2, LVA_BF16 = 3 };

/* ---------------------------------------------------------------------------------------- helpers */

#define LVA_INLINE static inline __attribute__((always_inline))

LVA_INLINE int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }
LVA_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* 64-byte aligned memory for one thread's scratch, freed with free(); aborts when there is none, as ggml
 * does when a CPU op cannot get memory. */
void *lva_scratch(size_t bytes);

/* IEEE half and bfloat16 <-> float, exactly (bf16_of rounds to nearest even; NaN stays NaN). */
float lva_f32_of_f16(uint16_t h);
uint16_t lva_bf16_of(float f);

/* Rounds `values` (n of them) to integers of at most `limit` in magnitude with one scale; returns the scale.
 * lrintf rounds to nearest even, as the SIMD conversions do. The integer arithmetics all round this way. */
float lva_round_to_int(const float *values, int32_t *q, int n, float limit);

/* ---------------------------------------------------------------------------------------- entry points */

int lva_isas(void);
void lva_tensor_offsets(size_t out[5]);

#endif /* LVA_H */
