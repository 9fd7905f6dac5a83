// Attention that never stores the (t x s) score matrix (Dao's FlashAttention-2 scheme), with
// grouped K/V heads and causal key ranges, bf16/f16 operands on the tensor cores (WMMA
// 16x16x16, f32 accumulation).
//
// Shapes: q (b, nh, t, HD) and k, v (b, nkv, s, HD), any strides with a unit last one (rows
// 16-byte aligned); out and d out (b, t, nh * HD) contiguous; lse and D (b, nh, t) f32.
// Masking: with `starts`, query i of row b (absolute position past + i) sees keys
// starts[b * t + i] ..= past + i; without, every key.
//
// Forward: one block of 4 warps per 64 query rows of one head; each warp owns 16 rows. Per
// 64-key tile: S = Q K^T on the tensor cores into shared memory, the online softmax in f32
// (two lanes per row), P rounded to the operand type, O += P V with O kept in shared memory
// (its rows are rescaled as the running maximum moves). Saves O and the rows' log-sum-exp.
// Backward: D = rowsum(dO * O); one kernel per 64-key tile accumulates dK and dV over the
// query tiles (and the heads of its kv group) that see it; one per 64-query tile accumulates
// dQ over the key tiles it sees. Both recompute P from Q, K and the saved log-sum-exp.
#include "common.cuh"
#include <mma.h>
using namespace nvcuda;

#define BR 64
#define BC 64
#define NW 4
#define PAD 8
#define LDS (BC + 4)  // f32 score rows
#define LDP (BC + 8)  // 16-bit probability rows

struct AttnArgs {
    long long qb, qh, qt;  // q strides (batch, head, position)
    long long kb, kh, kt;  // k strides
    long long vb, vh, vt;  // v strides
    int b, nh, nkv, t, s, past;
    float scale;
    int has_starts;
};

template <int HD>
struct Smem {
    static constexpr int LD = HD + PAD;           // 16-bit tile rows
    static constexpr int LDO = HD + 4;            // f32 accumulator rows
    static constexpr int TILE = 64 * LD * 2;      // bytes of one 64-row 16-bit tile
    static constexpr int S = NW * 16 * LDS * 4;   // per-warp f32 scores
    static constexpr int P = NW * 16 * LDP * 2;   // per-warp 16-bit probabilities (fwd, dQ)
    static constexpr int P64 = 64 * LDP * 2;      // a whole 64 x 64 16-bit tile (dK/dV)
    static constexpr int O = NW * 16 * LDO * 4;   // per-warp f32 output rows
};

// Copies rows r0.. of a (rows x HD) matrix at `src` (row stride `st` elements) into a 64-row
// shared tile (row stride HD + PAD), zeros past `rows`: 16 bytes per thread and step.
template <typename T, int HD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, long long st, int r0, int rows) {
    constexpr int VEC = 8, PER_ROW = HD / VEC;
    for (int v = threadIdx.x; v < 64 * PER_ROW; v += blockDim.x) {
        int r = v / PER_ROW, c = (v % PER_ROW) * VEC;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r0 + r < rows) val = *reinterpret_cast<const uint4*>(src + (r0 + r) * st + c);
        *reinterpret_cast<uint4*>(dst + r * (HD + PAD) + c) = val;
    }
}

// Keys [lo, hi) that some query of rows [t0, t0 + 64) may see (with `starts`: the smallest
// start to the last row's own position).
__device__ __forceinline__ void key_span(const AttnArgs& a, const unsigned* starts, int bi, int t0,
                                         int* lo, int* hi, int* smin) {
    int last = min(t0 + BR, a.t) - 1;
    if (!a.has_starts) {
        *lo = 0;
        *hi = a.s;
        return;
    }
    int m = a.s;
    for (int i = threadIdx.x; i < BR; i += blockDim.x)
        if (t0 + i < a.t) m = min(m, (int)starts[(long long)bi * a.t + t0 + i]);
    // block min through shared memory
    if (threadIdx.x == 0) *smin = a.s;
    __syncthreads();
    atomicMin(smin, m);
    __syncthreads();
    *lo = *smin;
    *hi = min(a.s, a.past + last + 1);
}

