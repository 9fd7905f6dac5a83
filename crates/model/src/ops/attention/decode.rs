//! Decoding attention: a few new positions over a KV cache, read in place.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dot_lanes, AttnDims, RowMask, SendPtr};
use super::full::{acc_slices, attention_with, check_mask, check_qkv, check_ranges, with_row_mask};
use super::mask::AttnMask;
use crate::ops::cpu::simd::exp_shift_sum_f32;
#[cfg(target_arch = "x86_64")]
use crate::ops::cpu::simd::has_avx2;
use crate::ops::dispatch::{by_dtype, Acc, Elem};

/// Query positions up to which [`attention_cached`] runs its direct loops; longer blocks (a
/// prefill) go through [`super::attention`]'s matrix products.
const DECODE_MAX_T: usize = 4;

/// Attention of `t` new positions over a KV cache, forward only (generation):
/// `out = softmax(scale * Q K^T + mask) V` as (b, t, heads * head_dim), like
/// [`super::attention`].
///
/// `q`: (b, heads, t, head_dim). `k_cache`, `v_cache`: (b, kv_heads, capacity, head_dim)
/// contiguous buffers whose first `s` positions hold keys and values. `mask`: additive,
/// (b or 1, 1, t, s). Decoding steps (`t` of a few positions, f32 or f64 on the CPU) read the
/// cache in place with one task per kv group (its keys stay in cache for the group's query
/// heads): a matrix-product call per head costs more than the work at these sizes, and copying
/// the cache's first `s` positions out would move the whole cache every step. Longer blocks and
/// other devices take [`super::attention`] on the narrowed cache.
pub fn attention_cached(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    s: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let mask = mask.cloned().map(AttnMask::Additive);
    attention_cached_with(q, k_cache, v_cache, s, mask.as_ref(), scale)
}

/// [`attention_cached`] with any [`AttnMask`].
pub fn attention_cached_with(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    s: usize,
    mask: Option<&AttnMask>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (bk, nkv, cap, hdk) = k_cache.dims4()?;
    let direct = crate::ops::cpu_kernels(q.device())
        && t <= DECODE_MAX_T
        && matches!(q.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && k_cache.dtype() == q.dtype()
        && v_cache.dtype() == q.dtype()
        && k_cache.is_contiguous()
        && v_cache.is_contiguous()
        && v_cache.dims() == k_cache.dims()
        && bk == b
        && hdk == hd
        && s <= cap
        && nkv > 0
        && nh % nkv == 0;
    let (k, v) = (k_cache.narrow(2, 0, s)?, v_cache.narrow(2, 0, s)?);
    if !direct {
        return attention_with(q, &k, &v, mask, scale);
    }
    let d = check_qkv(q, &k, &v, "attention_cached")?;
    let mask = match mask {
        None => None,
        Some(AttnMask::Additive(m)) => {
            check_mask(m, (b, t, s), "attention_cached")?;
            Some(AttnMask::Additive(m.to_dtype(q.dtype())?.contiguous()?))
        }
        Some(AttnMask::Ranges(r)) => {
            check_ranges(r, d, "attention_cached")?;
            Some(AttnMask::Ranges(r.clone()))
        }
    };
    q.contiguous()?
        .apply_op3_no_bwd(k_cache, v_cache, &CachedAttention { mask, scale, s })
}

/// [`attention_cached`]'s direct path as an op (forward only): q, then the whole K and V
/// caches, of which the first `s` positions are read.
struct CachedAttention {
    /// Additive masks in q's dtype, contiguous.
    mask: Option<AttnMask>,
    scale: f64,
    s: usize,
}

fn cached_cpu<T: Elem>(
    op: &CachedAttention,
    (sq, lq): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
) -> Result<CpuStorage>
where
    T::A: candle_core::WithDType + DecodeRow,
{
    let (b, nh, t, hd) = lq.shape().dims4()?;
    let (_, nkv, cap, _) = lk.shape().dims4()?;
    let d = AttnDims {
        b,
        nh,
        nkv,
        t,
        s: op.s,
        hd,
    };
    let name = "attention_cached";
    // Direct calls are f32 or f64 (checked above), where these borrow.
    let [q, k, v] = acc_slices::<T>([(sq, lq), (sk, lk), (sv, lv)], name)?;
    let scale = T::a(op.scale);
    let out = with_row_mask(op.mask.as_ref(), |m| {
        decode_attention_slices(d, cap, &q, &k, &v, m, scale)
    })?;
    Ok(T::store_from_a(out))
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "sft-cached-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, nh, t, hd) = lq.shape().dims4()?;
        let out = by_dtype!(
            sq.dtype(),
            "attention_cached",
            cached_cpu(self, (sq, lq), (sk, lk), (sv, lv))
        )?;
        Ok((out, Shape::from((b, t, nh * hd))))
    }
}

/// The row loop of decoding attention in the arithmetic type: the generic loop, or AVX2 for f32.
pub(crate) trait DecodeRow: Acc {
    /// One query row of decoding attention against `s` keys of a kv group (`kg`, `vg`: `s`
    /// rows of the row's width): `o = softmax(scale * kg q + m) vg`, with `p` as scratch of `s`.
    #[allow(clippy::too_many_arguments)]
    fn decode_row(
        q: &[Self],
        kg: &[Self],
        vg: &[Self],
        m: Option<&[Self]>,
        scale: Self,
        p: &mut [Self],
        o: &mut [Self],
    ) {
        decode_row_body(q, kg, vg, m, scale, p, o)
    }
}

impl DecodeRow for f64 {}

