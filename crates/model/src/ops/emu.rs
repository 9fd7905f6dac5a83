//! The emulated GPU as a device of the ops: `SFT_KERNELS=emu` (or [`with_emulated`] in a
//! test) sends every op that has a CUDA kernel through its CUDA launch code, on CPU tensors,
//! with the dtype plan CUDA takes; the launch runs the kernel's `.cu` source compiled for the
//! CPU (`sft-kernels`, `emu/`). The code that builds a launch is the code a GPU runs
//! (`ops/launch.rs`); only the last step differs.
//!
//! Device memory here is [`EmuStorage`]: an allocation with guard bytes on both sides, all
//! filled with 0xFF (NaN in every float type) so a read of unwritten memory or past the end
//! shows in the numbers, and a write past the end is found after the launch. Every pointer
//! argument must point into one of the live allocations. Under AddressSanitizer
//! (`scripts/kernel-sanitize`) the allocations are exact and the sanitizer checks every access.
use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor};

use super::launch::{Arg, GpuStorage, Launch};

/// What `SFT_KERNELS` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelsSetting {
    /// The device's own kernels: CUDA on a GPU, the CPU kernels on the CPU.
    Auto,
    /// CPU tensors run the CUDA kernels on the emulated GPU.
    Emu,
}

/// `SFT_KERNELS` (`auto` or `emu`; unset is `auto`); any other value is an error that lists
/// the known ones.
pub fn kernels_setting() -> Result<KernelsSetting> {
    match std::env::var("SFT_KERNELS") {
        Err(_) => Ok(KernelsSetting::Auto),
        Ok(v) => match v.trim() {
            "" | "auto" => Ok(KernelsSetting::Auto),
            "emu" => Ok(KernelsSetting::Emu),
            other => bail!(
                "SFT_KERNELS={other}: unknown; expected `auto` (each device's own kernels) or \
                 `emu` (the CUDA kernels on an emulated GPU, on the CPU)"
            ),
        },
    }
}

thread_local! {
    static FORCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether CPU tensors on this thread run the CUDA kernels on the emulated GPU.
pub fn active() -> bool {
    if FORCE.with(|c| c.get()) {
        return true;
    }
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| matches!(kernels_setting(), Ok(KernelsSetting::Emu)))
}

/// Runs `f` with this thread's CPU ops sent to the emulated GPU (as `SFT_KERNELS=emu`).
pub fn with_emulated<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            FORCE.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(FORCE.with(|c| c.replace(true)));
    f()
}

pub use sft_kernels::emu::{set_schedule, Schedule};

/// Bytes of guard on each side of an allocation (none under AddressSanitizer, which guards
/// allocations itself).
fn guard() -> usize {
    if sft_kernels::emu::SANITIZER == Some("address") {
        0
    } else {
        256
    }
}

/// The live allocations: start of data -> (bytes, guard bytes).
static LIVE: Mutex<BTreeMap<usize, (usize, usize)>> = Mutex::new(BTreeMap::new());
/// Launches and the guard checks after them, one at a time (as on one stream).
static LAUNCH: Mutex<()> = Mutex::new(());

/// A buffer of the emulated GPU's memory.
pub(crate) struct EmuStorage {
    data: *mut u8,
    guard: usize,
    layout: std::alloc::Layout,
    dtype: DType,
    len: usize,
}

// SAFETY: the buffer is owned; kernels write it only during a launch, which borrows it.
unsafe impl Send for EmuStorage {}
unsafe impl Sync for EmuStorage {}

impl Drop for EmuStorage {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(self.data as usize));
        // SAFETY: allocated in `new` with this layout, `guard` bytes before `data`.
        unsafe { std::alloc::dealloc(self.data.sub(self.guard), self.layout) };
    }
}

impl EmuStorage {
    fn new(dtype: DType, len: usize) -> Result<EmuStorage> {
        let bytes = len * dtype.size_in_bytes();
        let guard = guard();
        // 256-byte alignment, as cudaMalloc gives.
        let layout = std::alloc::Layout::from_size_align((bytes + 2 * guard).max(1), 256)
            .map_err(|e| candle_core::Error::Msg(format!("emulated GPU: {e}")))?;
        // SAFETY: a non-zero size.
        let base = unsafe { std::alloc::alloc(layout) };
        if base.is_null() {
            bail!("emulated GPU: out of memory for {bytes} bytes");
        }
        // SAFETY: the allocation holds bytes + 2 * guard bytes.
        unsafe { std::ptr::write_bytes(base, 0xff, bytes + 2 * guard) };
        let data = unsafe { base.add(guard) };
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(data as usize, (bytes, guard));
        Ok(EmuStorage {
            data,
            guard,
            layout,
            dtype,
            len,
        })
    }

    /// An empty storage: the emulated device, for an op that reads no input.
    pub(crate) fn device() -> Result<EmuStorage> {
        EmuStorage::new(DType::F32, 0)
    }