// The visible key range of query row i (absolute key indices, [lo, hi]).
__device__ __forceinline__ void row_span(const AttnArgs& a, const unsigned* starts, int bi, int i,
                                         int* lo, int* hi) {
    if (!a.has_starts) {
        *lo = 0;
        *hi = a.s - 1;
    } else {
        *lo = (int)starts[(long long)bi * a.t + i];
        *hi = min(a.s - 1, a.past + i);
    }
}

// S (16 x 64, f32, scale not applied) = Q_w (16 x HD, from shared, row stride LD) K^T for the
// 64 keys of the tile in shared memory.
template <typename T, int HD>
__device__ __forceinline__ void scores16(float* s_w, const T* q_w, const T* k_tile) {
    constexpr int LD = HD + PAD;
#pragma unroll
    for (int jb = 0; jb < BC / 16; ++jb) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bm;
            wmma::load_matrix_sync(a, q_w + kk * 16, LD);
            wmma::load_matrix_sync(bm, k_tile + jb * 16 * LD + kk * 16, LD);
            wmma::mma_sync(acc, a, bm, acc);
        }
        wmma::store_matrix_sync(s_w + jb * 16, acc, LDS, wmma::mem_row_major);
    }
}

template <typename T, int HD>
__device__ void attn_fwd(const T* q, const T* k, const T* v, const unsigned* starts, T* out,
                         float* lse, AttnArgs a) {
    SFT_DYNAMIC_SMEM(smem);
    using SM = Smem<HD>;
    constexpr int LD = SM::LD, LDO = SM::LDO;
    T* sQ = reinterpret_cast<T*>(smem);
    T* sK = reinterpret_cast<T*>(smem + SM::TILE);
    T* sV = reinterpret_cast<T*>(smem + 2 * SM::TILE);
    float* sS = reinterpret_cast<float*>(smem + 3 * SM::TILE);
    T* sP = reinterpret_cast<T*>(smem + 3 * SM::TILE + SM::S);
    float* sO = reinterpret_cast<float*>(smem + 3 * SM::TILE + SM::S + SM::P);
    __shared__ int smin;

    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int bh = blockIdx.y, bi = bh / a.nh, h = bh % a.nh, g = h / (a.nh / a.nkv);
    int t0 = blockIdx.x * BR;
    const T* qbase = q + bi * a.qb + h * a.qh;
    const T* kbase = k + bi * a.kb + g * a.kh;
    const T* vbase = v + bi * a.vb + g * a.vh;

    load_tile<T, HD>(sQ, qbase, a.qt, t0, a.t);
    float* s_w = sS + warp * 16 * LDS;
    T* p_w = sP + warp * 16 * LDP;
    float* o_w = sO + warp * 16 * LDO;
    for (int e = lane; e < 16 * LDO; e += 32) o_w[e] = 0.f;
    int klo, khi;
    key_span(a, starts, bi, t0, &klo, &khi, &smin);

    // This lane's row (two lanes per row) and its half of the columns.
    int rr = lane >> 1, half = lane & 1;
    int i = t0 + warp * 16 + rr;
    int lo = 0, hi = -1;
    if (i < a.t) row_span(a, starts, bi, i, &lo, &hi);
    float m = -INFINITY, l = 0.f;

    for (int kt = (klo / BC) * BC; kt < khi; kt += BC) {
        __syncthreads();
        load_tile<T, HD>(sK, kbase, a.kt, kt, a.s);
        load_tile<T, HD>(sV, vbase, a.vt, kt, a.s);
        __syncthreads();
        scores16<T, HD>(s_w, sQ + warp * 16 * LD, sK);
        __syncwarp();
        float p[32];
        float mt = -INFINITY;
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            int j = kt + half * 32 + c;
            float sv = (j >= lo && j <= hi) ? a.scale * s_w[rr * LDS + half * 32 + c] : -INFINITY;
            p[c] = sv;
            mt = fmaxf(mt, sv);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffff, mt, 1));
        float mn = fmaxf(m, mt);
        float corr = (mn == -INFINITY) ? 1.f : __expf(m - mn);
        float rs = 0.f;
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            p[c] = (p[c] == -INFINITY) ? 0.f : __expf(p[c] - mn);
            rs += p[c];
            p_w[rr * LDP + half * 32 + c] = from_f<T>(p[c]);
        }
        rs += __shfl_xor_sync(0xffffffff, rs, 1);
        l = l * corr + rs;
        m = mn;
        for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) o_w[rr * LDO + c] *= corr;
        __syncwarp();
        // O_w += P_w V
