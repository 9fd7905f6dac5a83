//! The CPU kernels of [`super::attention`]: per kv group, the probabilities block by block (64
//! query rows), only over the keys the block's rows may see, through products on raw strided
//! matrices (f32: the f32 kernel `SFT_CPU_KERNELS` chose, see `packed_gemm::gemm_f32`; f64 and
//! the portable path: the `gemm` crate); the backward recomputes them.
use rayon::prelude::*;

use crate::cpu_features::Kernels;
use crate::ops::dispatch::Acc;
use crate::ops::linear::packed_gemm::gemm_f32;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnDims {
    pub b: usize,
    pub nh: usize,
    pub nkv: usize,
    pub t: usize,
    pub s: usize,
    pub hd: usize,
}

impl AttnDims {
    pub fn n_rep(&self) -> usize {
        self.nh / self.nkv
    }
}

/// Which keys each query row may see, as the kernels read it.
#[derive(Clone, Copy)]
pub(crate) enum RowMask<'a, T> {
    None,
    /// Additive rows (mb, t, s), `mb` 1 or b: 0 where allowed, `-inf` where not.
    Additive(&'a [T], usize),
    /// Key ranges: query (bi, i) sees keys `starts[bi * t + i] ..= past + i`.
    Ranges(&'a [u32], usize),
}

impl<'a, T: Acc> RowMask<'a, T> {
    /// The keys query (bi, tq) may see as `[lo, hi)` (for an additive mask: all `s`, the mask
    /// row says the rest), and its additive row.
    #[inline]
    pub fn row(&self, d: AttnDims, bi: usize, tq: usize) -> (usize, usize, Option<&'a [T]>) {
        let (t, s) = (d.t, d.s);
        match *self {
            RowMask::None => (0, s, None),
            RowMask::Additive(m, mb) => {
                let r = &m[((if mb == 1 { 0 } else { bi }) * t + tq) * s..][..s];
                (0, s, Some(r))
            }
            RowMask::Ranges(st, past) => (
                (st[bi * t + tq] as usize).min(s),
                (past + tq + 1).min(s),
                None,
            ),
        }
    }

    /// The exact `[lo, hi)` of row (bi, tq): for an additive row, its first and last allowed
    /// keys (`lo == hi` when none is).
    fn extent(&self, d: AttnDims, bi: usize, tq: usize) -> (usize, usize) {
        let (lo, hi, add) = self.row(d, bi, tq);
        match add {
            None => (lo, hi),
            Some(r) => {
                let hi = r
                    .iter()
                    .rposition(|&v| v != T::neg_infinity())
                    .map_or(0, |j| j + 1);
                let lo = r[..hi]
                    .iter()
                    .position(|&v| v != T::neg_infinity())
                    .unwrap_or(hi);
                (lo, hi)
            }
        }
    }
}

/// Query rows per block of [`key_blocks`].
pub(crate) const ATTN_BLOCK: usize = 64;

/// One block of query rows `t0..t1` and the keys `c0..c1` any of its rows may see: a causal
/// mask needs only the lower-left part of Q K^T (about half of it), packed segments only the
/// blocks along the diagonal, so every product below runs on `c1 - c0` keys instead of `s`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyBlock {
    pub t0: usize,
    pub t1: usize,
    pub c0: usize,
    pub c1: usize,
}

/// The blocks of batch row `bi` (block `i` starts at `i * ATTN_BLOCK`).
pub(crate) fn key_blocks<T: Acc>(d: AttnDims, bi: usize, mask: RowMask<'_, T>) -> Vec<KeyBlock> {
    (0..d.t)
        .step_by(ATTN_BLOCK)
        .map(|t0| {
            let t1 = (t0 + ATTN_BLOCK).min(d.t);
            let (mut c0, mut c1) = (d.s, 0);
            for tq in t0..t1 {
                let (lo, hi) = mask.extent(d, bi, tq);
                if lo < hi {
                    c0 = c0.min(lo);
                    c1 = c1.max(hi);
                }
            }
            if c0 >= c1 {
                (c0, c1) = (0, 0);
            }
            KeyBlock { t0, t1, c0, c1 }
        })
        .collect()
}

/// `C = [C +] beta · A · B` on raw strided matrices, single-threaded (callers split the work).
/// Strides are (row, column) in elements. f32 goes through the f32 kernel of `kernels` (the
/// `gemm` crate where they are portable), f64 through the `gemm` crate.
///
/// # Safety
/// Every pointer must address the whole matrix its shape and strides describe; `c` overlaps
/// neither `a` nor `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm<T: Acc>(
    kernels: Kernels,
    c: *mut T,
    c_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
    accumulate: bool,
    beta: T,
) {
    // k = 0 (a block with no allowed key) adds nothing; callers' buffers start at zero.
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // T is f32: the casts are identities.
        let beta = *(&beta as *const T as *const f32);
        let (c, a, b) = (c as *mut f32, a as *const f32, b as *const f32);
        let st = ((a_rs, a_cs), (b_rs, b_cs));
        if gemm_f32(
            kernels,
            c,
            c_rs,
            (m, n, k),
            a,
            st.0,
            b,
            st.1,
            accumulate,
            beta,
            false,
        ) {
            return;
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::one(),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// A pointer that may cross threads: every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// One kv group's task in the attention backward: its index and its dq, dk, dv slices.
type GroupGrads<'a, T> = (((usize, &'a mut [T]), &'a mut [T]), &'a mut [T]);

