//! Fused cross-entropy over the vocabulary, forward and backward.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use crate::ops::composed;
use crate::ops::cpu::cont;
use crate::ops::cpu::par::*;
use crate::ops::cpu::{In, Out};
use crate::ops::dispatch::{kernels, Acc, Elem};
use crate::ops::route::{route, Op, Route};

/// Per-row cross-entropy `logsumexp(logits[i]) - logits[i, labels[i]]`, fused (no softmax
/// tensor is kept). `logits`: (n, vocab) float; `labels`: (n) u32 or i64. Rows whose label
/// equals `ignore_index` give 0 and no gradient. The result is (n) in f32 (f64 for f64
/// logits): sum it and divide by the number of counted tokens. Labels out of range are an
/// error.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if labels.dims() != [n] {
        bail!(
            "cross_entropy: labels {:?}, expected [{n}] for logits ({n}, {v})",
            labels.dims()
        );
    }
    if route(Op::CrossEntropy, logits.device(), logits.dtype()) == Route::Composed {
        return composed::cross_entropy(logits, labels, ignore_index);
    }
    logits
        .contiguous()?
        .apply_op2(&labels.contiguous()?, CrossEntropy { ignore_index })
}

struct CrossEntropy {
    ignore_index: i64,
}

fn labels_i64(s: &CpuStorage, l: &Layout) -> Result<Vec<i64>> {
    Ok(match s.dtype() {
        DType::U32 => cont::<u32>(s, l, "cross_entropy")?
            .iter()
            .map(|&v| v as i64)
            .collect(),
        DType::I64 => cont::<i64>(s, l, "cross_entropy")?.to_vec(),
        dt => bail!("cross_entropy: labels must be u32 or i64, got {dt:?}"),
    })
}

fn check_labels(labels: &[i64], v: usize, ignore: i64) -> Result<()> {
    if let Some((i, &bad)) = labels
        .iter()
        .enumerate()
        .find(|(_, &y)| y != ignore && (y < 0 || y as usize >= v))
    {
        bail!("cross_entropy: label {bad} at row {i} is outside the vocabulary 0..{v}");
    }
    Ok(())
}

#[inline(always)]
fn logsumexp<T: Elem>(row: &[T]) -> T::A {
    let max = row
        .iter()
        .fold(T::A::neg_infinity(), |m, &v| m.max(v.to_a()));
    max + T::sum_exp_shift(row, max).ln()
}

fn ce_fwd<T: Elem>(op: &CrossEntropy, (sx, lx): In, (sy, ly): In) -> Out {
    let (n, v) = lx.shape().dims2()?;
    let x = cont::<T>(sx, lx, "cross_entropy")?;
    let labels = labels_i64(sy, ly)?;
    check_labels(&labels, v, op.ignore_index)?;
    let row_loss = |i: usize| -> T::A {
        let y = labels[i];
        if y == op.ignore_index {
            return T::A::zero();
        }
        let r = &x[i * v..(i + 1) * v];
        logsumexp(r) - r[y as usize].to_a()
    };
    let losses: Vec<T::A> = if n * v < PAR_MIN_ELEMS {
        (0..n).map(row_loss).collect()
    } else {
        (0..n).into_par_iter().map(row_loss).collect()
    };
    let out = T::store_a(losses);
    Ok((out, Shape::from(n)))
}

impl CustomOp2 for CrossEntropy {
    kernels! {"sft-cross-entropy", "cross_entropy", ce_fwd, gpu::forward, 2}

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = logits.apply_op3_no_bwd(
            labels,
            &grad,
            &CrossEntropyBwd {
                ignore_index: self.ignore_index,
                losses: res.detach().contiguous()?,
            },
        )?;
        Ok((Some(dx), None))
    }
}

/// d logits[i] = grad[i] * (softmax(logits[i]) - onehot(labels[i])), zero for ignored rows.
struct CrossEntropyBwd {
    ignore_index: i64,
    /// The forward's per-row losses: `lse = loss + logits[label]` without another exp pass.
    losses: Tensor,
}