    /// A copy of a CPU storage in the emulator's memory (a host-to-device copy).
    pub(crate) fn upload(s: &CpuStorage) -> Result<EmuStorage> {
        fn copy<T: Copy>(v: &[T], dt: DType) -> Result<EmuStorage> {
            let e = EmuStorage::new(dt, v.len())?;
            // SAFETY: `e` holds exactly v.len() elements of T.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), e.data as *mut T, v.len()) };
            Ok(e)
        }
        match s {
            CpuStorage::F32(v) => copy(v, DType::F32),
            CpuStorage::BF16(v) => copy(v, DType::BF16),
            CpuStorage::F16(v) => copy(v, DType::F16),
            CpuStorage::F64(v) => copy(v, DType::F64),
            CpuStorage::U32(v) => copy(v, DType::U32),
            CpuStorage::I64(v) => copy(v, DType::I64),
            CpuStorage::U8(v) => copy(v, DType::U8),
            s => bail!("emulated GPU: no {:?} storage", s.dtype()),
        }
    }

    /// The contents as a CPU storage (a device-to-host copy).
    pub(crate) fn to_cpu(&self) -> Result<CpuStorage> {
        fn read<T: Copy>(e: &EmuStorage) -> Vec<T> {
            let mut v = Vec::with_capacity(e.len);
            // SAFETY: the buffer holds `len` elements of T.
            unsafe {
                std::ptr::copy_nonoverlapping(e.data as *const T, v.as_mut_ptr(), e.len);
                v.set_len(e.len);
            }
            v
        }
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(read(self)),
            DType::BF16 => CpuStorage::BF16(read(self)),
            DType::F16 => CpuStorage::F16(read(self)),
            DType::F64 => CpuStorage::F64(read(self)),
            DType::U32 => CpuStorage::U32(read(self)),
            DType::I64 => CpuStorage::I64(read(self)),
            DType::U8 => CpuStorage::U8(read(self)),
            dt => bail!("emulated GPU: no {dt:?} storage"),
        })
    }
}

/// Every live allocation's guard bytes, checked after a launch.
fn check_guards(kernel: &str) -> Result<()> {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for (&start, &(bytes, guard)) in live.iter() {
        let data = start as *const u8;
        for (side, at) in [("before", -(guard as isize)), ("past", bytes as isize)] {
            // SAFETY: the guard bytes are part of the allocation.
            let g = unsafe { std::slice::from_raw_parts(data.offset(at), guard) };
            if let Some(i) = g.iter().position(|&b| b != 0xff) {
                bail!(
                    "emulated GPU: `{kernel}` wrote {side} the end of a {bytes}-byte buffer \
                     (guard byte {i} changed)"
                );
            }
        }
    }
    Ok(())
}

/// Whether `addr` points into a live allocation (or just past its end, as an empty range may).
fn points_into_live(addr: u64) -> bool {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    let a = addr as usize;
    live.range(..=a)
        .next_back()
        .is_some_and(|(&start, &(bytes, _))| a <= start + bytes)
}

impl GpuStorage for EmuStorage {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn alloc(&self, dt: DType, n: usize) -> Result<Self> {
        EmuStorage::new(dt, n)
    }

    fn ptr(&self, l: &Layout) -> Result<Arg> {
        let off = l.start_offset();
        if off > self.len {
            bail!(
                "emulated GPU: offset {off} past a buffer of {} elements",
                self.len
            );
        }
        Ok(Arg::Ptr {
            // SAFETY: within the allocation (checked above).
            addr: unsafe { self.data.add(off * self.dtype.size_in_bytes()) } as u64,
            dtype: Some(self.dtype),
        })
    }

    fn tensor_ptr(&self, t: &Tensor) -> Result<(Arg, Option<Self>)> {
        let (s, l) = t.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            bail!("emulated GPU: expected a tensor on the CPU");
        };
        let e = EmuStorage::upload(s)?;
        Ok((e.ptr(l)?, Some(e)))
    }

    fn with_tensor<R>(&self, t: &Tensor, f: impl FnOnce(&Self, &Layout) -> Result<R>) -> Result<R> {
        let (s, l) = t.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            bail!("emulated GPU: expected a tensor on the CPU");
        };
        f(&EmuStorage::upload(s)?, l)
    }

    fn launch(&self, mut l: Launch) -> Result<()> {
        let k = l.check()?;
        for (i, a) in l.args.iter().enumerate() {
            if let Arg::Ptr { addr, .. } = a {
                if *addr != 0 && !points_into_live(*addr) {
                    bail!(
                        "launch of `{}`: argument {i} ({addr:#x}) points into no buffer of the \
                         emulated GPU",
                        l.name
                    );
                }
            }
        }
        let mut ptrs = l.params();
        let _serial = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the arguments were checked against the kernel's parameters, and every pointer
        // among them points into a live allocation of this module.
        unsafe {
            sft_kernels::emu::launch(k, &mut ptrs, l.cfg.grid, l.cfg.block, l.cfg.shared as u64)
        }
        .map_err(|e| candle_core::Error::Msg(format!("emulated GPU: {e}")))?;
        check_guards(&l.name)
    }

    fn matmul(
        &self,
        rhs: &Self,
        bmnk: (usize, usize, usize, usize),
        lhs_l: &Layout,
        rhs_l: &Layout,
    ) -> Result<Self> {
        // cuBLAS's part: not emulated, the CPU's product stands in for it.
        let out = self.to_cpu()?.matmul(&rhs.to_cpu()?, bmnk, lhs_l, rhs_l)?;
        EmuStorage::upload(&out)
    }
}