impl DecodeRow for f32 {
    fn decode_row(
        q: &[f32],
        kg: &[f32],
        vg: &[f32],
        m: Option<&[f32]>,
        scale: f32,
        p: &mut [f32],
        o: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && q.len().is_multiple_of(8) {
            // SAFETY: the CPU has AVX2 and FMA; rows are a multiple of 8 wide.
            return unsafe { decode_row_f32_avx2(q, kg, vg, m, scale, p, o) };
        }
        decode_row_body(q, kg, vg, m, scale, p, o)
    }
}

/// [`attention_cached`]'s direct loops on slices: one task per (batch row, kv group).
fn decode_attention_slices<T: DecodeRow>(
    d: AttnDims,
    cap: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: RowMask<'_, T>,
    scale: T,
) -> Vec<T> {
    let (t, s, hd, nh, n_rep) = (d.t, d.s, d.hd, d.nh, d.n_rep());
    let mut out = vec![T::zero(); d.b * t * nh * hd];
    // Task (bi, g) writes heads g * n_rep.. of every position of row bi: (t, n_rep * hd)
    // strided pieces, so the tasks get raw pointers.
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |task: usize| {
        let (bi, g) = (task / d.nkv, task % d.nkv);
        let kg = &k[(bi * d.nkv + g) * cap * hd..][..s * hd];
        let vg = &v[(bi * d.nkv + g) * cap * hd..][..s * hd];
        let mut p = vec![T::zero(); s];
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for tq in 0..t {
                let qrow = &q[((bi * nh + h) * t + tq) * hd..][..hd];
                let (lo, hi, add) = mask.row(d, bi, tq);
                // SAFETY: (bi, tq, h) is written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.get().add(((bi * t + tq) * nh + h) * hd),
                        hd,
                    )
                };
                if lo >= hi {
                    dst.iter_mut().for_each(|x| *x = T::zero());
                    continue;
                }
                T::decode_row(
                    qrow,
                    &kg[lo * hd..hi * hd],
                    &vg[lo * hd..hi * hd],
                    add.map(|m| &m[lo..hi]),
                    scale,
                    &mut p[..hi - lo],
                    dst,
                );
            }
        }
    };
    let tasks = d.b * d.nkv;
    if tasks * n_rep * t * s * hd < 1 << 15 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
    out
}

/// [`decode_row_body`] for f32 rows a multiple of 8 wide, with fused multiply-adds (Rust does
/// not contract `a * b + c` on its own) and four accumulators in the dot products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn decode_row_f32_avx2(
    q: &[f32],
    kg: &[f32],
    vg: &[f32],
    m: Option<&[f32]>,
    scale: f32,
    p: &mut [f32],
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let s = p.len();
    assert!(kg.len() >= s * hd && vg.len() >= s * hd && o.len() == hd && hd.is_multiple_of(8));
    let (qp, kp, vp, op) = (q.as_ptr(), kg.as_ptr(), vg.as_ptr(), o.as_mut_ptr());
    let mut max = f32::NEG_INFINITY;
    for j in 0..s {
        let mj = m.map_or(0.0, |m| m[j]);
        if mj == f32::NEG_INFINITY {
            p[j] = mj;
            continue;
        }
        let kj = kp.add(j * hd);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= hd {
            for (a, lane) in acc.iter_mut().enumerate() {
                let off = i + 8 * a;
                *lane = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(off)),
                    _mm256_loadu_ps(kj.add(off)),
                    *lane,
                );
            }
            i += 32;
        }
        while i < hd {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(qp.add(i)),
                _mm256_loadu_ps(kj.add(i)),
                acc[0],
            );
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        let v = _mm_add_ss(v, _mm_movehdup_ps(v));
        p[j] = scale * _mm_cvtss_f32(v) + mj;
        max = max.max(p[j]);
    }
    o.iter_mut().for_each(|x| *x = 0.0);
    if max == f32::NEG_INFINITY {
        return;
    }
    // The portable loop, inlined here under AVX2 (`f32::exp_shift_sum` would dispatch again).
    let inv = exp_shift_sum_f32(p, max).recip();
    for (j, &pj) in p.iter().enumerate() {
        if pj == 0.0 {
            continue;
        }
        let w = _mm256_set1_ps(pj * inv);
        let vj = vp.add(j * hd);
        for i in (0..hd).step_by(8) {
            let acc = _mm256_loadu_ps(op.add(i));
            _mm256_storeu_ps(
                op.add(i),
                _mm256_fmadd_ps(w, _mm256_loadu_ps(vj.add(i)), acc),
            );
        }
    }
}

#[inline(always)]
pub(crate) fn decode_row_body<T: Acc>(
    qrow: &[T],
    kg: &[T],
    vg: &[T],
    mrow: Option<&[T]>,
    scale: T,
    p: &mut [T],
    o: &mut [T],
) {
    let hd = qrow.len();
    let mut max = T::neg_infinity();
    for (j, (pj, kj)) in p.iter_mut().zip(kg.chunks_exact(hd)).enumerate() {
        let m = mrow.map_or(T::zero(), |m| m[j]);
        *pj = if m == T::neg_infinity() {
            m
        } else {
            scale * dot_lanes(qrow, kj) + m
        };
        max = max.max(*pj);
    }
    o.iter_mut().for_each(|x| *x = T::zero());
    if max == T::neg_infinity() {
        // A fully masked row gives zeros, as in [`attention`].
        return;
    }
    let inv = T::exp_shift_sum(p, max).recip();
    for (&pj, vj) in p.iter().zip(vg.chunks_exact(hd)) {
        if pj != T::zero() {
            let w = pj * inv;
            o.iter_mut().zip(vj).for_each(|(x, &vv)| *x += w * vv);
        }
    }
}