fn ce_bwd<T: Elem>(op: &CrossEntropyBwd, (sx, lx): In, (sy, ly): In, (sg, lg): In) -> Out {
    let (_, v) = lx.shape().dims2()?;
    let x = cont::<T>(sx, lx, "cross_entropy bwd")?;
    let labels = labels_i64(sy, ly)?;
    let g = T::a_slice(sg, lg, "cross_entropy bwd")?;
    let (ls, ll) = op.losses.storage_and_layout();
    let candle_core::Storage::Cpu(ls) = &*ls else {
        bail!("cross_entropy bwd: the losses are not on the CPU");
    };
    let losses = T::a_slice(ls, ll, "cross_entropy bwd")?;
    let mut out = vec![T::zero(); x.len()];
    for_rows(&mut out, v, |i, o| {
        let y = labels[i];
        if y == op.ignore_index {
            return;
        }
        let r = &x[i * v..(i + 1) * v];
        let lse = losses[i] + r[y as usize].to_a();
        let gi = g[i];
        T::exp_shift_scale(o, r, lse, gi);
        let y = y as usize;
        o[y] = T::from_a(gi * ((r[y].to_a() - lse).fexp() - T::A::one()));
    });
    Ok((storage(out), lx.shape().clone()))
}

impl CustomOp3 for CrossEntropyBwd {
    kernels! {"sft-cross-entropy-bwd", "cross_entropy bwd", ce_bwd, gpu::backward, 3}
}

/// The CUDA launches (kernels in `sft-kernels/src/loss.cu`), for a GPU or the emulated one.
mod gpu {
    use candle_core::{bail, DType, Result, Shape};

    use crate::ops::launch::{self, GpuStorage, In, Launch, Module, Out};

    fn labels_suffix(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::U32 => "u32",
            DType::I64 => "i64",
            dt => bail!("cross_entropy: labels must be u32 or i64, got {dt:?}"),
        })
    }

    /// Per-row losses in f32.
    pub fn forward<S: GpuStorage>(
        ce: &super::CrossEntropy,
        (x, lx): In<S>,
        (y, ly): In<S>,
    ) -> Out<S> {
        launch::contiguous(lx, "cross_entropy")?;
        launch::contiguous(ly, "cross_entropy")?;
        let (n, v) = lx.shape().dims2()?;
        let out = x.alloc(DType::F32, n)?;
        let name = format!(
            "ce_fwd_{}_{}",
            launch::suffix(x.dtype())?,
            labels_suffix(y.dtype())?
        );
        x.launch(
            Launch::new(Module::Loss, name, launch::rows(n, v))
                .args([x.ptr(lx)?, y.ptr(ly)?, out.base()?])
                .arg(v as i32)
                .arg(ce.ignore_index),
        )?;
        Ok((out, Shape::from(n)))
    }

    /// d logits in the logits' dtype; `g` is the gradient of the per-row losses (f32).
    pub fn backward<S: GpuStorage>(
        ce: &super::CrossEntropyBwd,
        (x, lx): In<S>,
        (y, ly): In<S>,
        (g, lg): In<S>,
    ) -> Out<S> {
        launch::contiguous(lx, "cross_entropy bwd")?;
        launch::contiguous(ly, "cross_entropy bwd")?;
        launch::contiguous(lg, "cross_entropy bwd")?;
        if g.dtype() != DType::F32 {
            bail!(
                "cross_entropy bwd: the loss gradient is {:?}, expected f32",
                g.dtype()
            );
        }
        let (n, v) = lx.shape().dims2()?;
        let losses = ce.losses.to_dtype(DType::F32)?.contiguous()?;
        let (lp, _keep) = x.tensor_ptr(&losses)?;
        let out = x.alloc(x.dtype(), n * v)?;
        let name = format!(
            "ce_bwd_{}_{}",
            launch::suffix(x.dtype())?,
            labels_suffix(y.dtype())?
        );
        x.launch(
            Launch::new(Module::Loss, name, launch::rows(n, v))
                .args([x.ptr(lx)?, y.ptr(ly)?, lp, g.ptr(lg)?, out.base()?])
                .arg(v as i32)
                .arg(ce.ignore_index),
        )?;
        drop(losses);
        Ok((out, lx.shape().clone()))
    }
}