#pragma unroll
        for (int db = 0; db < HD / 16; ++db) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, o_w + db * 16, LDO, wmma::mem_row_major);
#pragma unroll
            for (int kb = 0; kb < BC / 16; ++kb) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
                wmma::load_matrix_sync(pa, p_w + kb * 16, LDP);
                wmma::load_matrix_sync(vb, sV + kb * 16 * LD + db * 16, LD);
                wmma::mma_sync(acc, pa, vb, acc);
            }
            wmma::store_matrix_sync(o_w + db * 16, acc, LDO, wmma::mem_row_major);
        }
        __syncwarp();
    }
    if (i < a.t) {
        float inv = l > 0.f ? 1.f / l : 0.f;
        T* orow = out + (((long long)bi * a.t + i) * a.nh + h) * HD;
        for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c)
            orow[c] = from_f<T>(o_w[rr * LDO + c] * inv);
        if (half == 0) lse[((long long)bi * a.nh + h) * a.t + i] = l > 0.f ? m + __logf(l) : -INFINITY;
    }
}

// D[b, h, i] = sum over the row of dO * O (one warp per row).
template <typename T>
__device__ void attn_bwd_dot(const T* dout, const T* out, float* dsum, int b, int nh, int t, int hd) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= (long long)b * t * nh) return;
    // row indexes (bi, i, h) in the output's layout
    const T* a = dout + row * hd;
    const T* o = out + row * hd;
    float acc = 0.f;
    for (int c = lane; c < hd; c += 32) acc += to_f(a[c]) * to_f(o[c]);
    acc = warp_sum(acc);
    if (lane == 0) {
        int h = row % nh;
        long long bi_i = row / nh;
        int i = bi_i % t;
        long long bi = bi_i / t;
        dsum[(bi * nh + h) * t + i] = acc;
    }
}

// P (as f32 in `p`, this lane's 32 columns of its row) for one 64-key tile, from the scores in
// s_w and the row's log-sum-exp; 0 outside the row's keys.
__device__ __forceinline__ void probs32(float* p, const float* s_w, int rr, int half, int kt, int lo,
                                        int hi, float scale, float lse_r) {
#pragma unroll
    for (int c = 0; c < 32; ++c) {
        int j = kt + half * 32 + c;
        p[c] = (j >= lo && j <= hi) ? __expf(scale * s_w[rr * LDS + half * 32 + c] - lse_r) : 0.f;
    }
}

