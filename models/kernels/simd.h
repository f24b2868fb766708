/* The SIMD width layer: the vector types and operations the kernels' SIMD bodies are written in, for the
 * instruction set of the file that includes it (isa_avx2.c: 8 lanes of 32 bits; isa_avx512.c: 16 lanes).
 * After ggml's ggml-cpu/simd-mappings.h (MIT): one name per operation, one definition per width.
 *
 *   vf32 / vi32            a vector of LANES floats / 32-bit integers
 *   vf32_fma(a, b, c)      a * b + c, fused; vf32_fnma(a, b, c): c - a * b, fused
 *   vf32_load_f16(p)       LANES IEEE halves, widened exactly
 *   vf32_exp(x)            e^x for x <= 0: Cephes' expf (public domain), within 2 ulp; below -87 a tiny
 *                          normal number instead of 0, negligible next to a softmax row's largest term, 1
 *   vf32_keep(v, n, fill)  v with the lanes from n on replaced by fill (a row's last, partial vector)
 *   vi32_dot_i16(acc, a, b)   acc + a0*b0 + a1*b1 per lane, for pairs of int16 (vpmaddwd; AVX-512: VNNI)
 *   vi32_dot_u8i8(acc, a, b)  acc + the four u8 x s8 products per lane (VNNI; AVX-512 only here)
 *   vi32_store_i16(q, v)   LANES integers narrowed to int16, with saturation
 *   vi32_store_i8(q, v)    LANES integers narrowed to int8, with saturation
 *   vi32_store_u8(q, v)    LANES integers narrowed to uint8, with saturation
 *   SIMD(name)             the instruction set's name for a function a kernel file exports to its entry
 */

#if LVA_SIMD_WIDTH == 8

#define LANES 8
#define SIMD(name) name##_avx2
typedef __m256 vf32;
typedef __m256i vi32;

#define vf32_zero() _mm256_setzero_ps()
#define vf32_set1(x) _mm256_set1_ps(x)
#define vf32_load(p) _mm256_loadu_ps(p)
#define vf32_store(p, v) _mm256_storeu_ps((p), (v))
#define vf32_load_f16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define vf32_add(a, b) _mm256_add_ps((a), (b))
#define vf32_sub(a, b) _mm256_sub_ps((a), (b))
#define vf32_mul(a, b) _mm256_mul_ps((a), (b))
#define vf32_div(a, b) _mm256_div_ps((a), (b))
#define vf32_max(a, b) _mm256_max_ps((a), (b))
#define vf32_min(a, b) _mm256_min_ps((a), (b))
#define vf32_fma(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define vf32_fnma(a, b, c) _mm256_fnmadd_ps((a), (b), (c))
#define vf32_abs(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), (a))
#define vf32_round(a) _mm256_cvtps_epi32(a)
#define vf32_of_i32(a) _mm256_cvtepi32_ps(a)

#define vi32_zero() _mm256_setzero_si256()
#define vi32_set1(x) _mm256_set1_epi32(x)
#define vi32_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi32_add(a, b) _mm256_add_epi32((a), (b))
#define vi32_sub(a, b) _mm256_sub_epi32((a), (b))
#define vi32_mul(a, b) _mm256_mullo_epi32((a), (b))
#define vi32_dot_i16(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))

LVA_INLINE float vf32_hsum(vf32 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

LVA_INLINE float vf32_hmax(vf32 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

LVA_INLINE float vf32_hmin(vf32 x) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}

LVA_INLINE vf32 vf32_keep(vf32 v, int64_t n, float fill) {
    const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < LANES ? n : LANES)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(in));
}

LVA_INLINE vf32 vf32_pow2i(vf32 y, vf32 n) {          /* y * 2^n for integral n in [-127, 127] */
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

#define vf32_round_nearest(a) _mm256_round_ps((a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

LVA_INLINE void vi32_store_i16(int16_t *q, vi32 v) {
    const __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storeu_si128((__m128i *)q, packed);
}

LVA_INLINE void vi32_store_i8(int8_t *q, vi32 v) {
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packs_epi16(words, words));
}

LVA_INLINE void vi32_store_u8(uint8_t *q, vi32 v) {
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packus_epi16(words, words));
}

