/* Every kernel's SIMD section, compiled once per instruction set: isa_avx2.c and isa_avx512.c set
 * LVA_SIMD_WIDTH and the target, then include this. A new kernel's file goes in this list. */

#include "simd.h"
#include "attention.c"
#include "cross_attention.c"
#include "gelu.c"
#include "products.c"
