//! Multi-head attention with grouped K/V heads: the training op (forward, and a backward that
//! recomputes the probabilities instead of keeping them) and the decoding path over a KV cache
//! (`decode`). CPU kernels in `cpu`, the CUDA launch in `cuda` (flash-attention's scheme).
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use crate::ops::cpu::cont;
use crate::ops::dispatch::{by_dtype, Elem};
use crate::ops::{composed, route, Op, Route};

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub(crate) mod decode;

pub use decode::{attention_cached, attention_cached_with};

use cpu::{attn_bwd, attn_fwd, AttnDims, RowMask};

/// Which keys each query may see.
#[derive(Clone, Debug)]
pub enum AttnMask {
    /// Additive, (b or 1, 1, t, s): 0 where a query may attend a key, `-inf` where not. Any
    /// pattern; the CPU kernel and the composed reference take it.
    Additive(Tensor),
    /// Causal key ranges (padding, packed sequences): see [`KeyRanges`]. Every kernel takes it.
    Ranges(KeyRanges),
}

/// Causal attention within contiguous runs of keys: query `i` of batch row `b`, at absolute
/// position `past + i`, sees keys `start(b, i) ..= past + i` (and `s = past + t` keys exist).
///
/// - Padding: a real token's run starts at the first real token of its row; a padding query
///   sees only itself (its output is never used, and no row is empty).
/// - Packed sequences (several examples in one row, flash-attention's varlen `cu_seqlens`):
///   a token's run starts at the first position of its example, so no token sees another
///   example.
#[derive(Clone, Debug)]
pub struct KeyRanges {
    /// `start(b, i)` at `b * t + i`.
    starts: Arc<Vec<u32>>,
    b: usize,
    t: usize,
    past: usize,
    /// The starts as a (b, t) u32 tensor on the device the kernels run on.
    on_device: Tensor,
}

impl KeyRanges {
    /// Ranges from each query's first key (`starts`: b * t values, row-major); every start must
    /// be at most the query's own position `past + i`.
    pub fn new(
        starts: Vec<u32>,
        (b, t): (usize, usize),
        past: usize,
        dev: &Device,
    ) -> Result<Self> {
        if starts.len() != b * t {
            bail!("key ranges: {} starts for a ({b}, {t}) batch", starts.len());
        }
        for (n, &st) in starts.iter().enumerate() {
            if st as usize > past + n % t {
                bail!(
                    "key ranges: query {} of row {} starts at key {st}, after itself ({})",
                    n % t,
                    n / t,
                    past + n % t
                );
            }
        }
        let on_device = Tensor::from_slice(&starts, (b, t), dev)?;
        Ok(Self {
            starts: Arc::new(starts),
            b,
            t,
            past,
            on_device,
        })
    }

    /// Causal ranges over rows of `past + t` positions (`valid`: true for tokens, false for
    /// padding): a token sees the tokens up to itself, a padding query only itself. `None` when a
    /// row's tokens before some query are not one contiguous run (a hole in the middle): that
    /// pattern needs an additive mask.
    pub fn causal(
        valid: &[Vec<bool>],
        past: usize,
        t: usize,
        dev: &Device,
    ) -> Result<Option<Self>> {
        let mut starts = Vec::with_capacity(valid.len() * t);
        for row in valid {
            if row.len() != past + t {
                bail!(
                    "key ranges: a validity row of {} for {} positions",
                    row.len(),
                    past + t
                );
            }
            let first = row.iter().position(|&v| v).unwrap_or(row.len());
            for q in past..past + t {
                if !row[q] {
                    starts.push(q as u32);
                } else if row[first..=q].iter().all(|&v| v) {
                    starts.push(first as u32);
                } else {
                    return Ok(None);
                }
            }
        }
        Self::new(starts, (valid.len(), t), past, dev).map(Some)
    }

