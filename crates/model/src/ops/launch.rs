//! One launch description for both devices. Each op's CUDA path is written once, generic over
//! [`GpuStorage`]: it computes the kernel's name, grid, block, shared memory and argument list
//! as a [`Launch`], which runs on a real GPU (cudarc, `ops/cuda.rs`) or on the emulated GPU
//! (`ops/emu.rs`, the same `.cu` sources compiled for the CPU). Before either runs it, the
//! launch is checked here, the same way on both: the kernel's name against the table read off
//! the sources, the launch sizes against what an H100 accepts, and each argument against the
//! kernel's declared parameter types.
use candle_core::{bail, DType, Layout, Result, Shape, Tensor};
use sft_kernels::emu::{Elem, Kernel, Param};

/// The `.cu` file a kernel is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Module {
    Attention,
    Elementwise,
    Loss,
    Norm,
    Quant,
}

impl Module {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Module::Attention => "attention",
            Module::Elementwise => "elementwise",
            Module::Loss => "loss",
            Module::Norm => "norm",
            Module::Quant => "quant",
        }
    }
}

/// One kernel argument: a value, or a device address with the element type it points to.
#[derive(Clone, Debug)]
pub(crate) enum Arg {
    Ptr {
        addr: u64,
        dtype: Option<DType>,
    },
    I32(i32),
    I64(i64),
    U32(u32),
    U64(u64),
    F32(f32),
    /// A `repr(C)` struct, as 8-byte words (so the kernel reads it aligned).
    Struct {
        name: &'static str,
        words: Vec<u64>,
        bytes: usize,
    },
}

impl Arg {
    /// A `repr(C)` value passed by value (`MaskArg`, `AttnArgs`).
    pub(crate) fn of_struct<T: Copy>(name: &'static str, v: &T) -> Arg {
        let bytes = std::mem::size_of::<T>();
        let mut words = vec![0u64; bytes.div_ceil(8)];
        // SAFETY: `T` is plain `repr(C)` data; the words hold at least `bytes` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v as *const T as *const u8,
                words.as_mut_ptr() as *mut u8,
                bytes,
            );
        }
        Arg::Struct { name, words, bytes }
    }

    /// A pointer to this argument's value (as `cuLaunchKernel`'s kernelParams take it).
    fn value_ptr(&mut self) -> *mut std::ffi::c_void {
        match self {
            Arg::Ptr { addr, .. } => addr as *mut u64 as *mut _,
            Arg::I32(v) => v as *mut i32 as *mut _,
            Arg::I64(v) => v as *mut i64 as *mut _,
            Arg::U32(v) => v as *mut u32 as *mut _,
            Arg::U64(v) => v as *mut u64 as *mut _,
            Arg::F32(v) => v as *mut f32 as *mut _,
            Arg::Struct { words, .. } => words.as_mut_ptr() as *mut _,
        }
    }

    fn describe(&self) -> String {
        match self {
            Arg::Ptr { dtype, .. } => match dtype {
                Some(d) => format!("{d:?} pointer"),
                None => "pointer".into(),
            },
            Arg::I32(_) => "i32".into(),
            Arg::I64(_) => "i64".into(),
            Arg::U32(_) => "u32".into(),
            Arg::U64(_) => "u64".into(),
            Arg::F32(_) => "f32".into(),
            Arg::Struct { name, bytes, .. } => format!("{name} ({bytes} bytes)"),
        }
    }

    /// Whether this argument fits a parameter of type `p`.
    fn fits(&self, p: &Param) -> bool {
        match (self, *p) {
            (Arg::Ptr { dtype, .. }, Param::Ptr { elem, .. }) => match dtype {
                None => true,
                Some(d) => elem_of(*d) == elem,
            },
            (
                Arg::I32(_),
                Param::Int {
                    signed: true,
                    bytes: 4,
                },
            ) => true,
            (
                Arg::I64(_),
                Param::Int {
                    signed: true,
                    bytes: 8,
                },
            ) => true,
            (
                Arg::U32(_),
                Param::Int {
                    signed: false,
                    bytes: 4,
                },
            ) => true,
            (
                Arg::U64(_),
                Param::Int {
                    signed: false,
                    bytes: 8,
                },
            ) => true,
            (Arg::F32(_), Param::Float { bytes: 4 }) => true,
            (Arg::Struct { bytes, .. }, Param::Struct { bytes: b }) => *bytes == b as usize,
            _ => false,
        }
    }
}