// dK and dV of one 64-key tile of kv head (b, g), over every query tile of the group's heads
// that sees it. dk, dv: (b, nkv, s, HD) contiguous.
template <typename T, int HD>
__device__ void attn_bwd_dkdv(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                              const float* dsum, const unsigned* starts, T* dk, T* dv, AttnArgs a) {
    SFT_DYNAMIC_SMEM(smem);
    using SM = Smem<HD>;
    constexpr int LD = SM::LD, LDO = SM::LDO;
    T* sK = reinterpret_cast<T*>(smem);
    T* sV = reinterpret_cast<T*>(smem + SM::TILE);
    T* sQ = reinterpret_cast<T*>(smem + 2 * SM::TILE);
    T* sD = reinterpret_cast<T*>(smem + 3 * SM::TILE);  // d out rows
    float* sS = reinterpret_cast<float*>(smem + 4 * SM::TILE);
    T* sP = reinterpret_cast<T*>(smem + 4 * SM::TILE + SM::S);
    T* sDS = reinterpret_cast<T*>(smem + 4 * SM::TILE + SM::S + SM::P64);

    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int bg = blockIdx.y, bi = bg / a.nkv, g = bg % a.nkv, n_rep = a.nh / a.nkv;
    int s0 = blockIdx.x * BC, s1 = min(a.s, s0 + BC);
    load_tile<T, HD>(sK, k + bi * a.kb + g * a.kh, a.kt, s0, a.s);
    load_tile<T, HD>(sV, v + bi * a.vb + g * a.vh, a.vt, s0, a.s);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dKf[HD / 16], dVf[HD / 16];
#pragma unroll
    for (int db = 0; db < HD / 16; ++db) {
        wmma::fill_fragment(dKf[db], 0.f);
        wmma::fill_fragment(dVf[db], 0.f);
    }
    float* s_w = sS + warp * 16 * LDS;
    int rr = lane >> 1, half = lane & 1;
    // Queries before position s0 - past see none of these keys.
    int first = max(0, s0 - a.past) / BR * BR;
    if (!a.has_starts) first = 0;
    for (int r = 0; r < n_rep; ++r) {
        int h = g * n_rep + r;
        const float* lse_h = lse + ((long long)bi * a.nh + h) * a.t;
        const float* d_h = dsum + ((long long)bi * a.nh + h) * a.t;
        for (int t0 = first; t0 < a.t; t0 += BR) {
            // Skip a query tile none of whose rows sees a key of this tile.
            int sees = 0;
            for (int x = threadIdx.x; x < BR; x += blockDim.x) {
                int i = t0 + x;
                if (i < a.t) {
                    int lo, hi;
                    row_span(a, starts, bi, i, &lo, &hi);
                    if (max(lo, s0) <= min(hi, s1 - 1)) sees = 1;
                }
            }
            if (!__syncthreads_or(sees)) continue;
            load_tile<T, HD>(sQ, q + bi * a.qb + h * a.qh, a.qt, t0, a.t);
            load_tile<T, HD>(sD, dout + (long long)bi * a.t * a.nh * HD + (long long)h * HD,
                             (long long)a.nh * HD, t0, a.t);
            __syncthreads();
            int i = t0 + warp * 16 + rr;
            int lo = 0, hi = -1;
            float lse_r = 0.f, d_r = 0.f;
            if (i < a.t) {
                row_span(a, starts, bi, i, &lo, &hi);
                lse_r = lse_h[i];
                d_r = d_h[i];
            }
            // S_w = Q_w K^T, then P (f32 in registers, T in sP rows of this warp)
            scores16<T, HD>(s_w, sQ + warp * 16 * LD, sK);
            __syncwarp();
            float p[32];
            probs32(p, s_w, rr, half, s0, lo, hi, a.scale, lse_r);
#pragma unroll
            for (int c = 0; c < 32; ++c) sP[(warp * 16 + rr) * LDP + half * 32 + c] = from_f<T>(p[c]);
            __syncwarp();
            // dP_w = dO_w V^T (the scores' layout), then dS = P (dP - D)
            scores16<T, HD>(s_w, sD + warp * 16 * LD, sV);
            __syncwarp();
#pragma unroll
            for (int c = 0; c < 32; ++c) {
                float dp = s_w[rr * LDS + half * 32 + c];
                sDS[(warp * 16 + rr) * LDP + half * 32 + c] = from_f<T>(p[c] * (dp - d_r));
            }
            __syncthreads();
            // This warp's 16 keys: dV += P^T dO, dK += dS^T Q
#pragma unroll
            for (int qb = 0; qb < BR / 16; ++qb) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> pt, dst;
                wmma::load_matrix_sync(pt, sP + qb * 16 * LDP + warp * 16, LDP);
                wmma::load_matrix_sync(dst, sDS + qb * 16 * LDP + warp * 16, LDP);
#pragma unroll
                for (int db = 0; db < HD / 16; ++db) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> dob, qbm;
                    wmma::load_matrix_sync(dob, sD + qb * 16 * LD + db * 16, LD);
                    wmma::load_matrix_sync(qbm, sQ + qb * 16 * LD + db * 16, LD);
                    wmma::mma_sync(dVf[db], pt, dob, dVf[db]);
                    wmma::mma_sync(dKf[db], dst, qbm, dKf[db]);
                }
            }
            __syncthreads();
        }
    }
    // Write this warp's 16 keys (dK scaled), staged through shared memory as f32.
    __syncthreads();
    float* stage = reinterpret_cast<float*>(smem + 2 * SM::TILE) + warp * 16 * LDO;
    long long kv_row0 = ((long long)bi * a.nkv + g) * a.s;
    for (int which = 0; which < 2; ++which) {
#pragma unroll
        for (int db = 0; db < HD / 16; ++db) {
            if (which == 0) {
                for (int e = 0; e < dKf[db].num_elements; ++e) dKf[db].x[e] *= a.scale;
                wmma::store_matrix_sync(stage + db * 16, dKf[db], LDO, wmma::mem_row_major);
            } else {
                wmma::store_matrix_sync(stage + db * 16, dVf[db], LDO, wmma::mem_row_major);
            }
        }
        __syncwarp();
        T* dst = which == 0 ? dk : dv;
        for (int e = lane; e < 16 * HD; e += 32) {
            int r = e / HD, c = e % HD;
            int key = s0 + warp * 16 + r;
            if (key < a.s) dst[(kv_row0 + key) * HD + c] = from_f<T>(stage[r * LDO + c]);
        }
        __syncwarp();
    }
}

