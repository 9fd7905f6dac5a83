//! Multi-head attention with grouped K/V heads: the training op (forward and a backward that
//! recomputes the probabilities) and the decoding path over a KV cache (`decode`).
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::ops::cpu::cont;
use crate::ops::dispatch::{Acc, Elem};
use crate::ops::softmax_last_dim;

pub(crate) mod decode;
pub use decode::attention_cached;

/// Multi-head attention with grouped K/V heads as one graph node:
/// `out = softmax(scale * Q K^T + mask) V`, returned as (b, t, heads * head_dim), the layout the
/// output projection takes (no transpose or copy nodes around it).
///
/// `q`: (b, heads, t, head_dim); `k`, `v`: (b, kv_heads, s, head_dim), `heads` a multiple of
/// `kv_heads` (query head h reads kv head h / (heads / kv_heads)); any layouts. `mask`:
/// additive, (b or 1, 1, t, s), a constant (`-inf` masks; a fully masked row gives zeros).
/// Half-precision inputs are computed in f32 (softmax included, as transformers does) and the
/// output rounded once. The backward recomputes the probabilities instead of keeping them, so
/// the graph holds no (t × s) tensor per layer.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (bk, nkv, s, hdk) = k.dims4()?;
    if bk != b || hdk != hd || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit (heads a multiple of kv heads)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} differ in dtype",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    let ct = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mask = match mask {
        None => None,
        Some(m) => {
            check_mask(m, (b, t, s), "attention")?;
            Some(m.to_dtype(ct)?.contiguous()?)
        }
    };
    if !q.device().is_cpu() {
        return attention_composed(q, k, v, mask.as_ref(), scale);
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention { mask, scale },
    )
}

/// An additive attention mask must be (b or 1, 1, t, s).
fn check_mask(m: &Tensor, (b, t, s): (usize, usize, usize), op: &str) -> Result<()> {
    let d = m.dims();
    if !(d.len() == 4 && (d[0] == b || d[0] == 1) && d[1] == 1 && d[2] == t && d[3] == s) {
        bail!("{op}: mask {d:?}, expected ({b} or 1, 1, {t}, {s})");
    }
    Ok(())
}

/// The same computation from candle's ops (other devices).
fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let ct = mask
        .map(|m| m.dtype())
        .unwrap_or(if q.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        });
    let n_rep = nh / nkv;
    let q = (q.to_dtype(ct)?.contiguous()? * scale)?.reshape((b, nkv, n_rep * t, hd))?;
    let k = k.to_dtype(ct)?;
    let v = v.to_dtype(ct)?.contiguous()?;
    let scores = q.matmul(&k.t()?)?.reshape((b, nh, t, s))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?.reshape((b, nkv, n_rep * t, s))?;
    probs
        .matmul(&v)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))
}

struct Attention {
    /// Additive mask (b or 1, 1, t, s) in the compute dtype, contiguous.
    mask: Option<Tensor>,
    scale: f64,
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    hd: usize,
}

impl AttnDims {
    fn n_rep(&self) -> usize {
        self.nh / self.nkv
    }
}

/// `C = [C +] A · B` on raw strided matrices, single-threaded (callers split the work).
/// Strides are (row, column) in elements.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Acc>(
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
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// One kv group's task in the attention backward: its index and its dq, dk, dv slices.
type GroupGrads<'a, T> = (((usize, &'a mut [T]), &'a mut [T]), &'a mut [T]);