    /// Ranges of packed rows: `segments[b][i]` numbers the example position `i` belongs to
    /// (examples are contiguous runs of one number; 0 marks padding, which sees only itself),
    /// so each token sees only its own example's earlier tokens.
    pub fn packed(segments: &[Vec<u32>], dev: &Device) -> Result<Self> {
        let t = segments.first().map_or(0, |r| r.len());
        let mut starts = Vec::with_capacity(segments.len() * t);
        for row in segments {
            if row.len() != t {
                bail!("key ranges: packed rows of {} and {t} positions", row.len());
            }
            let mut start = 0;
            for (i, &seg) in row.iter().enumerate() {
                if i > 0 && seg != row[i - 1] {
                    start = i;
                }
                starts.push(if seg == 0 { i } else { start } as u32);
            }
        }
        Self::new(starts, (segments.len(), t), 0, dev)
    }

    /// `start(b, i)` at `b * t + i`.
    pub fn starts(&self) -> &[u32] {
        &self.starts
    }

    /// (batch, queries, cached positions before them).
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.b, self.t, self.past)
    }

    /// The starts as a (b, t) u32 tensor on the kernels' device.
    pub fn on_device(&self) -> &Tensor {
        &self.on_device
    }

    /// The same pattern as an additive (b, 1, t, past + t) mask.
    pub fn to_additive(&self, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (b, t, s) = (self.b, self.t, self.past + self.t);
        let mut m = vec![f32::NEG_INFINITY; b * t * s];
        for (n, &st) in self.starts.iter().enumerate() {
            let q = self.past + n % t;
            m[n * s + st as usize..n * s + q + 1].fill(0.0);
        }
        Tensor::from_vec(m, (b, 1, t, s), dev)?.to_dtype(dtype)
    }
}

/// Multi-head attention with grouped K/V heads as one graph node:
/// `out = softmax(scale * Q K^T + mask) V`, returned as (b, t, heads * head_dim), the layout the
/// output projection takes (no transpose or copy nodes around it).
///
/// `q`: (b, heads, t, head_dim); `k`, `v`: (b, kv_heads, s, head_dim), `heads` a multiple of
/// `kv_heads` (query head h reads kv head h / (heads / kv_heads)); any layouts. `mask`:
/// additive, (b or 1, 1, t, s), a constant (`-inf` masks; a fully masked row gives zeros); see
/// [`attention_with`] for key ranges. Half-precision inputs are computed in f32 (softmax
/// included, as transformers does) and the output rounded once. The backward recomputes the
/// probabilities instead of keeping them, so the graph holds no (t × s) tensor per layer.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    attention_with(
        q,
        k,
        v,
        mask.cloned().map(AttnMask::Additive).as_ref(),
        scale,
    )
}

/// [`attention`] with any [`AttnMask`].
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&AttnMask>,
    scale: f64,
) -> Result<Tensor> {
    let d = check_qkv(q, k, v, "attention")?;
    let ct = compute_dtype(q.dtype());
    let mask = match mask {
        None => None,
        Some(AttnMask::Additive(m)) => {
            check_mask(m, (d.b, d.t, d.s), "attention")?;
            Some(AttnMask::Additive(m.to_dtype(ct)?.contiguous()?))
        }
        Some(AttnMask::Ranges(r)) => {
            check_ranges(r, d, "attention")?;
            Some(AttnMask::Ranges(r.clone()))
        }
    };
    let kernel = route(Op::Attention, q.device(), q.dtype()) == Route::Kernel
        && (q.device().is_cpu() || gpu_supports(d, q.dtype(), mask.as_ref()));
    if !kernel {
        return composed::attention(q, k, v, mask.as_ref(), scale);
    }
    let op = Attention::new(mask, scale);
    if q.device().is_cpu() {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        // The CUDA kernel reads any (b, h, t, d) strides whose rows are 16-byte aligned.
        let unit = |x: &Tensor| -> Result<Tensor> {
            let st = x.stride();
            if st[3] == 1
                && st[..3].iter().all(|s| s.is_multiple_of(8))
                && x.layout().start_offset().is_multiple_of(8)
            {
                Ok(x.clone())
            } else {
                x.contiguous()
            }
        };
        unit(q)?.apply_op3(&unit(k)?, &unit(v)?, op)
    }
}