// dQ of 64 query rows of head (b, h), over the key tiles they see. dq: (b, nh, t, HD).
template <typename T, int HD>
__device__ void attn_bwd_dq(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                            const float* dsum, const unsigned* starts, T* dq, AttnArgs a) {
    SFT_DYNAMIC_SMEM(smem);
    using SM = Smem<HD>;
    constexpr int LD = SM::LD, LDO = SM::LDO;
    T* sQ = reinterpret_cast<T*>(smem);
    T* sD = reinterpret_cast<T*>(smem + SM::TILE);
    T* sK = reinterpret_cast<T*>(smem + 2 * SM::TILE);
    T* sV = reinterpret_cast<T*>(smem + 3 * SM::TILE);
    float* sS = reinterpret_cast<float*>(smem + 4 * SM::TILE);
    T* sDS = reinterpret_cast<T*>(smem + 4 * SM::TILE + SM::S);
    __shared__ int smin;

    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int bh = blockIdx.y, bi = bh / a.nh, h = bh % a.nh, g = h / (a.nh / a.nkv);
    int t0 = blockIdx.x * BR;
    load_tile<T, HD>(sQ, q + bi * a.qb + h * a.qh, a.qt, t0, a.t);
    load_tile<T, HD>(sD, dout + (long long)bi * a.t * a.nh * HD + (long long)h * HD,
                     (long long)a.nh * HD, t0, a.t);
    int klo, khi;
    key_span(a, starts, bi, t0, &klo, &khi, &smin);
    float* s_w = sS + warp * 16 * LDS;
    T* ds_w = sDS + warp * 16 * LDP;
    int rr = lane >> 1, half = lane & 1;
    int i = t0 + warp * 16 + rr;
    int lo = 0, hi = -1;
    float lse_r = 0.f, d_r = 0.f;
    if (i < a.t) {
        row_span(a, starts, bi, i, &lo, &hi);
        lse_r = lse[((long long)bi * a.nh + h) * a.t + i];
        d_r = dsum[((long long)bi * a.nh + h) * a.t + i];
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dQf[HD / 16];
#pragma unroll
    for (int db = 0; db < HD / 16; ++db) wmma::fill_fragment(dQf[db], 0.f);
    const T* kbase = k + bi * a.kb + g * a.kh;
    const T* vbase = v + bi * a.vb + g * a.vh;
    for (int kt = (klo / BC) * BC; kt < khi; kt += BC) {
        __syncthreads();
        load_tile<T, HD>(sK, kbase, a.kt, kt, a.s);
        load_tile<T, HD>(sV, vbase, a.vt, kt, a.s);
        __syncthreads();
        scores16<T, HD>(s_w, sQ + warp * 16 * LD, sK);
        __syncwarp();
        float p[32];
        probs32(p, s_w, rr, half, kt, lo, hi, a.scale, lse_r);
        __syncwarp();
        scores16<T, HD>(s_w, sD + warp * 16 * LD, sV);  // dP
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            float dp = s_w[rr * LDS + half * 32 + c];
            ds_w[rr * LDP + half * 32 + c] = from_f<T>(p[c] * (dp - d_r));
        }
        __syncwarp();
        // dQ_w += dS_w K
#pragma unroll
        for (int kb = 0; kb < BC / 16; ++kb) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> dsa;
            wmma::load_matrix_sync(dsa, ds_w + kb * 16, LDP);
#pragma unroll
            for (int db = 0; db < HD / 16; ++db) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> kbm;
                wmma::load_matrix_sync(kbm, sK + kb * 16 * LD + db * 16, LD);
                wmma::mma_sync(dQf[db], dsa, kbm, dQf[db]);
            }
        }
    }
    __syncthreads();
    float* stage = reinterpret_cast<float*>(smem + 2 * SM::TILE) + warp * 16 * LDO;