/// `a · b` with 8 partial sums (a fixed order the compiler can vectorize).
#[inline(always)]
pub(crate) fn dot_lanes<T: Acc>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(xa).zip(xb) {
            *l += x * y;
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// `P = softmax(scale * Q_g K_g^T + mask)` for kv group (bi, g): (n_rep * t, s) row-major.
/// Only each block's key columns `c0..c1` are written (`p` must hold zeros beyond).
#[allow(clippy::too_many_arguments)]
fn attn_probs<T: Acc>(
    kernels: Kernels,
    d: AttnDims,
    (bi, g): (usize, usize),
    q: &[T],
    k: &[T],
    mask: RowMask<'_, T>,
    blocks: &[KeyBlock],
    scale: T,
    p: &mut [T],
) {
    let (rows, s, hd, t) = (d.n_rep() * d.t, d.s, d.hd, d.t);
    let qg = &q[(bi * d.nh + g * d.n_rep()) * t * hd..][..rows * hd];
    let kg = &k[(bi * d.nkv + g) * s * hd..][..s * hd];
    for r in 0..d.n_rep() {
        for b in blocks {
            let i0 = r * t + b.t0;
            // SAFETY: rows i0..i0 + (t1 - t0) of qg (hd wide) and of p (s wide, from column
            // c0), rows c0..c1 of kg.
            unsafe {
                mm(
                    kernels,
                    p[i0 * s + b.c0..].as_mut_ptr(),
                    s,
                    (b.t1 - b.t0, b.c1 - b.c0, hd),
                    qg[i0 * hd..].as_ptr(),
                    (hd, 1),
                    kg[b.c0 * hd..].as_ptr(),
                    (1, hd),
                    false,
                    scale,
                );
            }
        }
    }
    for (i, row) in p.chunks_exact_mut(s).enumerate() {
        let tq = i % t;
        let blk = blocks[tq / ATTN_BLOCK];
        let (lo, hi, add) = mask.row(d, bi, tq);
        let (lo, hi) = (lo.max(blk.c0), hi.min(blk.c1));
        if lo >= hi {
            row[blk.c0..blk.c1].iter_mut().for_each(|x| *x = T::zero());
            continue;
        }
        row[blk.c0..lo].iter_mut().for_each(|x| *x = T::zero());
        row[hi..blk.c1].iter_mut().for_each(|x| *x = T::zero());
        let row = &mut row[lo..hi];
        if let Some(m) = add {
            row.iter_mut().zip(&m[lo..hi]).for_each(|(x, &mv)| *x += mv);
        }
        let max = row.iter().fold(T::neg_infinity(), |a, &x| a.max(x));
        if max == T::neg_infinity() {
            row.iter_mut().for_each(|x| *x = T::zero());
            continue;
        }
        let sum = T::exp_shift_sum(row, max);
        let inv = sum.recip();
        row.iter_mut().for_each(|x| *x = *x * inv);
    }
}

/// The forward: (b, t, nh * hd) in the compute type.
pub(crate) fn attn_fwd<T: Acc>(
    kernels: Kernels,
    d: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: RowMask<'_, T>,
    scale: T,
) -> Vec<T> {
    let (t, s, hd, nh, n_rep) = (d.t, d.s, d.hd, d.nh, d.n_rep());
    let mut out = vec![T::zero(); d.b * t * nh * hd];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let groups: Vec<(usize, usize)> = (0..d.b)
        .flat_map(|bi| (0..d.nkv).map(move |g| (bi, g)))
        .collect();
    // The key limits depend on the batch row only, not on the kv group.
    let row_blocks: Vec<_> = (0..d.b).map(|bi| key_blocks(d, bi, mask)).collect();
    let run = |&(bi, g): &(usize, usize)| {
        let blocks = &row_blocks[bi];
        let mut p = vec![T::zero(); n_rep * t * s];
        attn_probs(kernels, d, (bi, g), q, k, mask, blocks, scale, &mut p);
        let vg = &v[(bi * d.nkv + g) * s * hd..][..s * hd];
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for b in blocks {
                // Rows tq of head h land at out[bi, tq, h, :], nh * hd apart.
                // SAFETY: each (bi, h) writes its own t x hd elements of `out`.
                unsafe {
                    mm(
                        kernels,
                        out_ptr.get().add(((bi * t + b.t0) * nh + h) * hd),
                        nh * hd,
                        (b.t1 - b.t0, hd, b.c1 - b.c0),
                        p[(r * t + b.t0) * s + b.c0..].as_ptr(),
                        (s, 1),
                        vg[b.c0 * hd..].as_ptr(),
                        (hd, 1),
                        false,
                        T::one(),
                    );
                }
            }
        }
    };
    if d.b * nh * t * s * hd < 1 << 18 {
        groups.iter().for_each(run);
    } else {
        groups.par_iter().for_each(run);
    }
    out
}

