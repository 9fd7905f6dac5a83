//! The rotary position embedding (non-interleaved, Hugging Face LLaMA layout); its backward is
//! the inverse rotation.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CustomOp3, Result, Shape, Tensor};
use num_traits::One;

use crate::ops::composed;
use crate::ops::cpu::cont;
use crate::ops::cpu::par::*;
use crate::ops::cpu::{In, Out};
use crate::ops::dispatch::{kernels, same_dtype, Elem};
use crate::ops::route::{route, Op, Route};

/// Rotary embedding, non-interleaved (GPT-NeoX / Hugging Face LLaMA layout):
/// `out[i] = x[i] cos[i] - x[i + d/2] sin[i]`, `out[i + d/2] = x[i + d/2] cos[i] + x[i] sin[i]`.
///
/// `x`: (b, heads, t, head_dim), any strides with a unit last stride; `cos`, `sin`:
/// (t, head_dim / 2) shared by the batch, or (b, t, head_dim / 2) per sequence (left-padded
/// batches, where positions differ per row). The output is contiguous. `cos` and `sin` are
/// treated as constants (no gradient).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if route(Op::Rope, x.device(), x.dtype()) == Route::Composed {
        return composed::rope(x, cos, sin);
    }
    let x = if x.stride().last() == Some(&1) {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

/// `inverse` rotates by the opposite angle (sin negated): the transpose, used by backward.
struct Rope {
    inverse: bool,
}

fn rope_fwd<T: Elem>(op: &Rope, (sx, lx): In, (sc, lc): In, (ss, ls): In) -> Out {
    same_dtype("rope", sx.dtype(), sc.dtype())?;
    same_dtype("rope", sx.dtype(), ss.dtype())?;
    let (b, h, t, d) = match lx.dims() {
        &[b, h, t, d] => (b, h, t, d),
        dims => bail!("rope: x must be (b, heads, t, head_dim), got {dims:?}"),
    };
    if d % 2 != 0 {
        bail!("rope: head_dim {d} must be even");
    }
    let d2 = d / 2;
    let per_batch = match lc.dims() {
        &[ct, cd] if ct == t && cd == d2 => false,
        &[cb, ct, cd] if cb == b && ct == t && cd == d2 => true,
        dims => bail!("rope: cos must be ({t}, {d2}) or ({b}, {t}, {d2}), got {dims:?}"),
    };
    if ls.dims() != lc.dims() {
        bail!("rope: sin {:?} and cos {:?} differ", ls.dims(), lc.dims());
    }
    let xs = sx.as_slice::<T>()?;
    let cos = cont::<T>(sc, lc, "rope")?;
    let sin = cont::<T>(ss, ls, "rope")?;
    let st = lx.stride();
    if st[3] != 1 {
        bail!("rope: x needs a unit last stride, got {st:?}");
    }
    let (sb, sh, stt, off) = (st[0], st[1], st[2], lx.start_offset());
    let sign = if op.inverse {
        -T::A::one()
    } else {
        T::A::one()
    };
    let mut out = vec![T::zero(); b * h * t * d];
    for_rows(&mut out, d, |row, o| {
        let ti = row % t;
        let hi = (row / t) % h;
        let bi = row / (t * h);
        let src = off + bi * sb + hi * sh + ti * stt;
        let xr = &xs[src..src + d];
        let crow = if per_batch { bi * t + ti } else { ti };
        let c = &cos[crow * d2..(crow + 1) * d2];
        let s = &sin[crow * d2..(crow + 1) * d2];
        let (o1, o2) = o.split_at_mut(d2);
        for i in 0..d2 {
            let (x1, x2) = (xr[i].to_a(), xr[i + d2].to_a());
            let (cv, sv) = (c[i].to_a(), s[i].to_a() * sign);
            o1[i] = T::from_a(x1 * cv - x2 * sv);
            o2[i] = T::from_a(x2 * cv + x1 * sv);
        }
    });
    Ok((storage(out), Shape::from((b, h, t, d))))
}

impl CustomOp3 for Rope {
    kernels! {"sft-rope", "rope", rope_fwd, gpu::rope, 3}

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A rotation's transpose is the rotation by the opposite angle.
        let grad = if grad.stride().last() == Some(&1) {
            grad.clone()
        } else {
            grad.contiguous()?
        };
        let dx = grad.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// The CUDA launch (kernel in `sft-kernels/src/elementwise.cu`), for a GPU or the emulated one.
mod gpu {
    use candle_core::{bail, Shape};

    use crate::ops::dispatch::same_dtype;
    use crate::ops::launch::{self, GpuStorage, In, Launch, Module, Out};

    pub fn rope<S: GpuStorage>(
        rope: &super::Rope,
        (x, lx): In<S>,
        (c, lc): In<S>,
        (s, ls): In<S>,
    ) -> Out<S> {
        same_dtype("rope", x.dtype(), c.dtype())?;
        same_dtype("rope", x.dtype(), s.dtype())?;
        let (b, h, t, d) = lx.shape().dims4()?;
        let st = lx.stride();
        if st[3] != 1 || d % 2 != 0 {
            bail!("rope: x needs a unit last stride and an even head_dim, got {st:?}, {d}");
        }
        let per_batch = match lc.dims() {
            &[ct, cd] if ct == t && cd == d / 2 => 0i32,
            &[cb, ct, cd] if cb == b && ct == t && cd == d / 2 => 1,
            dims => bail!("rope: cos {dims:?} does not fit x {:?}", lx.dims()),
        };
        launch::contiguous(lc, "rope")?;
        launch::contiguous(ls, "rope")?;
        let out = x.alloc(x.dtype(), b * h * t * d)?;
        let sign: f32 = if rope.inverse { -1.0 } else { 1.0 };
        let name = format!("rope_{}", launch::suffix(x.dtype())?);
        x.launch(
            Launch::new(Module::Elementwise, name, launch::grid(b * h * t * d / 2))
                .args([x.ptr(lx)?, c.ptr(lc)?, s.ptr(ls)?, out.base()?])
                .args([b, h, t, d].map(|v| (v as i32).into()))
                .args([st[0], st[1], st[2]].map(|v| (v as i64).into()))
                .arg(per_batch)
                .arg(sign),
        )?;
        Ok((out, Shape::from((b, h, t, d))))
    }
}