/// Whether the CUDA kernel takes this call (else the composed reference runs).
fn gpu_supports(d: AttnDims, dt: DType, mask: Option<&AttnMask>) -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::supports(d, dt) && !matches!(mask, Some(AttnMask::Additive(_)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (d, dt, mask);
        false
    }
}

/// The shapes of a q, k, v triple, checked.
pub(crate) fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor, op: &str) -> Result<AttnDims> {
    let (b, nh, t, hd) = q.dims4()?;
    let (bk, nkv, s, hdk) = k.dims4()?;
    if bk != b || hdk != hd || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        bail!(
            "{op}: q {:?}, k {:?}, v {:?} do not fit (heads a multiple of kv heads)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        bail!(
            "{op}: q {:?}, k {:?}, v {:?} differ in dtype",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    Ok(AttnDims {
        b,
        nh,
        nkv,
        t,
        s,
        hd,
    })
}

/// The arithmetic dtype of attention on `dt` inputs: f64 for f64, else f32.
pub(crate) fn compute_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// An additive attention mask must be (b or 1, 1, t, s).
pub(crate) fn check_mask(m: &Tensor, (b, t, s): (usize, usize, usize), op: &str) -> Result<()> {
    let d = m.dims();
    if !(d.len() == 4 && (d[0] == b || d[0] == 1) && d[1] == 1 && d[2] == t && d[3] == s) {
        bail!("{op}: mask {d:?}, expected ({b} or 1, 1, {t}, {s})");
    }
    Ok(())
}

/// Key ranges must describe this call: (b, t) queries over `past + t = s` keys.
pub(crate) fn check_ranges(r: &KeyRanges, d: AttnDims, op: &str) -> Result<()> {
    let (b, t, past) = r.dims();
    if b != d.b || t != d.t || past + t != d.s {
        bail!(
            "{op}: key ranges for ({b}, {t}) queries after {past} positions, called with ({}, {}) \
             queries over {} keys",
            d.b,
            d.t,
            d.s
        );
    }
    Ok(())
}

/// The training op: q, k, v as its three inputs, the mask and scale as constants.
pub(crate) struct Attention {
    /// Additive masks in the compute dtype, contiguous.
    mask: Option<AttnMask>,
    scale: f64,
    /// The forward's row log-sum-exp on CUDA, which the backward reads.
    #[cfg(feature = "cuda")]
    lse: cuda::LseSlot,
}

impl Attention {
    fn new(mask: Option<AttnMask>, scale: f64) -> Self {
        Self {
            mask,
            scale,
            #[cfg(feature = "cuda")]
            lse: Default::default(),
        }
    }

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
}

/// Runs `f` with the mask as the CPU kernels read it (its values in the arithmetic type `A`).
pub(crate) fn with_row_mask<A: candle_core::WithDType, R>(
    mask: Option<&AttnMask>,
    f: impl FnOnce(RowMask<'_, A>) -> R,
) -> Result<R> {
    match mask {
        None => Ok(f(RowMask::None)),
        Some(AttnMask::Ranges(r)) => Ok(f(RowMask::Ranges(r.starts(), r.past))),
        Some(AttnMask::Additive(m)) => {
            let (ms, ml) = m.storage_and_layout();
            let candle_core::Storage::Cpu(ms) = &*ms else {
                bail!("attention: the mask is not on the CPU");
            };
            let mv = cont::<A>(ms, ml, "attention mask")?;
            Ok(f(RowMask::Additive(mv, ml.dims()[0])))
        }
    }
}

fn attention_cpu<T: Elem>(
    op: &Attention,
    d: AttnDims,
    (sq, lq): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
) -> Result<CpuStorage>
where
    T::A: candle_core::WithDType,
{
    let q = T::acc_slice(cont::<T>(sq, lq, "attention")?);
    let k = T::acc_slice(cont::<T>(sk, lk, "attention")?);
    let v = T::acc_slice(cont::<T>(sv, lv, "attention")?);
    let scale = T::a(op.scale);
    let out = with_row_mask(op.mask.as_ref(), |m| attn_fwd(d, &q, &k, &v, m, scale))?;
    Ok(T::store_from_a(out))
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
        let out = by_dtype!(
            sq.dtype(),
            "attention",
            attention_cpu(self, d, (sq, lq), (sk, lk), (sv, lv))
        )?;
        Ok((out, Shape::from((d.b, d.t, d.nh * d.hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle_core::CudaStorage,
        lq: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = Self::dims(lq, lk)?;
        let out = cuda::forward(self, d, (sq, lq), (sk, lk), (sv, lv))?;
        Ok((out, Shape::from((d.b, d.t, d.nh * d.hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = q.apply_op3_no_bwd(
            k,
            v,
            &AttentionBwd {
                mask: self.mask.clone(),
                scale: self.scale,
                grad: grad.contiguous()?,
                out: res.clone(),
                #[cfg(feature = "cuda")]
                lse: self.lse.clone(),
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

/// The backward of [`Attention`] as one op: dq, dk and dv concatenated into one flat tensor
/// (each in its input's layout made contiguous: q (b, nh, t, hd), k and v (b, nkv, s, hd)).
pub(crate) struct AttentionBwd {
    mask: Option<AttnMask>,
    scale: f64,
    /// d out, (b, t, heads * head_dim), contiguous.
    grad: Tensor,
    /// The forward's output (the CUDA backward's `rowsum(dO * O)`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    out: Tensor,
    #[cfg(feature = "cuda")]
    lse: cuda::LseSlot,
}

fn attention_bwd_cpu<T: Elem>(
    op: &AttentionBwd,
    d: AttnDims,
    (sq, lq): (&CpuStorage, &Layout),
    (sk, lk): (&CpuStorage, &Layout),
    (sv, lv): (&CpuStorage, &Layout),
) -> Result<CpuStorage>
where
    T::A: candle_core::WithDType,
{
    let (gs, gl) = op.grad.storage_and_layout();
    let candle_core::Storage::Cpu(gs) = &*gs else {
        bail!("attention bwd: the gradient is not on the CPU");
    };
    let q = T::acc_slice(cont::<T>(sq, lq, "attention bwd")?);
    let k = T::acc_slice(cont::<T>(sk, lk, "attention bwd")?);
    let v = T::acc_slice(cont::<T>(sv, lv, "attention bwd")?);
    let g = T::acc_slice(cont::<T>(gs, gl, "attention bwd")?);
    let scale = T::a(op.scale);
    let (dq, dk, dv) = with_row_mask(op.mask.as_ref(), |m| attn_bwd(d, &q, &k, &v, m, scale, &g))?;
    let mut all = dq;
    all.extend(dk);
    all.extend(dv);
    Ok(T::store_from_a(all))
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
        let total = lq.shape().elem_count() + 2 * lk.shape().elem_count();
        let all = by_dtype!(
            sq.dtype(),
            "attention bwd",
            attention_bwd_cpu(self, d, (sq, lq), (sk, lk), (sv, lv))
        )?;
        Ok((all, Shape::from(total)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle_core::CudaStorage,
        lq: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = Attention::dims(lq, lk)?;
        let total = lq.shape().elem_count() + 2 * lk.shape().elem_count();
        let all = cuda::backward(self, d, (sq, lq), (sk, lk), (sv, lv))?;
        Ok((all, Shape::from(total)))
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
        let additive = AttnMask::Additive(mask.clone());
        let composed = run(&|| composed::attention(qt, kt, vt, Some(&additive), scale).unwrap());
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

    /// Key ranges (causal with left padding, and packed segments) give what the same pattern
    /// as an additive mask gives, values and gradients, in the kernel and in the composed
    /// reference; a row of several segments sees nothing across their boundaries.
    #[test]
    fn key_ranges_equal_their_additive_masks() {
        let dev = Device::Cpu;
        let (b, nh, nkv, t, hd) = (2, 4, 2, 140, 8);
        let valid: Vec<Vec<bool>> = vec![vec![true; t], (0..t).map(|i| i >= 29).collect()];
        let causal = KeyRanges::causal(&valid, 0, t, &dev).unwrap().unwrap();
        let segs: Vec<Vec<u32>> = vec![
            (0..t)
                .map(|i| (i >= 70) as u32 + (i >= 101) as u32)
                .collect(),
            (0..t).map(|i| (i / 33) as u32).collect(),
        ];
        let packed = KeyRanges::packed(&segs, &dev).unwrap();
        let var = |h| candle_core::Var::randn(0f64, 1.0, (b, h, t, hd), &dev).unwrap();
        let (q, k, v) = (var(nh), var(nkv), var(nkv));
        let r = Tensor::randn(0f64, 1.0, (b, t, nh * hd), &dev).unwrap();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let run = |f: &dyn Fn() -> Tensor| {
            let y = f();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![y];
            for x in [&q, &k, &v] {
                out.push(g.get(x.as_tensor()).unwrap().clone());
            }
            out
        };
        let max_diff = |a: &[Tensor], c: &[Tensor]| {
            a.iter()
                .zip(c)
                .map(|(a, c)| {
                    (a - c)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                })
                .fold(0f64, f64::max)
        };
        for ranges in [&causal, &packed] {
            let additive = AttnMask::Additive(ranges.to_additive(DType::F64, &dev).unwrap());
            let ranged = AttnMask::Ranges(ranges.clone());
            let by_ranges = run(&|| attention_with(qt, kt, vt, Some(&ranged), 0.3).unwrap());
            let by_mask = run(&|| attention_with(qt, kt, vt, Some(&additive), 0.3).unwrap());
            let reference = run(&|| composed::attention(qt, kt, vt, Some(&ranged), 0.3).unwrap());
            assert!(max_diff(&by_ranges, &by_mask) < 1e-12);
            assert!(max_diff(&by_ranges, &reference) < 1e-9);
        }
        // Packed: changing the last segment's keys and values leaves the earlier ones' outputs.
        let ranged = AttnMask::Ranges(packed);
        let y = attention_with(qt, kt, vt, Some(&ranged), 0.3).unwrap();
        let k2 = (kt + 1.0).unwrap();
        let v2 = (vt * 3.0).unwrap();
        let cut = 101; // row 0's last segment starts here
        let keep = |x: &Tensor| x.narrow(2, 0, cut).unwrap();
        let k3 = Tensor::cat(&[&keep(kt), &k2.narrow(2, cut, t - cut).unwrap()], 2).unwrap();
        let v3 = Tensor::cat(&[&keep(vt), &v2.narrow(2, cut, t - cut).unwrap()], 2).unwrap();
        let y2 = attention_with(qt, &k3, &v3, Some(&ranged), 0.3).unwrap();
        let before = |y: &Tensor| y.get(0).unwrap().narrow(0, 0, cut).unwrap();
        let d = max_diff(&[before(&y)], &[before(&y2)]);
        assert_eq!(d, 0.0, "an earlier segment saw a later one");
        let after = |y: &Tensor| y.get(0).unwrap().narrow(0, cut, t - cut).unwrap();
        assert!(max_diff(&[after(&y)], &[after(&y2)]) > 1e-3);
    }

    #[test]
    fn key_ranges_refuse_holes_and_starts_after_the_query() {
        let dev = Device::Cpu;
        let holed = vec![vec![true, false, true, true]];
        assert!(KeyRanges::causal(&holed, 0, 4, &dev).unwrap().is_none());
        let err = KeyRanges::new(vec![0, 2], (1, 2), 0, &dev).unwrap_err();
        assert!(err.to_string().contains("after itself"), "{err}");
    }
}
