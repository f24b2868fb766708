/* The kernels' SIMD sections compiled for AVX-512 F, BW, DQ, VL and VNNI: 16 lanes of 32 bits (the BF16 attention adds AVX512_BF16).
 * Each kernel file is included here once, with LVA_SIMD_WIDTH set, so only its SIMD section is compiled;
 * that section's functions take this instruction set's names (SIMD() in simd.h). See lva.h. */

#include "lva.h"

#ifdef LVA_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")
#endif

#define LVA_SIMD_WIDTH 16
#include "simd.h"
#include "attention.c"
#include "cross_attention.c"
#include "gelu.c"
#include "products.c"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif /* LVA_X86 */