#elif LVA_SIMD_WIDTH == 16

#define LANES 16
#define SIMD(name) name##_avx512
#define LVA_SIMD_DOT_U8I8 1
typedef __m512 vf32;
typedef __m512i vi32;

#define vf32_zero() _mm512_setzero_ps()
#define vf32_set1(x) _mm512_set1_ps(x)
#define vf32_load(p) _mm512_loadu_ps(p)
#define vf32_store(p, v) _mm512_storeu_ps((p), (v))
#define vf32_load_f16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define vf32_add(a, b) _mm512_add_ps((a), (b))
#define vf32_sub(a, b) _mm512_sub_ps((a), (b))
#define vf32_mul(a, b) _mm512_mul_ps((a), (b))
#define vf32_div(a, b) _mm512_div_ps((a), (b))
#define vf32_max(a, b) _mm512_max_ps((a), (b))
#define vf32_min(a, b) _mm512_min_ps((a), (b))
#define vf32_fma(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define vf32_fnma(a, b, c) _mm512_fnmadd_ps((a), (b), (c))
#define vf32_abs(a) _mm512_abs_ps(a)
#define vf32_round(a) _mm512_cvtps_epi32(a)
#define vf32_of_i32(a) _mm512_cvtepi32_ps(a)
#define vf32_hsum(a) _mm512_reduce_add_ps(a)
#define vf32_hmax(a) _mm512_reduce_max_ps(a)
#define vf32_hmin(a) _mm512_reduce_min_ps(a)

#define vi32_zero() _mm512_setzero_si512()
#define vi32_set1(x) _mm512_set1_epi32(x)
#define vi32_load(p) _mm512_loadu_si512((const void *)(p))
#define vi32_add(a, b) _mm512_add_epi32((a), (b))
#define vi32_sub(a, b) _mm512_sub_epi32((a), (b))
#define vi32_mul(a, b) _mm512_mullo_epi32((a), (b))
#define vi32_dot_i16(acc, a, b) _mm512_dpwssd_epi32((acc), (a), (b))
#define vi32_dot_u8i8(acc, a, b) _mm512_dpbusd_epi32((acc), (a), (b))
#define vi32_store_i16(q, v) _mm256_storeu_si256((__m256i *)(q), _mm512_cvtsepi32_epi16(v))
#define vi32_store_i8(q, v) _mm_storeu_si128((__m128i *)(q), _mm512_cvtsepi32_epi8(v))
#define vi32_store_u8(q, v) _mm_storeu_si128((__m128i *)(q), _mm512_cvtusepi32_epi8(v))

LVA_INLINE vf32 vf32_keep(vf32 v, int64_t n, float fill) {
    const __mmask16 in = n >= LANES ? 0xffff : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), in, v);
}

#define vf32_pow2i(y, n) _mm512_scalef_ps((y), (n))
#define vf32_round_nearest(a) _mm512_roundscale_ps((a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

#else
#error "LVA_SIMD_WIDTH must be 8 or 16"
#endif

/* Cephes' expf: n = round(x / ln 2), r = x - n ln 2 in two parts, e^r by its polynomial, times 2^n. */
LVA_INLINE vf32 vf32_exp(vf32 x) {
    x = vf32_max(x, vf32_set1(-87.0f));
    const vf32 n = vf32_round_nearest(vf32_mul(x, vf32_set1(1.44269504088896341f)));
    vf32 r = vf32_fnma(n, vf32_set1(0.693359375f), x);
    r = vf32_fnma(n, vf32_set1(-2.12194440e-4f), r);
    vf32 y = vf32_set1(1.9875691500e-4f);
    y = vf32_fma(y, r, vf32_set1(1.3981999507e-3f));
    y = vf32_fma(y, r, vf32_set1(8.3334519073e-3f));
    y = vf32_fma(y, r, vf32_set1(4.1665795894e-2f));
    y = vf32_fma(y, r, vf32_set1(1.6666665459e-1f));
    y = vf32_fma(y, r, vf32_set1(5.0000001201e-1f));
    y = vf32_fma(y, vf32_mul(r, r), vf32_add(r, vf32_set1(1.0f)));
    return vf32_pow2i(y, n);
}
