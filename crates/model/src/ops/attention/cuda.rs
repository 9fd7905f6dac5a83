//! The CUDA launches of attention (kernels in `sft-kernels/src/attention.cu`): the forward
//! saves the rows' log-sum-exp for the backward in the op (an `LseSlot`), never the scores.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::{bail, DType, Layout, Result, Shape};

use super::cpu::AttnDims;
use super::mask::AttnMask;
use super::node::{Attention, AttentionBwd};
use crate::ops::cuda::{self, In, Module, Out};

/// The kernels' `AttnArgs` (see attention.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnArgs {
    q: [i64; 3],
    k: [i64; 3],
    v: [i64; 3],
    b: i32,
    nh: i32,
    nkv: i32,
    t: i32,
    s: i32,
    past: i32,
    scale: f32,
    has_starts: i32,
}

// SAFETY: plain `repr(C)` data with the C struct's layout.
unsafe impl DeviceRepr for AttnArgs {}

/// Whether the kernels take this call: 16-bit operands (the tensor cores) and a head width
/// of 64 or 128. Others run the composed reference.
pub(crate) fn supports(d: AttnDims, dt: DType) -> bool {
    matches!(dt, DType::BF16 | DType::F16) && matches!(d.hd, 64 | 128)
}

/// Bytes of dynamic shared memory of each kernel (the layout of `Smem` in attention.cu).
fn smem(hd: usize) -> (usize, usize, usize) {
    let tile = 64 * (hd + 8) * 2;
    let s = 4 * 16 * 68 * 4;
    let p = 4 * 16 * 72 * 2;
    let p64 = 64 * 72 * 2;
    let o = 4 * 16 * (hd + 4) * 4;
    (
        3 * tile + s + p + o,
        4 * tile + s + 2 * p64,
        4 * tile + s + p,
    )
}

/// The (batch, head, position) strides of a (b, h, t, hd) layout whose rows the kernels read
/// 16 bytes at a time.
fn strides(l: &Layout, what: &str) -> Result<[i64; 3]> {
    let st = l.stride();
    if st[3] != 1
        || st[..3].iter().any(|s| !s.is_multiple_of(8))
        || !l.start_offset().is_multiple_of(8)
    {
        bail!(
            "attention: {what} strides {st:?} (offset {}) are not 16-byte rows",
            l.start_offset()
        );
    }
    Ok([st[0] as i64, st[1] as i64, st[2] as i64])
}

fn args(op_mask: Option<&AttnMask>, scale: f64, d: AttnDims, ls: [&Layout; 3]) -> Result<AttnArgs> {
    let past = match op_mask {
        Some(AttnMask::Ranges(r)) => r.dims().2,
        Some(AttnMask::Additive(_)) => bail!("attention: additive masks run composed on CUDA"),
        None => d.s - d.t,
    };
    Ok(AttnArgs {
        q: strides(ls[0], "q")?,
        k: strides(ls[1], "k")?,
        v: strides(ls[2], "v")?,
        b: d.b as i32,
        nh: d.nh as i32,
        nkv: d.nkv as i32,
        t: d.t as i32,
        s: d.s as i32,
        past: past as i32,
        scale: scale as f32,
        has_starts: matches!(op_mask, Some(AttnMask::Ranges(_))) as i32,
    })
}

/// The device address of the key starts (0 without ranges) and the tensor that holds them.
fn starts(mask: Option<&AttnMask>) -> Result<u64> {
    match mask {
        Some(AttnMask::Ranges(r)) => cuda::with_storage(r.on_device(), cuda::ptr),
        _ => Ok(0),
    }
}

pub(crate) fn forward(op: &Attention, (q, lq): In, (k, lk): In, (v, lv): In) -> Out {
    let d = Attention::dims(lq, lk)?;
    let a = args(op.mask.as_ref(), op.scale, d, [lq, lk, lv])?;
    let dev = q.device();
    let sfx = cuda::suffix(q.dtype())?;
    let out = cuda::new_storage(dev, q.dtype(), d.b * d.t * d.nh * d.hd)?;
    let lse = cuda::new_storage(dev, DType::F32, d.b * d.nh * d.t)?;
    let (qp, kp, vp, sp) = (
        cuda::ptr(q, lq)?,
        cuda::ptr(k, lk)?,
        cuda::ptr(v, lv)?,
        starts(op.mask.as_ref())?,
    );
    let (op_, lp) = (cuda::base(&out)?, cuda::base(&lse)?);
    let bytes = smem(d.hd).0;
    let f = cuda::func(dev, Module::Attention, &format!("attn_fwd_{sfx}_{}", d.hd))?;
    cuda::allow_smem(&f, bytes)?;
    let cfg = LaunchConfig {
        grid_dim: (d.t.div_ceil(64) as u32, (d.b * d.nh) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: bytes as u32,
    };
    cuda::launch(&f, cfg, |b| {
        b.arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&sp)
            .arg(&op_)
            .arg(&lp)
            .arg(&a);
    })?;
    *op.lse.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
    Ok((out, Shape::from((d.b, d.t, d.nh * d.hd))))
}