fn elem_of(d: DType) -> Elem {
    match d {
        DType::F32 => Elem::F32,
        DType::BF16 => Elem::BF16,
        DType::F16 => Elem::F16,
        DType::U32 => Elem::U32,
        DType::I64 => Elem::I64,
        DType::U8 => Elem::U8,
        DType::F64 => Elem::F64,
        _ => Elem::Other,
    }
}

macro_rules! arg_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for Arg {
            fn from(x: $t) -> Arg {
                Arg::$v(x)
            }
        }
    )*};
}
arg_from!(i32 => I32, i64 => I64, u32 => U32, u64 => U64, f32 => F32);

/// Grid, block and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared: u32,
}

/// A grid-stride launch over `n` items, 256 threads a block.
pub(crate) fn grid(n: usize) -> Cfg {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    Cfg {
        grid: [blocks, 1, 1],
        block: [256, 1, 1],
        shared: 0,
    }
}

/// One block per row, `threads` (a multiple of 32, at most 1024) for a row of `d`.
pub(crate) fn rows(n_rows: usize, d: usize) -> Cfg {
    let threads = d.div_ceil(32).clamp(1, 32) as u32 * 32;
    Cfg {
        grid: [n_rows as u32, 1, 1],
        block: [threads, 1, 1],
        shared: 0,
    }
}

/// The limits of a launch on an H100 (compute capability 9.0), which the driver enforces.
pub(crate) mod limits {
    pub const MAX_THREADS: u32 = 1024;
    pub const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
    pub const MAX_GRID: [u32; 3] = [i32::MAX as u32, 65_535, 65_535];
    /// Dynamic shared memory without the opt-in attribute.
    pub const SMEM_DEFAULT: u32 = 48 * 1024;
    /// The most a block may opt in to.
    pub const SMEM_OPT_IN: u32 = 227 * 1024;
}

/// A kernel launch, device-neutral: run by [`GpuStorage::launch`] on either device.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub module: Module,
    pub name: String,
    pub cfg: Cfg,
    /// The opt-in to dynamic shared memory over 48 KiB (`cudaFuncAttributeMaxDynamicSharedMemorySize`).
    pub smem_opt_in: u32,
    pub args: Vec<Arg>,
}

impl Launch {
    pub(crate) fn new(module: Module, name: impl Into<String>, cfg: Cfg) -> Launch {
        Launch {
            module,
            name: name.into(),
            cfg,
            smem_opt_in: 0,
            args: vec![],
        }
    }

    /// Allows the kernel `bytes` of dynamic shared memory (beyond the default 48 KiB).
    pub(crate) fn opt_in_smem(mut self, bytes: usize) -> Launch {
        self.smem_opt_in = bytes as u32;
        self
    }

    pub(crate) fn arg(mut self, a: impl Into<Arg>) -> Launch {
        self.args.push(a.into());
        self
    }

    pub(crate) fn args(mut self, a: impl IntoIterator<Item = Arg>) -> Launch {
        self.args.extend(a);
        self
    }

    /// The arguments as `cuLaunchKernel`'s kernelParams: a pointer to each value (valid while
    /// `self` is borrowed).
    pub(crate) fn params(&mut self) -> Vec<*mut std::ffi::c_void> {
        self.args.iter_mut().map(Arg::value_ptr).collect()
    }

    /// The kernel this launch names, after the checks a GPU would make (and the argument
    /// types, which a GPU does not check): the same on both devices.
    pub(crate) fn check(&self) -> Result<&'static Kernel> {
        let m = self.module.name();
        let Some(k) = sft_kernels::emu::kernel(m, &self.name) else {
            bail!(
                "launch of `{}`: no such kernel in {m}.cu (its kernels: {})",
                self.name,
                sft_kernels::MODULES
                    .iter()
                    .find(|(n, _)| *n == m)
                    .map(|(_, ks)| ks.join(", "))
                    .unwrap_or_default()
            );
        };
        let Cfg {
            grid,
            block,
            shared,
        } = self.cfg;
        let threads = block.iter().map(|&b| b as u64).product::<u64>();
        let fail = |what: String| -> Result<&'static Kernel> {
            bail!(
                "launch of `{}` (grid {grid:?}, block {block:?}, {shared} bytes of shared memory): {what}",
                self.name
            )
        };
        if grid.contains(&0) || block.contains(&0) {
            return fail("an empty grid or block".into());
        }
        if threads > limits::MAX_THREADS as u64 {
            return fail(format!("more than {} threads a block", limits::MAX_THREADS));
        }
        if k.max_threads > 0 && threads > k.max_threads as u64 {
            return fail(format!(
                "more threads than the kernel's __launch_bounds__({})",
                k.max_threads
            ));
        }
        for i in 0..3 {
            if block[i] > limits::MAX_BLOCK[i] {
                return fail(format!("block dimension {i} over {}", limits::MAX_BLOCK[i]));
            }
            if grid[i] > limits::MAX_GRID[i] {
                return fail(format!("grid dimension {i} over {}", limits::MAX_GRID[i]));
            }
        }
        if shared > limits::SMEM_OPT_IN {
            return fail(format!(
                "over the {} bytes a block may have",
                limits::SMEM_OPT_IN
            ));
        }
        if shared > limits::SMEM_DEFAULT && shared > self.smem_opt_in {
            return fail(format!(
                "over {} bytes without opting in to them (opted in to {})",
                limits::SMEM_DEFAULT,
                self.smem_opt_in
            ));
        }
        if self.args.len() != k.params.len() {
            return fail(format!(
                "{} arguments for {} parameters",
                self.args.len(),
                k.params.len()
            ));
        }
        for (i, (a, p)) in self.args.iter().zip(&k.params).enumerate() {
            if !a.fits(p) {
                return fail(format!(
                    "argument {i} is a {}, the kernel declares {p}",
                    a.describe()
                ));
            }
        }
        Ok(k)
    }
}