#pragma unroll
    for (int db = 0; db < HD / 16; ++db) {
        for (int e = 0; e < dQf[db].num_elements; ++e) dQf[db].x[e] *= a.scale;
        wmma::store_matrix_sync(stage + db * 16, dQf[db], LDO, wmma::mem_row_major);
    }
    __syncwarp();
    long long row0 = ((long long)bi * a.nh + h) * a.t;
    for (int e = lane; e < 16 * HD; e += 32) {
        int r = e / HD, c = e % HD;
        int qi = t0 + warp * 16 + r;
        if (qi < a.t) dq[(row0 + qi) * HD + c] = from_f<T>(stage[r * LDO + c]);
    }
}

#define ATTN_KERNELS(T, S, HD)                                                                    \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_##S##_##HD(                        \
        const T* q, const T* k, const T* v, const unsigned* starts, T* out, float* lse,           \
        AttnArgs a) {                                                                             \
        attn_fwd<T, HD>(q, k, v, starts, out, lse, a);                                            \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_##S##_##HD(                   \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dsum,   \
        const unsigned* starts, T* dk, T* dv, AttnArgs a) {                                       \
        attn_bwd_dkdv<T, HD>(q, k, v, dout, lse, dsum, starts, dk, dv, a);                        \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_##S##_##HD(                     \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dsum,   \
        const unsigned* starts, T* dq, AttnArgs a) {                                              \
        attn_bwd_dq<T, HD>(q, k, v, dout, lse, dsum, starts, dq, a);                              \
    }

ATTN_KERNELS(bf16, bf16, 64)
ATTN_KERNELS(bf16, bf16, 128)
ATTN_KERNELS(f16, f16, 64)
ATTN_KERNELS(f16, f16, 128)

#define DOT_KERNEL(T, S)                                                                          \
    extern "C" __global__ void attn_bwd_dot_##S(const T* dout, const T* out, float* dsum, int b,   \
                                                int nh, int t, int hd) {                          \
        attn_bwd_dot<T>(dout, out, dsum, b, nh, t, hd);                                           \
    }
DOT_KERNEL(bf16, bf16)
DOT_KERNEL(f16, f16)
