// Cross-entropy over the vocabulary: one block per row reads the row's logits (any float type)
// and never writes them in f32; the backward writes d logits in the logits' type.
#include "common.cuh"

// loss[r] = logsumexp(x[r]) - x[r, y[r]]; 0 where y[r] == ignore; NaN for a label outside the
// vocabulary (the host checks labels before; this keeps a bad one from reading out of bounds).
template <typename T, typename L>
__device__ void ce_fwd(const T* logits, const L* labels, float* loss, int v, long long ignore) {
    __shared__ float scratch[32];
    long long y = (long long)labels[blockIdx.x];
    if (y == ignore) {
        if (threadIdx.x == 0) loss[blockIdx.x] = 0.f;
        return;
    }
    const T* x = logits + (size_t)blockIdx.x * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, to_f(x[j]));
    m = block_max(m, scratch);
    float s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += __expf(to_f(x[j]) - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) loss[blockIdx.x] = (y < 0 || y >= v) ? NAN : m + __logf(s) - to_f(x[y]);
}

// d logits[r, j] = g[r] (softmax(x[r])_j - [j == y[r]]), 0 for ignored rows; the row's
// log-sum-exp comes from the forward's loss: lse = loss + x[y].
template <typename T, typename L>
__device__ void ce_bwd(const T* logits, const L* labels, const float* loss, const float* g,
                       T* dlogits, int v, long long ignore) {
    long long y = (long long)labels[blockIdx.x];
    size_t off = (size_t)blockIdx.x * v;
    if (y == ignore || y < 0 || y >= v) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) dlogits[off + j] = from_f<T>(0.f);
        return;
    }
    const T* x = logits + off;
    float lse = loss[blockIdx.x] + to_f(x[y]);
    float gr = g[blockIdx.x];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = __expf(to_f(x[j]) - lse);
        dlogits[off + j] = from_f<T>(gr * (p - (j == y ? 1.f : 0.f)));
    }
}

#define CE_KERNELS(T, S, L, LS)                                                                   \
    extern "C" __global__ void ce_fwd_##S##_##LS(const T* logits, const L* labels, float* loss,    \
                                                 int v, long long ignore) {                       \
        ce_fwd<T, L>(logits, labels, loss, v, ignore);                                            \
    }                                                                                             \
    extern "C" __global__ void ce_bwd_##S##_##LS(const T* logits, const L* labels,                 \
                                                 const float* loss, const float* g, T* dlogits,   \
                                                 int v, long long ignore) {                       \
        ce_bwd<T, L>(logits, labels, loss, g, dlogits, v, ignore);                                \
    }

CE_KERNELS(float, f32, uint32_t, u32)
CE_KERNELS(float, f32, int64_t, i64)
CE_KERNELS(bf16, bf16, uint32_t, u32)
CE_KERNELS(bf16, bf16, int64_t, i64)
CE_KERNELS(f16, f16, uint32_t, u32)
CE_KERNELS(f16, f16, int64_t, i64)
