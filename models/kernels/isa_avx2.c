/* The kernels' SIMD sections compiled for AVX2 + FMA + F16C: 8 lanes of 32 bits.
 * Each kernel file is included here once, with LVA_SIMD_WIDTH set, so only its SIMD section is compiled;
 * that section's functions take this instruction set's names (SIMD() in simd.h). See lva.h. */

#include "lva.h"

#ifdef LVA_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define LVA_SIMD_WIDTH 8
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
