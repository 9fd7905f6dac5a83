// Element-wise kernels: the rotary embedding, SwiGLU forward and backward, the dropout mask,
// and the LoRA linear's steps around its matrix products. One thread per element (or per
// rotated pair); f32 arithmetic, results rounded once.
#include "common.cuh"

// Rotary embedding, non-interleaved (Hugging Face LLaMA): for i < d/2,
// out[i] = x[i] cos - x[i + d/2] sin * sign, out[i + d/2] = x[i + d/2] cos + x[i] sin * sign.
// x: (b, h, t, d) with strides (sb, sh, st, 1); cos/sin: (t, d/2), or (b, t, d/2) when
// per_batch; out contiguous (b, h, t, d). sign = -1 rotates back (the backward).
template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* out, int b, int h, int t, int d,
                     long long sb, long long sh, long long st, int per_batch, float sign) {
    int d2 = d / 2;
    long long n = (long long)b * h * t * d2;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = idx % d2;
        long long row = idx / d2;  // (bi, hi, ti)
        int ti = row % t;
        int hi = (row / t) % h;
        int bi = row / ((long long)t * h);
        const T* xr = x + bi * sb + hi * sh + ti * st;
        long long crow = per_batch ? (long long)bi * t + ti : ti;
        float c = to_f(cos[crow * d2 + i]), s = to_f(sin[crow * d2 + i]) * sign;
        float x1 = to_f(xr[i]), x2 = to_f(xr[i + d2]);
        T* o = out + row * d;
        o[i] = from_f<T>(x1 * c - x2 * s);
        o[i + d2] = from_f<T>(x2 * c + x1 * s);
    }
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

// y = silu(g) * u
template <typename T>
__device__ void silu_mul_fwd(const T* g, const T* u, T* y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gv = to_f(g[i]);
        y[i] = from_f<T>(gv * sigmoidf(gv) * to_f(u[i]));
    }
}

// out[0:n] = dg = dy u s (1 + g (1 - s)), out[n:2n] = du = dy g s
template <typename T>
__device__ void silu_mul_bwd(const T* g, const T* u, const T* dy, T* out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gv = to_f(g[i]), uv = to_f(u[i]), yv = to_f(dy[i]);
        float s = sigmoidf(gv);
        out[i] = from_f<T>(yv * uv * s * (1.f + gv * (1.f - s)));
        out[n + i] = from_f<T>(yv * gv * s);
    }
}

// The dropout mask as f32 (0 or 1 / keep), four elements per Philox call.
extern "C" __global__ void dropout_mask_f32(float* out, long long n, unsigned long long seed,
                                            unsigned int stream, unsigned int thr, float inv) {
    long long blocks = (n + 3) / 4;
    for (long long bk = (long long)blockIdx.x * blockDim.x + threadIdx.x; bk < blocks;
         bk += (long long)gridDim.x * blockDim.x) {
        uint4 w = philox4x32_10(make_uint4((uint32_t)bk, (uint32_t)(bk >> 32), stream, 0u),
                                make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)));
        uint32_t r[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            long long i = 4 * bk + j;
            if (i < n) out[i] = (r[j] >> 8) < thr ? inv : 0.f;
        }
    }
}

// The LoRA adapter's input: xd = f32(x) * mask (four elements per thread).
template <typename T>
__device__ void lora_input(const T* x, float* xd, long long n, MaskArg m) {
    long long blocks = (n + 3) / 4;
    for (long long bk = (long long)blockIdx.x * blockDim.x + threadIdx.x; bk < blocks;
         bk += (long long)gridDim.x * blockDim.x) {
        long long i0 = 4 * bk;
        if (i0 + 4 <= n) {
            float4 mk = mask4(m, bk);
            xd[i0] = to_f(x[i0]) * mk.x;
            xd[i0 + 1] = to_f(x[i0 + 1]) * mk.y;
            xd[i0 + 2] = to_f(x[i0 + 2]) * mk.z;
            xd[i0 + 3] = to_f(x[i0 + 3]) * mk.w;
        } else {
            for (long long i = i0; i < n; ++i) xd[i] = to_f(x[i]) * mask_at(m, i);
        }
    }
}

// out = base + scale * delta (base and out of the activations' type, delta f32).
template <typename T>
__device__ void lora_add(const T* base, const float* delta, T* out, long long n, float scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = from_f<T>(to_f(base[i]) + scale * delta[i]);
}

// The LoRA input gradient: dx = f32(dx_base) + mask * d_in, rounded to T.
template <typename T>
__device__ void lora_dx(const T* dx_base, const float* d_in, T* dx, long long n, MaskArg m) {
    long long blocks = (n + 3) / 4;
    for (long long bk = (long long)blockIdx.x * blockDim.x + threadIdx.x; bk < blocks;
         bk += (long long)gridDim.x * blockDim.x) {
        long long i0 = 4 * bk;
        if (i0 + 4 <= n) {
            float4 mk = mask4(m, bk);
            dx[i0] = from_f<T>(to_f(dx_base[i0]) + mk.x * d_in[i0]);
            dx[i0 + 1] = from_f<T>(to_f(dx_base[i0 + 1]) + mk.y * d_in[i0 + 1]);
            dx[i0 + 2] = from_f<T>(to_f(dx_base[i0 + 2]) + mk.z * d_in[i0 + 2]);
            dx[i0 + 3] = from_f<T>(to_f(dx_base[i0 + 3]) + mk.w * d_in[i0 + 3]);
        } else {
            for (long long i = i0; i < n; ++i)
                dx[i] = from_f<T>(to_f(dx_base[i]) + mask_at(m, i) * d_in[i]);
        }
    }
}

#define EW_KERNELS(T, S)                                                                          \
    extern "C" __global__ void rope_##S(const T* x, const T* cos, const T* sin, T* out, int b,     \
                                        int h, int t, int d, long long sb, long long sh,          \
                                        long long st, int per_batch, float sign) {                \
        rope<T>(x, cos, sin, out, b, h, t, d, sb, sh, st, per_batch, sign);                       \
    }                                                                                             \
    extern "C" __global__ void silu_mul_fwd_##S(const T* g, const T* u, T* y, long long n) {       \
        silu_mul_fwd<T>(g, u, y, n);                                                              \
    }                                                                                             \
    extern "C" __global__ void silu_mul_bwd_##S(const T* g, const T* u, const T* dy, T* out,       \
                                                long long n) {                                    \
        silu_mul_bwd<T>(g, u, dy, out, n);                                                        \
    }                                                                                             \
    extern "C" __global__ void lora_input_##S(const T* x, float* xd, long long n, MaskArg m) {     \
        lora_input<T>(x, xd, n, m);                                                               \
    }                                                                                             \
    extern "C" __global__ void lora_add_##S(const T* base, const float* delta, T* out,            \
                                            long long n, float scale) {                           \
        lora_add<T>(base, delta, out, n, scale);                                                  \
    }                                                                                             \
    extern "C" __global__ void lora_dx_##S(const T* dx_base, const float* d_in, T* dx,            \
                                           long long n, MaskArg m) {                              \
        lora_dx<T>(dx_base, d_in, dx, n, m);                                                      \
    }

EW_KERNELS(float, f32)
EW_KERNELS(bf16, bf16)
EW_KERNELS(f16, f16)
