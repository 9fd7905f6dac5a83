// RMSNorm and softmax over the last dimension, forward and backward: one block per row,
// f32 arithmetic whatever the storage type, results rounded once.
#include "common.cuh"

// y = x / sqrt(mean(x^2) + eps) * w
template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int d, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (size_t)blockIdx.x * d;
    T* yr = y + (size_t)blockIdx.x * d;
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = to_f(xr[j]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = from_f<T>(to_f(xr[j]) * r * to_f(w[j]));
}

// dx = r * (g w - x * mean(g w x) * r^2)
template <typename T>
__device__ void rms_norm_bwd_dx(const T* x, const T* w, const T* g, T* dx, int d, float eps) {
    __shared__ float scratch[32];
    size_t off = (size_t)blockIdx.x * d;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float xv = to_f(x[off + j]);
        ss += xv * xv;
        dot += to_f(g[off + j]) * to_f(w[j]) * xv;
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    float r = rsqrtf(ss / d + eps);
    float c = dot * r * r / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float xv = to_f(x[off + j]);
        dx[off + j] = from_f<T>(r * (to_f(g[off + j]) * to_f(w[j]) - xv * c));
    }
}

// Each row's 1 / rms, for the weight gradient.
template <typename T>
__device__ void rms_norm_rstd(const T* x, float* rstd, int d, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (size_t)blockIdx.x * d;
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = to_f(xr[j]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) rstd[blockIdx.x] = rsqrtf(ss / d + eps);
}

// partial[chunk, j] = sum over the chunk's rows of g * x * rstd (column j = the thread's).
template <typename T>
__device__ void rms_norm_dw_partial(const T* x, const T* g, const float* rstd, float* partial,
                                    int rows, int d, int rows_per_chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) {
        size_t o = (size_t)r * d + j;
        acc += to_f(g[o]) * to_f(x[o]) * rstd[r];
    }
    partial[(size_t)blockIdx.y * d + j] = acc;
}

// out[j] = sum over chunks of partial[chunk, j], in T (a fixed order: deterministic).
template <typename T>
__device__ void sum_chunks(const float* partial, T* out, int chunks, int d) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) acc += partial[(size_t)c * d + j];
    out[j] = from_f<T>(acc);
}

// Softmax over rows of d; a row of -inf gives zeros.
template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int d) {
    __shared__ float scratch[32];
    size_t off = (size_t)blockIdx.x * d;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < d; j += blockDim.x) m = fmaxf(m, to_f(x[off + j]));
    m = block_max(m, scratch);
    if (m == -INFINITY) {
        for (int j = threadIdx.x; j < d; j += blockDim.x) y[off + j] = from_f<T>(0.f);
        return;
    }
    float s = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) s += __expf(to_f(x[off + j]) - m);
    s = block_sum(s, scratch);
    float inv = 1.f / s;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        y[off + j] = from_f<T>(__expf(to_f(x[off + j]) - m) * inv);
}

// dx = y (g - sum(g y))
template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, T* dx, int d) {
    __shared__ float scratch[32];
    size_t off = (size_t)blockIdx.x * d;
    float dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dot += to_f(y[off + j]) * to_f(g[off + j]);
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        dx[off + j] = from_f<T>(to_f(y[off + j]) * (to_f(g[off + j]) - dot));
}

#define NORM_KERNELS(T, S)                                                                        \
    extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, int d, float eps) {  \
        rms_norm_fwd<T>(x, w, y, d, eps);                                                         \
    }                                                                                             \
    extern "C" __global__ void rms_norm_bwd_dx_##S(const T* x, const T* w, const T* g, T* dx,      \
                                                   int d, float eps) {                            \
        rms_norm_bwd_dx<T>(x, w, g, dx, d, eps);                                                  \
    }                                                                                             \
    extern "C" __global__ void rms_norm_rstd_##S(const T* x, float* rstd, int d, float eps) {      \
        rms_norm_rstd<T>(x, rstd, d, eps);                                                        \
    }                                                                                             \
    extern "C" __global__ void rms_norm_dw_partial_##S(const T* x, const T* g, const float* rstd,  \
                                                       float* partial, int rows, int d,           \
                                                       int rows_per_chunk) {                      \
        rms_norm_dw_partial<T>(x, g, rstd, partial, rows, d, rows_per_chunk);                     \
    }                                                                                             \
    extern "C" __global__ void sum_chunks_##S(const float* partial, T* out, int chunks, int d) {   \
        sum_chunks<T>(partial, out, chunks, d);                                                   \
    }                                                                                             \
    extern "C" __global__ void softmax_fwd_##S(const T* x, T* y, int d) { softmax_fwd<T>(x, y, d); } \
    extern "C" __global__ void softmax_bwd_##S(const T* y, const T* g, T* dx, int d) {             \
        softmax_bwd<T>(y, g, dx, d);                                                              \
    }

NORM_KERNELS(float, f32)
NORM_KERNELS(bf16, bf16)
NORM_KERNELS(f16, f16)
