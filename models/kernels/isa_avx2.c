/* The kernels' SIMD sections compiled for AVX2 + FMA + F16C: 8 lanes of 32 bits.
 * Each kernel file is included here once, with LVA_SIMD_WIDTH set, so only its SIMD section is compiled;
 * that section's functions take this instruction set's names (SIMD() in simd.h). See lva.h. */

#include "lva.h"

#ifdef LVA_X86
LVA_TARGET_BEGIN("avx2,fma,f16c")
#define LVA_SIMD_WIDTH 8
#include "simd_sections.h"
LVA_TARGET_END
#endif /* LVA_X86 */
