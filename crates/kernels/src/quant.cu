// Dequantization of QLoRA's frozen base weights into a dense buffer for the device's matrix
// product: bitsandbytes' NF4 (with or without its double-quantized absmax), GGML's Q4_0, Q4_1
// and Q8_0 blocks and its Q4_K, Q5_K and Q6_K super-blocks (the formulas of candle's
// `to_float`, which follow llama.cpp's). Each value is computed as the CPU path computes it (the same f32
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

// Scale and min j (0..8) of a Q4_K/Q5_K super-block's 12 packed bytes (6 bits each).
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, float* d, float* m) {
    if (j < 4) {
        *d = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *d = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// K-quant super-blocks of 256 values: `ty` 12 = Q4_K (144 bytes: f16 d, f16 dmin, 12 bytes of
// scales, 128 of nibbles), 13 = Q5_K (176: the same plus 32 bytes of fifth bits), 14 = Q6_K
// (210: 128 bytes of low nibbles, 64 of high bits, 16 signed scales, f16 d). One thread a
// super-block.
template <typename T>
__device__ void kquant_dequant(const uint8_t* data, int ty, T* out, long long nblocks,
                               int round_to) {
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < nblocks;
         j += (long long)gridDim.x * blockDim.x) {
        T* y = out + 256 * j;
        if (ty == 12 || ty == 13) {
            const uint8_t* p = data + (ty == 12 ? 144 : 176) * j;
            float d = f16_bits(p), dmin = f16_bits(p + 2);
            const uint8_t* scales = p + 4;
            const uint8_t* qh = p + 16;                     // Q5_K only
            const uint8_t* qs = p + (ty == 12 ? 16 : 48);
            int u1 = 1, u2 = 2;
            for (int c = 0; c < 4; ++c) {  // 64 values a chunk: two scales
                float sc, m;
                scale_min_k4(2 * c, scales, &sc, &m);
                float d1 = __fmul_rn(d, sc), m1 = __fmul_rn(dmin, m);
                scale_min_k4(2 * c + 1, scales, &sc, &m);
                float d2 = __fmul_rn(d, sc), m2 = __fmul_rn(dmin, m);
                const uint8_t* q = qs + 32 * c;
                for (int l = 0; l < 32; ++l) {
                    float lo = (float)(q[l] & 0xF), hi = (float)(q[l] >> 4);
                    if (ty == 13) {
                        lo = __fadd_rn(lo, (qh[l] & u1) ? 16.f : 0.f);
                        hi = __fadd_rn(hi, (qh[l] & u2) ? 16.f : 0.f);
                    }
                    y[64 * c + l] = from_f<T>(round_through(__fadd_rn(__fmul_rn(d1, lo), -m1), round_to));
                    y[64 * c + 32 + l] = from_f<T>(round_through(__fadd_rn(__fmul_rn(d2, hi), -m2), round_to));
                }
                u1 <<= 2;
                u2 <<= 2;
            }
        } else if (ty == 14) {
            const uint8_t* p = data + 210 * j;
            const uint8_t* ql = p;
            const uint8_t* qh = p + 128;
            const int8_t* sc = (const int8_t*)(p + 192);
            float d = f16_bits(p + 208);
            for (int n = 0; n < 2; ++n) {  // 128 values a half
                const uint8_t* l0 = ql + 64 * n;
                const uint8_t* h0 = qh + 32 * n;
                const int8_t* s0 = sc + 8 * n;
                T* o = y + 128 * n;
                for (int l = 0; l < 32; ++l) {
                    int is = l / 16;
                    int q1 = (int)((l0[l] & 0xF) | ((h0[l] & 3) << 4)) - 32;
                    int q2 = (int)((l0[l + 32] & 0xF) | (((h0[l] >> 2) & 3) << 4)) - 32;
                    int q3 = (int)((l0[l] >> 4) | (((h0[l] >> 4) & 3) << 4)) - 32;
                    int q4 = (int)((l0[l + 32] >> 4) | (((h0[l] >> 6) & 3) << 4)) - 32;
                    o[l] = from_f<T>(round_through(__fmul_rn(__fmul_rn(d, (float)s0[is]), (float)q1), round_to));
                    o[l + 32] = from_f<T>(round_through(__fmul_rn(__fmul_rn(d, (float)s0[is + 2]), (float)q2), round_to));
                    o[l + 64] = from_f<T>(round_through(__fmul_rn(__fmul_rn(d, (float)s0[is + 4]), (float)q3), round_to));
                    o[l + 96] = from_f<T>(round_through(__fmul_rn(__fmul_rn(d, (float)s0[is + 6]), (float)q4), round_to));
                }
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
    }                                                                                           \
    extern "C" __global__ void kquant_dequant_##S(const uint8_t* data, int ty, T* out,         \
                                                  long long nblocks, int round_to) {            \
        kquant_dequant<T>(data, ty, out, nblocks, round_to);                                    \
    }

QUANT_KERNELS(float, f32)
QUANT_KERNELS(bf16, bf16)
QUANT_KERNELS(f16, f16)