/// Gradients of q, k and v (in the compute type), laid out as q, k, v.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attn_bwd<T: Acc>(
    kernels: Kernels,
    d: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: RowMask<'_, T>,
    scale: T,
    dout: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, s, hd, nh, n_rep) = (d.t, d.s, d.hd, d.nh, d.n_rep());
    let rows = n_rep * t;
    let row_blocks: Vec<_> = (0..d.b).map(|bi| key_blocks(d, bi, mask)).collect();
    let mut dq = vec![T::zero(); d.b * nh * t * hd];
    let mut dk = vec![T::zero(); d.b * d.nkv * s * hd];
    let mut dv = vec![T::zero(); d.b * d.nkv * s * hd];
    let run = |(((gi, dq_g), dk_g), dv_g): GroupGrads<'_, T>| {
        let (bi, g) = (gi / d.nkv, gi % d.nkv);
        let blocks = &row_blocks[bi];
        let mut p = vec![T::zero(); rows * s];
        attn_probs(kernels, d, (bi, g), q, k, mask, blocks, scale, &mut p);
        let qg = &q[(bi * nh + g * n_rep) * t * hd..][..rows * hd];
        let kg = &k[(bi * d.nkv + g) * s * hd..][..s * hd];
        let vg = &v[(bi * d.nkv + g) * s * hd..][..s * hd];
        let mut dp = vec![T::zero(); rows * s];
        // dV, dK and dQ accumulate over blocks into these zeroed buffers.
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for b in blocks {
                let (i0, nk) = (r * t + b.t0, b.c1 - b.c0);
                let dor = dout[((bi * t + b.t0) * nh + h) * hd..].as_ptr();
                // SAFETY: dO rows of head h are nh * hd apart; rows i0.. of p and dp hold
                // t1 - t0 rows of s, from column c0; rows c0..c1 of vg and dv_g.
                unsafe {
                    // dP_r = dO_r V^T
                    mm(
                        kernels,
                        dp[i0 * s + b.c0..].as_mut_ptr(),
                        s,
                        (b.t1 - b.t0, nk, hd),
                        dor,
                        (nh * hd, 1),
                        vg[b.c0 * hd..].as_ptr(),
                        (1, hd),
                        false,
                        T::one(),
                    );
                    // dV += P_r^T dO_r
                    mm(
                        kernels,
                        dv_g[b.c0 * hd..].as_mut_ptr(),
                        hd,
                        (nk, hd, b.t1 - b.t0),
                        p[i0 * s + b.c0..].as_ptr(),
                        (1, s),
                        dor,
                        (nh * hd, 1),
                        true,
                        T::one(),
                    );
                }
            }
        }
        // dS = P (dP - rowsum(dP P)), in place in dp (zero where P is, outside the block).
        for (i, (dpr, pr)) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)).enumerate() {
            let b = blocks[(i % t) / ATTN_BLOCK];
            let (dpr, pr) = (&mut dpr[b.c0..b.c1], &pr[b.c0..b.c1]);
            let dot = dot_lanes(dpr, pr);
            dpr.iter_mut()
                .zip(pr)
                .for_each(|(x, &pv)| *x = pv * (*x - dot));
        }
        for r in 0..n_rep {
            for b in blocks {
                let (i0, nk) = (r * t + b.t0, b.c1 - b.c0);
                // SAFETY: as above; dq_g is rows x hd, dk_g s x hd.
                unsafe {
                    // dQ = scale dS K
                    mm(
                        kernels,
                        dq_g[i0 * hd..].as_mut_ptr(),
                        hd,
                        (b.t1 - b.t0, hd, nk),
                        dp[i0 * s + b.c0..].as_ptr(),
                        (s, 1),
                        kg[b.c0 * hd..].as_ptr(),
                        (hd, 1),
                        false,
                        scale,
                    );
                    // dK += scale dS^T Q
                    mm(
                        kernels,
                        dk_g[b.c0 * hd..].as_mut_ptr(),
                        hd,
                        (nk, hd, b.t1 - b.t0),
                        dp[i0 * s + b.c0..].as_ptr(),
                        (1, s),
                        qg[i0 * hd..].as_ptr(),
                        (hd, 1),
                        true,
                        scale,
                    );
                }
            }
        }
    };
    if d.b * nh * t * s * hd < 1 << 18 {
        dq.chunks_mut(rows * hd)
            .enumerate()
            .zip(dk.chunks_mut(s * hd))
            .zip(dv.chunks_mut(s * hd))
            .for_each(run);
    } else {
        dq.par_chunks_mut(rows * hd)
            .enumerate()
            .zip(dk.par_chunks_mut(s * hd))
            .zip(dv.par_chunks_mut(s * hd))
            .for_each(run);
    }
    (dq, dk, dv)
}
