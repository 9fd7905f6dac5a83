//! The CUDA launches of attention (kernels in `sft-kernels/src/attention.cu`), for a GPU or the
//! emulated one: the forward saves the rows' log-sum-exp for the backward in the op (an
//! `LseSlot`), never the scores.

use candle_core::{bail, DType, Layout, Result, Shape};

use super::cpu::AttnDims;
use super::mask::AttnMask;
use super::node::{Attention, AttentionBwd, SavedLse};
use crate::ops::emu::EmuStorage;
use crate::ops::launch::{self, Arg, Cfg, GpuStorage, In, Launch, Module, Out};

/// A device storage that can be kept between the forward and the backward.
pub(crate) trait Lse: GpuStorage {
    fn save(self) -> SavedLse;
    fn saved(s: &SavedLse) -> Option<&Self>;
}

impl Lse for EmuStorage {
    fn save(self) -> SavedLse {
        SavedLse::Emu(self)
    }
    fn saved(s: &SavedLse) -> Option<&Self> {
        match s {
            SavedLse::Emu(e) => Some(e),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
impl Lse for candle_core::CudaStorage {
    fn save(self) -> SavedLse {
        SavedLse::Cuda(self)
    }
    fn saved(s: &SavedLse) -> Option<&Self> {
        match s {
            SavedLse::Cuda(c) => Some(c),
            _ => None,
        }
    }
}

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

/// The device address of the key starts (null without ranges), and what keeps it valid.
fn starts<S: GpuStorage>(dev: &S, mask: Option<&AttnMask>) -> Result<(Arg, Option<S>)> {
    match mask {
        Some(AttnMask::Ranges(r)) => dev.tensor_ptr(r.on_device()),
        _ => Ok((
            Arg::Ptr {
                addr: 0,
                dtype: None,
            },
            None,
        )),
    }
}

pub(crate) fn forward<S: Lse>(
    op: &Attention,
    (q, lq): In<S>,
    (k, lk): In<S>,
    (v, lv): In<S>,
) -> Out<S> {
    let d = Attention::dims(lq, lk)?;
    let a = args(op.mask.as_ref(), op.scale, d, [lq, lk, lv])?;
    let sfx = launch::suffix(q.dtype())?;
    let out = q.alloc(q.dtype(), d.b * d.t * d.nh * d.hd)?;
    let lse = q.alloc(DType::F32, d.b * d.nh * d.t)?;
    let (sp, _keep) = starts(q, op.mask.as_ref())?;
    let bytes = smem(d.hd).0;
    let cfg = Cfg {
        grid: [d.t.div_ceil(64) as u32, (d.b * d.nh) as u32, 1],
        block: [128, 1, 1],
        shared: bytes as u32,
    };
    q.launch(
        Launch::new(Module::Attention, format!("attn_fwd_{sfx}_{}", d.hd), cfg)
            .opt_in_smem(bytes)
            .args([
                q.ptr(lq)?,
                k.ptr(lk)?,
                v.ptr(lv)?,
                sp,
                out.base()?,
                lse.base()?,
            ])
            .arg(Arg::of_struct("AttnArgs", &a)),
    )?;
    *op.lse.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse.save());
    Ok((out, Shape::from((d.b, d.t, d.nh * d.hd))))
}

pub(crate) fn backward<S: Lse>(
    op: &AttentionBwd,
    (q, lq): In<S>,
    (k, lk): In<S>,
    (v, lv): In<S>,
) -> Out<S> {
    let d = Attention::dims(lq, lk)?;
    let a = args(op.mask.as_ref(), op.scale, d, [lq, lk, lv])?;
    let sfx = launch::suffix(q.dtype())?;
    let lse_guard = op.lse.0.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lse) = lse_guard.as_ref().and_then(S::saved) else {
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
    let (gp, _keep_g) = q.tensor_ptr(&grad)?;
    let (outp, _keep_o) = q.tensor_ptr(&out)?;
    let (sp, _keep_s) = starts(q, op.mask.as_ref())?;
    let lp = lse.base()?;
    // D = rowsum(dO * O), one warp per row.
    let dsum = q.alloc(DType::F32, d.b * d.nh * d.t)?;
    let dp = dsum.base()?;
    let rows = d.b * d.t * d.nh;
    let cfg = Cfg {
        grid: [rows.div_ceil(8) as u32, 1, 1],
        block: [256, 1, 1],
        shared: 0,
    };
    q.launch(
        Launch::new(Module::Attention, format!("attn_bwd_dot_{sfx}"), cfg)
            .args([gp.clone(), outp, dp.clone()])
            .args([d.b, d.nh, d.t, d.hd].map(|x| (x as i32).into())),
    )?;
    // dq, dk, dv in one storage, in that order.
    let (nq, nk) = (d.b * d.nh * d.t * d.hd, d.b * d.nkv * d.s * d.hd);
    let all = q.alloc(q.dtype(), nq + 2 * nk)?;
    let at = |off: usize| -> Result<Arg> { all.ptr(&Layout::contiguous_with_offset(1, off)) };
    let (dqp, dkp, dvp) = (at(0)?, at(nq)?, at(nq + nk)?);
    // dk/dv over key blocks of each (batch, kv head), dq over query blocks of each (batch,
    // head): both read the same seven inputs, write their gradients, then take the constants.
    let (_, kv_bytes, q_bytes) = smem(d.hd);
    let inputs = [q.ptr(lq)?, k.ptr(lk)?, v.ptr(lv)?, gp, lp, dp, sp];
    let pass = |kernel: &str, rows: usize, heads: usize, bytes: usize, outs: Vec<Arg>| {
        let cfg = Cfg {
            grid: [rows.div_ceil(64) as u32, heads as u32, 1],
            block: [128, 1, 1],
            shared: bytes as u32,
        };
        let name = format!("attn_bwd_{kernel}_{sfx}_{}", d.hd);
        q.launch(
            Launch::new(Module::Attention, name, cfg)
                .opt_in_smem(bytes)
                .args(inputs.iter().cloned())
                .args(outs)
                .arg(Arg::of_struct("AttnArgs", &a)),
        )
    };
    pass("dkdv", d.s, d.b * d.nkv, kv_bytes, vec![dkp, dvp])?;
    pass("dq", d.t, d.b * d.nh, q_bytes, vec![dqp])?;
    Ok((all, Shape::from(nq + 2 * nk)))
}
