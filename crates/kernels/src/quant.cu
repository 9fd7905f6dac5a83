// Dequantization of QLoRA's frozen base weights into a dense buffer for the device's matrix
// product: bitsandbytes' NF4 (with or without its double-quantized absmax) and GGML's Q4_0,
// Q4_1 and Q8_0 blocks. Each value is computed as the CPU path computes it (the same f32
// products, never fused into an FMA), rounded through the model's dtype (`round_to`: 0 none,
// 1 bf16, 2 f16), then stored in the output's dtype.
#include "common.cuh"

__device__ __forceinline__ float round_through(float v, int round_to) {
    if (round_to == 1) return __bfloat162float(__float2bfloat16_rn(v));
    if (round_to == 2) return __half2float(__float2half_rn(v));
    return v;
}

__device__ __forceinline__ float f16_bits(const uint8_t* p) {
    unsigned short bits = (unsigned short)p[0] | ((unsigned short)p[1] << 8);
    return __half2float(__ushort_as_half(bits));
}

// NF4: `n` values, two codes a byte (the first in the high nibble), blocks of 64 with an f32
// absmax, or (dq) absmax[b] = dynamic[q2[b]] * absmax2[b / 256] + offset. `codes` holds the 16
// NF4 values then the 256 of the dynamic map. One thread a byte (two values).
template <typename T>
__device__ void nf4_dequant(const uint8_t* packed, const float* absmax, const uint8_t* q2,
                            const float* absmax2, float offset, int dq, const float* codes, T* out,
                            long long n, int round_to) {
    long long bytes = (n + 1) / 2;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < bytes;
         i += (long long)gridDim.x * blockDim.x) {
        long long e = 2 * i;  // both values of a byte lie in one block of 64
        long long b = e / 64;
        float a = dq ? __fadd_rn(__fmul_rn(codes[16 + q2[b]], absmax2[b / 256]), offset)
                     : absmax[b];
        uint8_t byte = packed[i];
        out[e] = from_f<T>(round_through(__fmul_rn(codes[byte >> 4], a), round_to));
        if (e + 1 < n) out[e + 1] = from_f<T>(round_through(__fmul_rn(codes[byte & 15], a), round_to));
    }
}

// GGML blocks of 32 values: `ty` 2 = Q4_0 (f16 d, 16 bytes of nibbles: v = (q - 8) d),
// 3 = Q4_1 (f16 d, f16 m: v = q d + m), 8 = Q8_0 (f16 d, 32 signed bytes: v = q d), the type
// numbers of GGML. Block j's values at out[32 j ..]. One thread a block.
template <typename T>
__device__ void ggml_dequant(const uint8_t* data, int ty, T* out, long long nblocks,
                             int round_to) {
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < nblocks;
         j += (long long)gridDim.x * blockDim.x) {
        T* o = out + 32 * j;
        if (ty == 8) {
            const uint8_t* p = data + 34 * j;
            float d = f16_bits(p);
            for (int k = 0; k < 32; ++k)
                o[k] = from_f<T>(round_through(__fmul_rn((float)(int8_t)p[2 + k], d), round_to));
        } else if (ty == 2) {
            const uint8_t* p = data + 18 * j;
            float d = f16_bits(p);
            for (int k = 0; k < 16; ++k) {
                uint8_t q = p[2 + k];
                o[k] = from_f<T>(round_through(__fmul_rn((float)((int)(q & 15) - 8), d), round_to));
                o[k + 16] = from_f<T>(round_through(__fmul_rn((float)((int)(q >> 4) - 8), d), round_to));
            }
        } else if (ty == 3) {
            const uint8_t* p = data + 20 * j;
            float d = f16_bits(p), m = f16_bits(p + 2);
            for (int k = 0; k < 16; ++k) {
                uint8_t q = p[4 + k];
                o[k] = from_f<T>(round_through(__fadd_rn(__fmul_rn((float)(q & 15), d), m), round_to));
                o[k + 16] = from_f<T>(round_through(__fadd_rn(__fmul_rn((float)(q >> 4), d), m), round_to));
            }
        }
    }
}

#define QUANT_KERNELS(T, S)                                                                     \
    extern "C" __global__ void nf4_dequant_##S(const uint8_t* packed, const float* absmax,     \
                                               const uint8_t* q2, const float* absmax2,         \
                                               float offset, int dq, const float* codes, T* out, \
                                               long long n, int round_to) {                     \
        nf4_dequant<T>(packed, absmax, q2, absmax2, offset, dq, codes, out, n, round_to);       \
    }                                                                                           \
    extern "C" __global__ void ggml_dequant_##S(const uint8_t* data, int ty, T* out,           \
                                                long long nblocks, int round_to) {              \
        ggml_dequant<T>(data, ty, out, nblocks, round_to);                                      \
    }

QUANT_KERNELS(float, f32)
QUANT_KERNELS(bf16, bf16)
QUANT_KERNELS(f16, f16)