/// `a · b` with 8 partial sums (a fixed order the compiler can vectorize).
#[inline(always)]
fn dot_lanes<T: Acc>(a: &[T], b: &[T]) -> T {
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

/// Query rows per block of [`key_blocks`].
const ATTN_BLOCK: usize = 64;

/// Blocks `(t0, t1, c)` of query positions `t0..t1` (block `i` starts at `i * ATTN_BLOCK`)
/// whose mask rows allow no key at or after `c`: a causal mask needs only the lower-left part of Q K^T, about half of it, so every
/// product below runs on `c` keys instead of `s`. Without a mask, `c = s`.
fn key_blocks<T: Acc>(
    d: AttnDims,
    bi: usize,
    mask: Option<(&[T], usize)>,
) -> Vec<(usize, usize, usize)> {
    let (t, s) = (d.t, d.s);
    (0..t)
        .step_by(ATTN_BLOCK)
        .map(|t0| {
            let t1 = (t0 + ATTN_BLOCK).min(t);
            let c = match mask {
                None => s,
                Some((m, mb)) => (t0..t1)
                    .map(|tq| {
                        let mrow = &m[((if mb == 1 { 0 } else { bi }) * t + tq) * s..][..s];
                        mrow.iter()
                            .rposition(|&v| v != T::neg_infinity())
                            .map_or(0, |j| j + 1)
                    })
                    .max()
                    .unwrap_or(0),
            };
            (t0, t1, c)
        })
        .collect()
}

/// `P = softmax(scale * Q_g K_g^T + mask)` for kv group (bi, g): (n_rep * t, s) row-major.
/// Only the columns before each block's key limit are written (`p` must hold zeros beyond).
#[allow(clippy::too_many_arguments)]
fn attn_probs<T: Acc>(
    d: AttnDims,
    (bi, g): (usize, usize),
    q: &[T],
    k: &[T],
    mask: Option<(&[T], usize)>,
    blocks: &[(usize, usize, usize)],
    scale: T,
    p: &mut [T],
) {
    let (rows, s, hd, t) = (d.n_rep() * d.t, d.s, d.hd, d.t);
    let qg = &q[(bi * d.nh + g * d.n_rep()) * t * hd..][..rows * hd];
    let kg = &k[(bi * d.nkv + g) * s * hd..][..s * hd];
    for r in 0..d.n_rep() {
        for &(t0, t1, c) in blocks {
            let i0 = r * t + t0;
            // SAFETY: rows i0..i0 + (t1 - t0) of qg (hd wide) and of p (s wide), c <= s rows
            // of kg.
            unsafe {
                mm(
                    p[i0 * s..].as_mut_ptr(),
                    s,
                    (t1 - t0, c, hd),
                    qg[i0 * hd..].as_ptr(),
                    (hd, 1),
                    kg.as_ptr(),
                    (1, hd),
                    false,
                    scale,
                );
            }
        }
    }
    for (i, row) in p.chunks_exact_mut(s).enumerate() {
        let tq = i % t;
        let row = &mut row[..blocks[tq / ATTN_BLOCK].2];
        if let Some((m, mb)) = mask {
            let mrow = &m[((if mb == 1 { 0 } else { bi }) * t + tq) * s..][..row.len()];
            row.iter_mut().zip(mrow).for_each(|(x, &mv)| *x += mv);
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

fn attn_fwd<T: Acc>(
    d: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<(&[T], usize)>,
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
        attn_probs(d, (bi, g), q, k, mask, blocks, scale, &mut p);
        let vg = &v[(bi * d.nkv + g) * s * hd..][..s * hd];
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for &(t0, t1, c) in blocks {
                // Rows tq of head h land at out[bi, tq, h, :], nh * hd apart.
                // SAFETY: each (bi, h) writes its own t x hd elements of `out`.
                unsafe {
                    mm(
                        out_ptr.get().add(((bi * t + t0) * nh + h) * hd),
                        nh * hd,
                        (t1 - t0, hd, c),
                        p[(r * t + t0) * s..].as_ptr(),
                        (s, 1),
                        vg.as_ptr(),
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

/// Query positions up to which [`attention_cached`] runs its direct loops; longer blocks (a
/// prefill) go through [`attention`]'s matrix products.

/// Gradients of q, k and v (in the compute type), laid out as q, k, v.
#[allow(clippy::too_many_arguments)]
fn attn_bwd<T: Acc>(
    d: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<(&[T], usize)>,
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
        attn_probs(d, (bi, g), q, k, mask, blocks, scale, &mut p);
        let qg = &q[(bi * nh + g * n_rep) * t * hd..][..rows * hd];
        let kg = &k[(bi * d.nkv + g) * s * hd..][..s * hd];
        let vg = &v[(bi * d.nkv + g) * s * hd..][..s * hd];
        let mut dp = vec![T::zero(); rows * s];
        // dV, dK and dQ accumulate over blocks into these zeroed buffers.
        for r in 0..n_rep {
            let h = g * n_rep + r;
            for &(t0, t1, c) in blocks {
                let i0 = r * t + t0;
                let dor = dout[((bi * t + t0) * nh + h) * hd..].as_ptr();
                // SAFETY: dO rows of head h are nh * hd apart; rows i0.. of p and dp hold
                // t1 - t0 rows of s; c <= s.
                unsafe {
                    // dP_r = dO_r V^T
                    mm(
                        dp[i0 * s..].as_mut_ptr(),
                        s,
                        (t1 - t0, c, hd),
                        dor,
                        (nh * hd, 1),
                        vg.as_ptr(),
                        (1, hd),
                        false,
                        T::one(),
                    );
                    // dV += P_r^T dO_r
                    mm(
                        dv_g.as_mut_ptr(),
                        hd,
                        (c, hd, t1 - t0),
                        p[i0 * s..].as_ptr(),
                        (1, s),
                        dor,
                        (nh * hd, 1),
                        true,
                        T::one(),
                    );
                }
            }
        }
        // dS = P (dP - rowsum(dP P)), in place in dp (zero where P is, past the key limit).
        for (i, (dpr, pr)) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)).enumerate() {
            let c = blocks[(i % t) / ATTN_BLOCK].2;
            let (dpr, pr) = (&mut dpr[..c], &pr[..c]);
            let dot = dot_lanes(dpr, pr);
            dpr.iter_mut()
                .zip(pr)
                .for_each(|(x, &pv)| *x = pv * (*x - dot));
        }
        for r in 0..n_rep {
            for &(t0, t1, c) in blocks {
                let i0 = r * t + t0;
                // SAFETY: as above; dq_g is rows x hd, dk_g s x hd.
                unsafe {
                    // dQ = scale dS K
                    mm(
                        dq_g[i0 * hd..].as_mut_ptr(),
                        hd,
                        (t1 - t0, hd, c),
                        dp[i0 * s..].as_ptr(),
                        (s, 1),
                        kg.as_ptr(),
                        (hd, 1),
                        false,
                        scale,
                    );
                    // dK += scale dS^T Q
                    mm(
                        dk_g.as_mut_ptr(),
                        hd,
                        (c, hd, t1 - t0),
                        dp[i0 * s..].as_ptr(),
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

impl Attention {
    fn dims(lq: &Layout, lk: &Layout) -> Result<AttnDims> {
        let (b, nh, t, hd) = lq.shape().dims4()?;
        let (_, nkv, s, _) = lk.shape().dims4()?;
        Ok(AttnDims {
            b,
            nh,
            nkv,
            t,
            s,
            hd,
        })
    }

    fn with_mask<T: WithDType, R>(&self, f: impl FnOnce(Option<(&[T], usize)>) -> R) -> Result<R> {
        with_mask(self.mask.as_ref(), f)
    }
}

/// An attention mask as a slice of the compute type and its batch size, passed to `f`.
fn with_mask<T: WithDType, R>(
    mask: Option<&Tensor>,
    f: impl FnOnce(Option<(&[T], usize)>) -> R,
) -> Result<R> {
    match mask {
        None => Ok(f(None)),
        Some(m) => {
            let (ms, ml) = m.storage_and_layout();
            let candle_core::Storage::Cpu(ms) = &*ms else {
                bail!("attention: the mask is not on the CPU");
            };
            let mv = cont::<T>(ms, ml, "attention mask")?;
            Ok(f(Some((mv, ml.dims()[0]))))
        }
    }
}

/// Contiguous float data as a Vec of the compute type (f32, or f64 for f64).
fn to_compute_f32(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<std::borrow::Cow<'static, [f32]>> {
    Ok(std::borrow::Cow::Owned(match s.dtype() {
        DType::BF16 => cont::<bf16>(s, l, op)?.iter().map(|v| v.to_a()).collect(),
        DType::F16 => cont::<f16>(s, l, op)?.iter().map(|v| v.to_f32()).collect(),
        DType::F32 => cont::<f32>(s, l, op)?.to_vec(),
        dt => bail!("{op}: unsupported dtype {dt:?}"),
    }))
}

/// f32 results in the storage dtype `dt`.
fn from_compute_f32(v: Vec<f32>, dt: DType) -> CpuStorage {
    match dt {
        DType::BF16 => CpuStorage::BF16(crate::ops::packed_gemm::to_bf16(&v)),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "sft-attention"
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
        let d = Self::dims(lq, lk)?;
        let shape = Shape::from((d.b, d.t, d.nh * d.hd));
        if sq.dtype() == DType::F64 {
            let (q, k, v) = (
                cont::<f64>(sq, lq, "attention")?,
                cont::<f64>(sk, lk, "attention")?,
                cont::<f64>(sv, lv, "attention")?,
            );
            let out = self.with_mask::<f64, _>(|m| attn_fwd(d, q, k, v, m, self.scale))?;
            return Ok((CpuStorage::F64(out), shape));
        }
        let q = to_compute_f32(sq, lq, "attention")?;
        let k = to_compute_f32(sk, lk, "attention")?;
        let v = to_compute_f32(sv, lv, "attention")?;
        let out = self.with_mask::<f32, _>(|m| attn_fwd(d, &q, &k, &v, m, self.scale as f32))?;
        Ok((from_compute_f32(out, sq.dtype()), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grads = q.apply_op3_no_bwd(
            k,
            v,
            &AttentionBwd {
                mask: self.mask.clone(),
                scale: self.scale,
                grad,
            },
        )?;
        // The backward op returns dq, dk, dv concatenated, flattened.
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = grads.narrow(0, 0, nq)?.reshape(q.dims())?;
        let dk = grads.narrow(0, nq, nk)?.reshape(k.dims())?;
        let dv = grads.narrow(0, nq + nk, nk)?.reshape(v.dims())?;
        Ok((
            q.track_op().then_some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}

/// The backward of [`Attention`] as one op: dq, dk and dv concatenated into one flat tensor.
struct AttentionBwd {
    mask: Option<Tensor>,
    scale: f64,
    /// d out, (b, t, heads * head_dim), contiguous.
    grad: Tensor,
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "sft-attention-bwd"
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
        let d = Attention::dims(lq, lk)?;
        let (gs, gl) = self.grad.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else {
            bail!("attention bwd: the gradient is not on the CPU");
        };
        let attn = Attention {
            mask: self.mask.clone(),
            scale: self.scale,
        };
        let total = lq.shape().elem_count() + 2 * lk.shape().elem_count();
        if sq.dtype() == DType::F64 {
            let (q, k, v) = (
                cont::<f64>(sq, lq, "attention bwd")?,
                cont::<f64>(sk, lk, "attention bwd")?,
                cont::<f64>(sv, lv, "attention bwd")?,
            );
            let g = cont::<f64>(gs, gl, "attention bwd")?;
            let (dq, dk, dv) =
                attn.with_mask::<f64, _>(|m| attn_bwd(d, q, k, v, m, self.scale, g))?;
            let mut all = dq;
            all.extend(dk);
            all.extend(dv);
            return Ok((CpuStorage::F64(all), Shape::from(total)));
        }
        let q = to_compute_f32(sq, lq, "attention bwd")?;
        let k = to_compute_f32(sk, lk, "attention bwd")?;
        let v = to_compute_f32(sv, lv, "attention bwd")?;
        let g = to_compute_f32(gs, gl, "attention bwd")?;
        let (dq, dk, dv) =
            attn.with_mask::<f32, _>(|m| attn_bwd(d, &q, &k, &v, m, self.scale as f32, &g))?;
        let mut all = dq;
        all.extend(dk);
        all.extend(dv);
        Ok((from_compute_f32(all, sq.dtype()), Shape::from(total)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused attention skips the keys a causal mask rules out, block by block (64 query
    /// rows each); over several blocks, with padding, it must equal the composed graph, values
    /// and gradients.
    #[test]
    fn blocked_causal_attention_matches_the_composed_graph() {
        let dev = candle_core::Device::Cpu;
        let (b, nh, nkv, t, hd, pad) = (2, 4, 2, 150, 8, 37);
        let mut m = vec![0f64; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && j < pad && j != i) {
                        m[(bi * t + i) * t + j] = f64::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, t), &dev).unwrap();
        let var = |h| candle_core::Var::randn(0f64, 1.0, (b, h, t, hd), &dev).unwrap();
        let (q, k, v) = (var(nh), var(nkv), var(nkv));
        let r = Tensor::randn(0f64, 1.0, (b, t, nh * hd), &dev).unwrap();
        let run = |f: &dyn Fn() -> Tensor| {
            let y = f();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![y];
            for x in [&q, &k, &v] {
                out.push(g.get(x.as_tensor()).unwrap().clone());
            }
            out
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = run(&|| attention(qt, kt, vt, Some(&mask), scale).unwrap());
        let composed = run(&|| attention_composed(qt, kt, vt, Some(&mask), scale).unwrap());
        for (i, (a, c)) in fused.iter().zip(&composed).enumerate() {
            let d = (a - c)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-9, "output/grad {i}: max difference {d}");
        }
    }
}