pub(crate) fn backward(op: &AttentionBwd, (q, lq): In, (k, lk): In, (v, lv): In) -> Out {
    let d = Attention::dims(lq, lk)?;
    let a = args(op.mask.as_ref(), op.scale, d, [lq, lk, lv])?;
    let dev = q.device();
    let sfx = cuda::suffix(q.dtype())?;
    let lse_guard = op.lse.0.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lse) = lse_guard.as_ref() else {
        bail!("attention bwd: the forward's log-sum-exp is missing");
    };
    // The kernels read rows 16 bytes at a time: a view starting mid-row gets copied.
    let aligned = |t: &candle_core::Tensor| -> Result<candle_core::Tensor> {
        let t = t.contiguous()?;
        if t.layout().start_offset() % 8 == 0 {
            Ok(t)
        } else {
            t.copy()
        }
    };
    let grad = aligned(&op.grad)?;
    let out = aligned(&op.out)?;
    let gp = cuda::with_storage(&grad, cuda::ptr)?;
    let outp = cuda::with_storage(&out, cuda::ptr)?;
    let (qp, kp, vp, sp) = (
        cuda::ptr(q, lq)?,
        cuda::ptr(k, lk)?,
        cuda::ptr(v, lv)?,
        starts(op.mask.as_ref())?,
    );
    let lp = cuda::base(lse)?;
    // D = rowsum(dO * O), one warp per row.
    let dsum = cuda::new_storage(dev, DType::F32, d.b * d.nh * d.t)?;
    let dp = cuda::base(&dsum)?;
    let rows = d.b * d.t * d.nh;
    let f = cuda::func(dev, Module::Attention, &format!("attn_bwd_dot_{sfx}"))?;
    let (b32, nh32, t32, hd32) = (d.b as i32, d.nh as i32, d.t as i32, d.hd as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    cuda::launch(&f, cfg, |b| {
        b.arg(&gp)
            .arg(&outp)
            .arg(&dp)
            .arg(&b32)
            .arg(&nh32)
            .arg(&t32)
            .arg(&hd32);
    })?;
    // dq, dk, dv in one storage, in that order.
    let (nq, nk) = (d.b * d.nh * d.t * d.hd, d.b * d.nkv * d.s * d.hd);
    let all = cuda::new_storage(dev, q.dtype(), nq + 2 * nk)?;
    let base = cuda::base(&all)?;
    let size = q.dtype().size_in_bytes() as u64;
    let (dqp, dkp, dvp) = (
        base,
        base + nq as u64 * size,
        base + (nq + nk) as u64 * size,
    );
    // dk/dv over key blocks of each (batch, kv head), dq over query blocks of each (batch,
    // head): both read the same seven inputs, write their gradients, then take the constants.
    let (_, kv_bytes, q_bytes) = smem(d.hd);
    let inputs = [qp, kp, vp, gp, lp, dp, sp];
    let pass = |kernel: &str, rows: usize, heads: usize, bytes: usize, outs: &[u64]| {
        let name = format!("attn_bwd_{kernel}_{sfx}_{}", d.hd);
        let f = cuda::func(dev, Module::Attention, &name)?;
        cuda::allow_smem(&f, bytes)?;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(64) as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        cuda::launch(&f, cfg, |b| {
            for p in inputs.iter().chain(outs) {
                b.arg(p);
            }
            b.arg(&a);
        })
    };
    pass("dkdv", d.s, d.b * d.nkv, kv_bytes, &[dkp, dvp])?;
    pass("dq", d.t, d.b * d.nh, q_bytes, &[dqp])?;
    Ok((all, Shape::from(nq + 2 * nk)))
}
