// The emulator's stand-in for CUDA's mma.h: nvcuda::wmma 16x16x16 fragments as warp-collective
// operations. A fragment holds 8 of the tile's 256 elements per lane (lane l: row-major
// elements 8l .. 8l + 7; the GPU's own mapping is opaque to kernels, which only touch elements
// through `x[i]` and `num_elements`). load, store, fill and mma meet the warp's 32 lanes; the
// last lane to arrive does the work for all of them, after checking that every lane passed the
// same pointer and stride. mma accumulates in f32 in k order, products of the operands exact
// in f32 (the tensor cores' own summation order is what only a GPU shows).
#pragma once
#include "sft_emu.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
    enum { num_elements = 8 };
    T x[num_elements];
};

namespace detail {
inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }
template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> inline __half from_float<__half>(float v) { return __float2half_rn(v); }

// One lane's part of a load or store: its fragment, the (warp-uniform) address and stride.
struct Mem {
    void* frag;
    const void* ptr;
    unsigned ldm;
    int col_major;
};

// Every lane passed the same pointer, stride and layout, and both are what the hardware needs:
// a 256-bit aligned pointer and a stride of a multiple of 16 bytes.
inline bool uniform(void** p, size_t elem_bytes, const char* file, int line) {
    const Mem* first = nullptr;
    for (int l = 0; l < 32; ++l) {
        if (!p[l]) continue;
        const Mem* m = static_cast<const Mem*>(p[l]);
        if (!first) first = m;
        if (m->ptr != first->ptr || m->ldm != first->ldm || m->col_major != first->col_major)
            ::sft_emu::fail(file, line, "wmma: lanes passed different pointers or strides");
    }
    if (first && reinterpret_cast<uintptr_t>(first->ptr) % 32 != 0)
        ::sft_emu::fail(file, line, "wmma: the pointer is not 256-bit aligned");
    if (first && (first->ldm * elem_bytes) % 16 != 0)
        ::sft_emu::fail(file, line, "wmma: the stride is not a multiple of 16 bytes");
    return true;
}

template <typename T>
inline void load_action(void** p, unsigned) {
    for (int l = 0; l < 32; ++l) {
        if (!p[l]) continue;
        Mem* m = static_cast<Mem*>(p[l]);
        T* x = static_cast<T*>(m->frag);
        const T* src = static_cast<const T*>(m->ptr);
        for (int e = 0; e < 8; ++e) {
            int idx = l * 8 + e, r = idx / 16, c = idx % 16;
            x[e] = m->col_major ? src[(size_t)c * m->ldm + r] : src[(size_t)r * m->ldm + c];
        }
    }
}

template <typename T>
inline void store_action(void** p, unsigned) {
    for (int l = 0; l < 32; ++l) {
        if (!p[l]) continue;
        Mem* m = static_cast<Mem*>(p[l]);
        const T* x = static_cast<const T*>(m->frag);
        T* dst = static_cast<T*>(const_cast<void*>(m->ptr));
        for (int e = 0; e < 8; ++e) {
            int idx = l * 8 + e, r = idx / 16, c = idx % 16;
            (m->col_major ? dst[(size_t)c * m->ldm + r] : dst[(size_t)r * m->ldm + c]) = x[e];
        }
    }
}

struct Fill {
    void* frag;
    float value;
};
template <typename T>
inline void fill_action(void** p, unsigned) {
    for (int l = 0; l < 32; ++l) {
        if (!p[l]) continue;
        Fill* f = static_cast<Fill*>(p[l]);
        for (int e = 0; e < 8; ++e) static_cast<T*>(f->frag)[e] = from_float<T>(f->value);
    }
}

struct Mma {
    void* d;
    const void* a;
    const void* b;
    const void* c;
};
// D = A B + C over the whole warp: element (m, n) of a tile lives in lane (16m + n) / 8.
template <typename TA, typename TC>
inline void mma_action(void** p, unsigned mask) {
    if (mask != 0xffffffffu) ::sft_emu::fail(__FILE__, __LINE__, "wmma::mma_sync needs the whole warp");
    auto el = [&](int which, int r, int c) -> float {
        int idx = r * 16 + c;
        const Mma* m = static_cast<const Mma*>(p[idx / 8]);
        const void* f = which == 0 ? m->a : (which == 1 ? m->b : m->c);
        if (which == 2) return to_float(static_cast<const TC*>(f)[idx % 8]);
        return to_float(static_cast<const TA*>(f)[idx % 8]);
    };
    float out[256];
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) {
            float acc = el(2, r, c);
            for (int k = 0; k < 16; ++k) acc += el(0, r, k) * el(1, k, c);
            out[r * 16 + c] = acc;
        }
    for (int l = 0; l < 32; ++l) {
        TC* d = static_cast<TC*>(static_cast<Mma*>(p[l])->d);
        for (int e = 0; e < 8; ++e) d[e] = from_float<TC>(out[l * 8 + e]);
    }
}
}  // namespace detail

template <typename Use, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, const V& v,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    detail::Fill fl{f.x, detail::to_float(v)};
    ::sft_emu::warp_meet(0xffffffffu, "wmma::fill_fragment", file, line, &fl, detail::fill_action<T>);
}

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout");
    detail::Mem m{f.x, p, ldm, std::is_same<L, col_major>::value ? 1 : 0};
    ::sft_emu::warp_meet(0xffffffffu, "wmma::load_matrix_sync", file, line, &m, [](void** pp, unsigned mk) {
        detail::uniform(pp, sizeof(T), nullptr, 0);
        detail::load_action<T>(pp, mk);
    });
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm,
                             layout_t layout, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    detail::Mem m{f.x, p, ldm, layout == mem_col_major ? 1 : 0};
    ::sft_emu::warp_meet(0xffffffffu, "wmma::load_matrix_sync", file, line, &m, [](void** pp, unsigned mk) {
        detail::uniform(pp, sizeof(T), nullptr, 0);
        detail::load_action<T>(pp, mk);
    });
}

template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    detail::Mem m{const_cast<T*>(f.x), p, ldm, layout == mem_col_major ? 1 : 0};
    ::sft_emu::warp_meet(0xffffffffu, "wmma::store_matrix_sync", file, line, &m, [](void** pp, unsigned mk) {
        detail::uniform(pp, sizeof(T), nullptr, 0);
        detail::store_action<T>(pp, mk);
    });
}

template <typename TA, typename LA, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d,
                     const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TA, LB>& b,
                     const fragment<accumulator, 16, 16, 16, TC>& c,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    detail::Mma m{d.x, a.x, b.x, c.x};
    ::sft_emu::warp_meet(0xffffffffu, "wmma::mma_sync", file, line, &m, detail::mma_action<TA, TC>);
}
}  // namespace wmma
}  // namespace nvcuda
