/* The F32 register tile that the F32 attention and the F32 matrix product share: a few rows of A times a
 * slice of B, held in vector registers across the whole sum (after the micro-kernels of BLIS and of torch's
 * FlashAttentionKernel.cpp: broadcast an element of A, multiply a vector of B). Included by kernel files in
 * their SIMD section, after simd.h.
 *
 *     C[r][j] (+)= sum_i A[r][i] * B[i][j]      r < TILE_ROWS, j < vectors * LANES (vectors: 1 or 2)
 *
 * A is F32 with rows lda floats apart; B is F32 or IEEE half (widened exactly), rows ldb elements apart;
 * C rows are ldc floats apart. Each output is one chain of fused multiply-adds in the order of i, so a
 * scalar loop of fmaf in the same order gives the same bits. TILE_ROWS x 2 accumulators fill AVX2's 16
 * registers (6 x 2 + 3) and AVX-512's 32 (12 x 2 + 3).
 */

#ifndef LVA_TILE_H
#define LVA_TILE_H

#define TILE_ROWS (LANES == 16 ? 12 : 6)

LVA_INLINE void tile_f32(const float *a, size_t lda, const void *b, size_t ldb, int b_is_f16, int64_t k, float *c,
                         size_t ldc, int accumulate, const int vectors) {
    vf32 acc[TILE_ROWS][2];
#pragma GCC unroll 12
    for (int r = 0; r < TILE_ROWS; r++)
#pragma GCC unroll 2
        for (int v = 0; v < vectors; v++) acc[r][v] = accumulate ? vf32_load(c + r * ldc + v * LANES) : vf32_zero();
    for (int64_t i = 0; i < k; i++) {
        vf32 column[2];
#pragma GCC unroll 2
        for (int v = 0; v < vectors; v++)
            column[v] = b_is_f16 ? vf32_load_f16((const uint16_t *)b + i * ldb + v * LANES)
                                 : vf32_load((const float *)b + i * ldb + v * LANES);
#pragma GCC unroll 12
        for (int r = 0; r < TILE_ROWS; r++) {
            const vf32 element = vf32_set1(a[r * lda + i]);
#pragma GCC unroll 2
            for (int v = 0; v < vectors; v++) acc[r][v] = vf32_fma(element, column[v], acc[r][v]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < TILE_ROWS; r++)
#pragma GCC unroll 2
        for (int v = 0; v < vectors; v++) vf32_store(c + r * ldc + v * LANES, acc[r][v]);
}

#endif /* LVA_TILE_H */
