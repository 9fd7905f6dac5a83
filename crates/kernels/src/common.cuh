// Helpers shared by the kernels: conversions to and from the f32 arithmetic type, warp and
// block reductions, and the Philox generator of the dropout masks (the same function as
// crates/model/src/ops/dropout.rs, so both devices draw the same mask).
//
// The one place for portability macros: the same sources compile with nvcc for the GPU and
// with the system's C++ compiler for the emulated GPU (emu/include stands in for CUDA's headers
// there and defines SFT_EMU).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// A kernel's dynamic shared memory (the launch's `shared_mem_bytes`).
#ifdef SFT_EMU
#define SFT_DYNAMIC_SMEM(name) unsigned char* name = ::sft_emu::dynamic_smem()
#else
#define SFT_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(f16 x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
// Round to nearest even, as the CPU path rounds.
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 from_f<f16>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats; the call ends with the block synchronised.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nw ? scratch[lane] : 0.f;
    r = warp_sum(r);
    return r;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nw ? scratch[lane] : -INFINITY;
    r = warp_max(r);
    return r;
}

// Philox4x32-10 (Random123's constants and round order).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k.x += 0x9E3779B9u;
            k.y += 0xBB67AE85u;
        }
        uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// The dropout mask's element `i`: `inv` (1 / keep) when word i % 4 of block i / 4 keeps it
// (its top 24 bits below `thr`), else 0. `seed` and `stream` as in DropoutKey.
__device__ __forceinline__ float dropout_elem(uint64_t i, uint64_t seed, uint32_t stream,
                                              uint32_t thr, float inv) {
    uint64_t block = i >> 2;
    uint4 w = philox4x32_10(make_uint4((uint32_t)block, (uint32_t)(block >> 32), stream, 0u),
                            make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)));
    uint32_t r = (i & 3) == 0 ? w.x : (i & 3) == 1 ? w.y : (i & 3) == 2 ? w.z : w.w;
    return (r >> 8) < thr ? inv : 0.f;
}

// How a LoRA kernel finds the dropout mask of element i: none, Philox, or a given f32 mask.
struct MaskArg {
    uint64_t seed;
    const float* mask;  // mode 2
    uint32_t stream;
    uint32_t thr;
    float inv;
    int mode;  // 0 none, 1 Philox, 2 mask
};

__device__ __forceinline__ float mask_at(const MaskArg& m, uint64_t i) {
    if (m.mode == 1) return dropout_elem(i, m.seed, m.stream, m.thr, m.inv);
    if (m.mode == 2) return m.mask[i];
    return 1.f;
}

// The mask of elements 4 * block .. 4 * block + 3 (one Philox call for the four).
__device__ __forceinline__ float4 mask4(const MaskArg& m, uint64_t block) {
    if (m.mode == 1) {
        uint4 w = philox4x32_10(
            make_uint4((uint32_t)block, (uint32_t)(block >> 32), m.stream, 0u),
            make_uint2((uint32_t)m.seed, (uint32_t)(m.seed >> 32)));
        return make_float4((w.x >> 8) < m.thr ? m.inv : 0.f, (w.y >> 8) < m.thr ? m.inv : 0.f,
                           (w.z >> 8) < m.thr ? m.inv : 0.f, (w.w >> 8) < m.thr ? m.inv : 0.f);
    }
    if (m.mode == 2) {
        const float* p = m.mask + 4 * block;
        return make_float4(p[0], p[1], p[2], p[3]);
    }
    return make_float4(1.f, 1.f, 1.f, 1.f);
}
