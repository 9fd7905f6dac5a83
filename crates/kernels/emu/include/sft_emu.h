// The CUDA subset our kernels use, for the CPU: an emulated GPU in the manner of Triton's
// interpreter and Numba's CUDA simulator. The `.cu` sources compile unchanged against this
// header (it stands in for cuda_bf16.h, cuda_fp16.h and mma.h); each block's threads run as
// fibers in `runtime.cpp`, so a barrier is a barrier and a warp's lanes meet at every shuffle
// and WMMA call. What the emulator checks and what only a GPU shows: README, section GPU.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define SFT_EMU 1

// Function qualifiers. Under SFT_EMU_SCAN (the build script's preprocessor pass) a kernel
// keeps a marker, so the kernel table is read off the preprocessed sources.
#ifdef SFT_EMU_SCAN
#define __global__ SFT_EMU_KERNEL
#define __launch_bounds__(n) SFT_EMU_LAUNCH_BOUNDS(n)
#else
#define __global__
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
// A block's static shared memory: per worker thread, and a worker runs one block at a time
// (all of its threads are fibers of that worker).
#define __shared__ static thread_local

// ---------------------------------------------------------------------------------------
// Vector types (CUDA's alignments: a uint4 load is one 16-byte access).
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline int2 make_int2(int a, int b) { return {a, b}; }
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

// ---------------------------------------------------------------------------------------
// The running thread, as the runtime sets it before switching to a fiber.
namespace sft_emu {
struct Lane {
    uint3 thread_idx, block_idx, block_dim, grid_dim;
};
extern thread_local Lane* cur;

void syncthreads(const char* file, int line);
int syncthreads_or(int pred, const char* file, int line);
int syncthreads_and(int pred, const char* file, int line);
int syncthreads_count(int pred, const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
// A warp-collective call: every lane of `mask` deposits `payload` and waits; the last to
// arrive runs `action` over all 32 payloads (null for lanes outside the mask), then all go on.
// `tag` names the operation: lanes meeting with different tags have diverged.
void warp_meet(unsigned mask, const char* tag, const char* file, int line, void* payload,
               void (*action)(void** payloads, unsigned mask));
// The dynamic shared memory the launch asked for (exactly its size, guarded).
unsigned char* dynamic_smem();
[[noreturn]] void fail(const char* file, int line, const char* what);
}  // namespace sft_emu

#define threadIdx (::sft_emu::cur->thread_idx)
#define blockIdx (::sft_emu::cur->block_idx)
#define blockDim (::sft_emu::cur->block_dim)
#define gridDim (::sft_emu::cur->grid_dim)
#define warpSize 32

#define __syncthreads() ::sft_emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_or(p) ::sft_emu::syncthreads_or((p), __FILE__, __LINE__)
#define __syncthreads_and(p) ::sft_emu::syncthreads_and((p), __FILE__, __LINE__)
#define __syncthreads_count(p) ::sft_emu::syncthreads_count((p), __FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    ::sft_emu::syncwarp(mask, file, line);
}

namespace sft_emu {
struct Shfl {
    uint64_t value;
    int lane_mask;
    int width;
    uint64_t result;
};
inline void shfl_xor_action(void** p, unsigned mask) {
    for (int l = 0; l < 32; ++l) {
        if (!p[l]) continue;
        Shfl* s = static_cast<Shfl*>(p[l]);
        // Lanes outside the segment of `width`, or outside the mask, read their own value.
        int src = l ^ s->lane_mask;
        bool same_segment = (src / s->width) == (l / s->width);
        s->result = (same_segment && src < 32 && ((mask >> src) & 1u))
                        ? static_cast<Shfl*>(p[src])->value
                        : s->value;
    }
}
}  // namespace sft_emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled type");
    ::sft_emu::Shfl s{0, lane_mask, width, 0};
    std::memcpy(&s.value, &v, sizeof(T));
    ::sft_emu::warp_meet(mask, "__shfl_xor_sync", file, line, &s, ::sft_emu::shfl_xor_action);
    T r;
    std::memcpy(&r, &s.result, sizeof(T));
    return r;
}

// ---------------------------------------------------------------------------------------
// Atomics (GCC builtins: real atomics, since blocks run on several worker threads).
template <typename T, typename F>
inline T sft_emu_atomic_update(T* p, F f) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, f(old), true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicMin(int* p, int v) {
    return sft_emu_atomic_update(p, [v](int o) { return o < v ? o : v; });
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
    return sft_emu_atomic_update(p, [v](unsigned o) { return o < v ? o : v; });
}
inline int atomicMax(int* p, int v) {
    return sft_emu_atomic_update(p, [v](int o) { return o > v ? o : v; });
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
    return sft_emu_atomic_update(p, [v](unsigned o) { return o > v ? o : v; });
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {
    uint32_t* u = reinterpret_cast<uint32_t*>(p);
    uint32_t old = sft_emu_atomic_update(u, [v](uint32_t o) {
        float f;
        std::memcpy(&f, &o, 4);
        f += v;
        uint32_t n;
        std::memcpy(&n, &f, 4);
        return n;
    });
    float r;
    std::memcpy(&r, &old, 4);
    return r;
}
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* p, int cmp, int v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAnd(int* p, int v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------
// Integer and float intrinsics.
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
// Rounded products and sums that nvcc never fuses into an FMA. The emulator is compiled for
// baseline x86-64, which has no FMA instruction, so plain operations round the same way.
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
// CUDA's device min/max: overloads per type (the kernels call them on ints and sizes).
#define SFT_EMU_MINMAX(T)                                 \
    inline T min(T a, T b) { return b < a ? b : a; }       \
    inline T max(T a, T b) { return a < b ? b : a; }
SFT_EMU_MINMAX(int)
SFT_EMU_MINMAX(unsigned int)
SFT_EMU_MINMAX(long)
SFT_EMU_MINMAX(unsigned long)
SFT_EMU_MINMAX(long long)
SFT_EMU_MINMAX(unsigned long long)
#undef SFT_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
