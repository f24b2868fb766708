/* The kernels' SIMD sections compiled for AVX-512 F, BW, DQ, VL and VNNI: 16 lanes of 32 bits (the BF16 attention adds AVX512_BF16).
 * Each kernel file is included here once, with LVA_SIMD_WIDTH set, so only its SIMD section is compiled;
 * that section's functions take this instruction set's names (SIMD() in simd.h). See lva.h. */

#include "lva.h"

#ifdef LVA_X86
LVA_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")
#define LVA_SIMD_WIDTH 16
#include "simd_sections.h"
LVA_TARGET_END
#endif /* LVA_X86 */
