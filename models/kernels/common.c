/* What the kernels share at run time: which instruction sets this CPU runs, ggml's tensor layout for the
 * Python side's check, scratch memory, and the 16-bit float conversions. See lva.h. */

#include "lva.h"

/* Bit `isa` is set for each instruction set this CPU can run (the OS saving the wider registers included:
 * libgcc's __builtin_cpu_supports checks XCR0). */
int lva_isas(void) {
    int isas = 1 << LVA_REFERENCE;
#ifdef LVA_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas |= 1 << LVA_AVX2;   /* F16C: AVX2 CPUs */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni")) {
        isas |= 1 << LVA_AVX512;
        if (__builtin_cpu_supports("avx512bf16")) isas |= 1 << LVA_AVX512_BF16;
    }
#endif
    return isas;
}

/* Offsets of the fields read here, and the struct's size, for the layout check on the Python side. */
void lva_tensor_offsets(size_t out[5]) {
    out[0] = offsetof(struct ggml_tensor, ne);
    out[1] = offsetof(struct ggml_tensor, nb);
    out[2] = offsetof(struct ggml_tensor, src);
    out[3] = offsetof(struct ggml_tensor, data);
    out[4] = sizeof(struct ggml_tensor);
}

void *lva_scratch(size_t bytes) {
    void *memory = aligned_alloc(64, (size_t)round_up((int64_t)bytes, 64));
    if (!memory) {
        fprintf(stderr, "lva's CPU kernels: out of memory for %zu bytes of scratch\n", bytes);
        abort();
    }
    return memory;
}

float lva_f32_of_f16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float f;
    if (exponent == 0) {                      /* zero or subnormal: mantissa x 2^-24 */
        f = (float)mantissa * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    const uint32_t u = sign | (exponent == 0x1f ? 0x7f800000 | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13));
    memcpy(&f, &u, 4);
    return f;
}

uint16_t lva_bf16_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

float lva_round_to_int(const float *values, int32_t *q, int n, float limit) {
    float largest = 0.0f;
    for (int i = 0; i < n; i++) largest = fmaxf(largest, fabsf(values[i]));
    const float to_int = largest > 0.0f ? limit / largest : 0.0f;
    for (int i = 0; i < n; i++) q[i] = (int32_t)lrintf(values[i] * to_int);
    return largest / limit;
}