/// A storage on a device that runs our kernels: a CUDA storage, or the emulated GPU's.
pub(crate) trait GpuStorage: Sized {
    fn dtype(&self) -> DType;
    /// A new storage of `n` elements of `dt` on the same device (contents undefined).
    fn alloc(&self, dt: DType, n: usize) -> Result<Self>;
    /// The address of the element a layout starts at, as a kernel argument.
    fn ptr(&self, l: &Layout) -> Result<Arg>;
    /// The address of a whole storage's first element.
    fn base(&self) -> Result<Arg> {
        self.ptr(&Layout::contiguous(1))
    }
    /// The address of a tensor's first element on this device, and what keeps it valid (the
    /// emulator copies the tensor to its memory; a GPU tensor is read in place).
    fn tensor_ptr(&self, t: &Tensor) -> Result<(Arg, Option<Self>)>;
    /// `f` of a tensor's storage on this device (a copy on the emulated GPU).
    fn with_tensor<R>(&self, t: &Tensor, f: impl FnOnce(&Self, &Layout) -> Result<R>) -> Result<R>;
    /// Runs a launch on this storage's device.
    fn launch(&self, l: Launch) -> Result<()>;
    /// The device's matrix product (cuBLAS on a GPU).
    fn matmul(
        &self,
        rhs: &Self,
        bmnk: (usize, usize, usize, usize),
        lhs_l: &Layout,
        rhs_l: &Layout,
    ) -> Result<Self>;
}

/// A kernel's input: a storage and its layout.
pub(crate) type In<'a, S> = (&'a S, &'a Layout);
/// A kernel's output: a storage and its shape.
pub(crate) type Out<S> = Result<(S, Shape)>;

/// The kernels' name suffix of a storage dtype (f32, bf16 and f16 have kernels).
pub(crate) fn suffix(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => bail!("no CUDA kernel for {dt:?}"),
    })
}

/// Whether the CUDA kernels take this dtype (f64 runs composed).
pub(crate) fn supported(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16 | DType::F16)
}

/// Requires a contiguous layout (the row kernels read rows back to back).
pub(crate) fn contiguous(l: &Layout, op: &str) -> Result<()> {
    if l.is_contiguous() {
        Ok(())
    } else {
        bail!(
            "{op}: expected a contiguous input, got strides {:?}",
            l.stride()
        )
    }
}

/// Launches the simple kernel `name_<dtype>(inputs..., out, size)` of `module` (contiguous
/// inputs; `out`: `out_len` elements of the first input's dtype) and returns `out`.
pub(crate) fn launch_simple<S: GpuStorage>(
    module: Module,
    name: &str,
    inputs: &[In<S>],
    out_len: usize,
    cfg: Cfg,
    size: Arg,
) -> Result<S> {
    let first = inputs[0].0;
    let dt = first.dtype();
    let mut args = vec![];
    for (s, l) in inputs {
        contiguous(l, name)?;
        args.push(s.ptr(l)?);
    }
    let out = first.alloc(dt, out_len)?;
    args.push(out.base()?);
    args.push(size);
    first.launch(Launch::new(module, format!("{name}_{}", suffix(dt)?), cfg).args(args))?;
    Ok(out)
}

/// The LoRA kernels' view of a dropout mask (`MaskArg` in `common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskArg {
    pub seed: u64,
    pub mask: u64,
    pub stream: u32,
    pub thr: u32,
    pub inv: f32,
    pub mode: i32,
}
