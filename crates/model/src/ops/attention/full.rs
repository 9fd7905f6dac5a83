//! Attention over whole sequences (training, scoring, prefill) as one graph node: the public
//! entry points, the checks, and the CPU forward and backward of the nodes in `node`.
use candle_core::{bail, CustomOp3, DType, Result, Shape, Tensor};

use super::cpu::{attn_bwd, attn_fwd, AttnDims, RowMask};
use super::cuda;
use super::mask::{AttnMask, KeyRanges};
use super::node::{Attention, AttentionBwd};
use crate::ops::composed;
use crate::ops::cpu::{cont, In, Out};
use crate::ops::dispatch::{compute_dtype, kernels, Elem};
use crate::ops::route::{route, Op, Route};

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
    let gpu = crate::ops::gpu_kernels(q.device());
    let kernel = route(Op::Attention, q.device(), q.dtype()) == Route::Kernel
        && (!gpu || gpu_supports(d, q.dtype(), mask.as_ref()));
    if !kernel {
        return composed::attention(q, k, v, mask.as_ref(), scale);
    }
    let op = Attention::new(mask, scale);
    if !gpu {
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
    cuda::supports(d, dt) && !matches!(mask, Some(AttnMask::Additive(_)))
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

/// Runs `f` with the mask as the CPU kernels read it (its values in the arithmetic type `A`).
pub(crate) fn with_row_mask<A: candle_core::WithDType, R>(
    mask: Option<&AttnMask>,
    f: impl FnOnce(RowMask<'_, A>) -> R,
) -> Result<R> {
    match mask {
        None => Ok(f(RowMask::None)),
        Some(AttnMask::Ranges(r)) => Ok(f(RowMask::Ranges(r.starts(), r.dims().2))),
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

/// The storages of q, k and v as contiguous slices of the arithmetic type (borrowed for f32 and
/// f64, converted for the half types).
pub(super) fn acc_slices<'a, T: Elem>(
    inputs: [In<'a>; 3],
    op: &str,
) -> Result<[std::borrow::Cow<'a, [T::A]>; 3]> {
    let slice = |(s, l): In<'a>| cont::<T>(s, l, op).map(T::acc_slice);
    Ok([slice(inputs[0])?, slice(inputs[1])?, slice(inputs[2])?])
}

fn attention_cpu<T: Elem>(op: &Attention, q: In, k: In, v: In) -> Out
where
    T::A: candle_core::WithDType,
{
    let d = Attention::dims(q.1, k.1)?;
    let [q, k, v] = acc_slices::<T>([q, k, v], "attention")?;
    let scale = T::a(op.scale);
    let kernels = crate::ops::linear::packed_gemm::kernels()?;
    let out = with_row_mask(op.mask.as_ref(), |m| {
        attn_fwd(kernels, d, &q, &k, &v, m, scale)
    })?;
    Ok((T::store_from_a(out), Shape::from((d.b, d.t, d.nh * d.hd))))
}

impl CustomOp3 for Attention {
    kernels! {"sft-attention", "attention", attention_cpu, cuda::forward, 3}

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

fn attention_bwd_cpu<T: Elem>(op: &AttentionBwd, q: In, k: In, v: In) -> Out
where
    T::A: candle_core::WithDType,
{
    let d = Attention::dims(q.1, k.1)?;
    let (gs, gl) = op.grad.storage_and_layout();
    let candle_core::Storage::Cpu(gs) = &*gs else {
        bail!("attention bwd: the gradient is not on the CPU");
    };
    let [q, k, v] = acc_slices::<T>([q, k, v], "attention bwd")?;
    let g = T::acc_slice(cont::<T>(gs, gl, "attention bwd")?);
    let scale = T::a(op.scale);
    let kernels = crate::ops::linear::packed_gemm::kernels()?;
    let (dq, dk, dv) = with_row_mask(op.mask.as_ref(), |m| {
        attn_bwd(kernels, d, &q, &k, &v, m, scale, &g)
    })?;
    let mut all = dq;
    all.extend(dk);
    all.extend(dv);
    let n = all.len();
    Ok((T::store_from_a(all), Shape::from(n)))
}

impl CustomOp3 for AttentionBwd {
    kernels! {"sft-attention-bwd", "attention bwd", attention_bwd_cpu, cuda::backward, 3}
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The output of `f` and the gradients of q, k and v through the projection `sum(y * r)`.
    fn value_and_grads(qkv: [&Var; 3], r: &Tensor, f: &dyn Fn() -> Tensor) -> Vec<Tensor> {
        let y = f();
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = qkv.map(|x| g.get(x.as_tensor()).unwrap().clone());
        std::iter::once(y).chain(grads).collect()
    }

    /// The largest |a - c| over pairs of tensors.
    fn max_diff(a: &[Tensor], c: &[Tensor]) -> f64 {
        let diff = |(a, c): (&Tensor, &Tensor)| {
            let d = (a - c).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar::<f64>().unwrap()
        };
        a.iter().zip(c).map(diff).fold(0f64, f64::max)
    }

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
        let var = |h| Var::randn(0f64, 1.0, (b, h, t, hd), &dev).unwrap();
        let (q, k, v) = (var(nh), var(nkv), var(nkv));
        let r = Tensor::randn(0f64, 1.0, (b, t, nh * hd), &dev).unwrap();
        let run = |f: &dyn Fn() -> Tensor| value_and_grads([&q, &k, &v], &r, f);
        let scale = 1.0 / (hd as f64).sqrt();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = run(&|| attention(qt, kt, vt, Some(&mask), scale).unwrap());
        let additive = AttnMask::Additive(mask.clone());
        let composed = run(&|| composed::attention(qt, kt, vt, Some(&additive), scale).unwrap());
        for (i, (a, c)) in fused.iter().zip(&composed).enumerate() {
            let d = max_diff(std::slice::from_ref(a), std::slice::from_ref(c));
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
        let var = |h| Var::randn(0f64, 1.0, (b, h, t, hd), &dev).unwrap();
        let (q, k, v) = (var(nh), var(nkv), var(nkv));
        let r = Tensor::randn(0f64, 1.0, (b, t, nh * hd), &dev).unwrap();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let run = |f: &dyn Fn() -> Tensor| value_and_grads([&q, &k, &v], &r, f);
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

    /// Every CPU kernel path this machine has (`with_kernels`, what `SFT_CPU_KERNELS` sets)
    /// runs the attention products (Q K^T, P V, and the backward's dO V^T, P^T dO, dS K,
    /// dS^T Q) of f32 and bf16 inputs, within rounding of the f64 composed reference: over
    /// several query blocks, with a causal mask and left padding and with packed segments,
    /// grouped heads, a head size that is not a multiple of the kernels' 32 columns.
    #[test]
    fn every_cpu_kernel_path_runs_attention_forward_and_backward() {
        use crate::cpu_features::{features, with_kernels, Kernels};
        let dev = Device::Cpu;
        let (b, nh, nkv, t, hd) = (2, 6, 2, 139, 40);
        let valid: Vec<Vec<bool>> = vec![(0..t).map(|i| i >= 23).collect(), vec![true; t]];
        let causal = KeyRanges::causal(&valid, 0, t, &dev).unwrap().unwrap();
        let segs: Vec<Vec<u32>> = vec![
            (0..t).map(|i| (i >= 80) as u32).collect(),
            (0..t).map(|i| (i / 45) as u32).collect(),
        ];
        let packed = KeyRanges::packed(&segs, &dev).unwrap();
        let x = |h| Tensor::randn(0f64, 1.0, (b, h, t, hd), &dev).unwrap();
        let (q, k, v) = (x(nh), x(nkv), x(nkv));
        let r = Tensor::randn(0f64, 1.0, (b, t, nh * hd), &dev).unwrap();
        let paths = Kernels::all_on(&features());
        assert!(paths.len() >= 2 || !features().avx2_fma);
        for ranges in [causal, packed] {
            let mask = AttnMask::Ranges(ranges);
            for dt in [DType::F32, DType::BF16] {
                // The reference sees the inputs as rounded to dt.
                let var = |x: &Tensor| Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap();
                let (qv, kv, vv) = (var(&q), var(&k), var(&v));
                let f64v = |x: &Var| Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
                let (q64, k64, v64) = (f64v(&qv), f64v(&kv), f64v(&vv));
                let want = value_and_grads([&q64, &k64, &v64], &r, &|| {
                    let (qt, kt, vt) = (q64.as_tensor(), k64.as_tensor(), v64.as_tensor());
                    composed::attention(qt, kt, vt, Some(&mask), 0.3).unwrap()
                });
                let rd = r.to_dtype(dt).unwrap();
                let tol = if dt == DType::F32 { 1e-4 } else { 3e-2 };
                for &kernels in &paths {
                    let got = with_kernels(kernels, || {
                        value_and_grads([&qv, &kv, &vv], &rd, &|| {
                            let (qt, kt, vt) = (qv.as_tensor(), kv.as_tensor(), vv.as_tensor());
                            attention_with(qt, kt, vt, Some(&mask), 0.3).unwrap()
                        })
                    });
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let g = g.to_dtype(DType::F64).unwrap();
                        let scale = w.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                        let scale = scale.to_scalar::<f64>().unwrap().max(1.0);
                        let d = max_diff(&[g], std::slice::from_ref(w));
                        assert!(
                            d < tol * scale,
                            "{kernels:?} {dt:?} output/grad {i}: max difference {d} (scale {scale})"
                        );
                    }
                }
            }
        }
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
