//! The emulated GPU's interface: the kernel table (name, parameter types, launch bounds) and
//! launches on host memory. See `emu/runtime.cpp` for how a launch runs and what it checks.
use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

#[repr(C)]
pub(crate) struct RawParam {
    kind: u32,
    size: u32,
    pointee: u32,
    is_const: u32,
}

#[repr(C)]
pub(crate) struct RawKernel {
    name: *const c_char,
    invoke: *const c_void,
    params: *const RawParam,
    nparams: u32,
    max_threads: u32,
}

extern "C" {
    fn sft_emu_launch(
        invoke: *const c_void,
        args: *mut *mut c_void,
        grid: *const u32,
        block: *const u32,
        smem: u64,
        err: *mut c_char,
        errlen: usize,
    ) -> i32;
    fn sft_emu_set_schedule(kind: i32, seed: u64);
}

/// The element type a pointer parameter points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    BF16,
    F16,
    U32,
    I64,
    I32,
    U8,
    F64,
    U64,
    Other,
}

/// A kernel parameter's type, as the C++ compiler saw its declaration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    Ptr { elem: Elem, is_const: bool },
    Int { signed: bool, bytes: u32 },
    Float { bytes: u32 },
    Struct { bytes: u32 },
}

impl std::fmt::Display for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Param::Ptr { elem, is_const } => {
                write!(f, "{}{elem:?}*", if *is_const { "const " } else { "" })
            }
            Param::Int { signed, bytes } => {
                write!(f, "{}{}", if *signed { "i" } else { "u" }, bytes * 8)
            }
            Param::Float { bytes } => write!(f, "f{}", bytes * 8),
            Param::Struct { bytes } => write!(f, "struct of {bytes} bytes"),
        }
    }
}

/// One kernel of the table.
#[derive(Debug)]
pub struct Kernel {
    pub module: &'static str,
    pub name: String,
    pub params: Vec<Param>,
    /// `__launch_bounds__`: the most threads a block may have (0: no bound).
    pub max_threads: u32,
    invoke: usize,
}

fn elem(code: u32) -> Elem {
    match code {
        1 => Elem::F32,
        2 => Elem::BF16,
        3 => Elem::F16,
        4 => Elem::U32,
        5 => Elem::I64,
        6 => Elem::I32,
        7 => Elem::U8,
        8 => Elem::F64,
        9 => Elem::U64,
        _ => Elem::Other,
    }
}

/// Every kernel of every module.
pub fn kernels() -> &'static [Kernel] {
    static ALL: OnceLock<Vec<Kernel>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut all = vec![];
        for (module, p, n) in crate::table::raw_tables() {
            // SAFETY: the generated tables are static arrays of `n` entries, each with a
            // NUL-terminated name and `nparams` parameters.
            let raw = unsafe { std::slice::from_raw_parts(p, n) };
            for k in raw {
                let params = unsafe { std::slice::from_raw_parts(k.params, k.nparams as usize) };
                all.push(Kernel {
                    module,
                    name: unsafe { CStr::from_ptr(k.name) }
                        .to_string_lossy()
                        .into_owned(),
                    params: params
                        .iter()
                        .map(|p| match p.kind {
                            1 => Param::Ptr {
                                elem: elem(p.pointee),
                                is_const: p.is_const != 0,
                            },
                            2 | 3 => Param::Int {
                                signed: p.kind == 2,
                                bytes: p.size,
                            },
                            4 => Param::Float { bytes: p.size },
                            _ => Param::Struct { bytes: p.size },
                        })
                        .collect(),
                    max_threads: k.max_threads,
                    invoke: k.invoke as usize,
                });
            }
        }
        all
    })
}

/// The kernel `name` of `module`, if the sources define it.
pub fn kernel(module: &str, name: &str) -> Option<&'static Kernel> {
    type Index = std::collections::HashMap<(&'static str, &'static str), &'static Kernel>;
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX
        .get_or_init(|| {
            kernels()
                .iter()
                .map(|k| ((k.module, k.name.as_str()), k))
                .collect()
        })
        .get(&(module, name))
        .copied()
}

/// The order in which a block's threads run between barriers: a correct kernel gives the same
/// result under each (tests vary it to expose a missing barrier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Forward,
    Reverse,
    /// A shuffle drawn from the seed and the block's index.
    Shuffle(u64),
}

/// Sets the schedule of every later launch (process-wide).
pub fn set_schedule(s: Schedule) {
    let (kind, seed) = match s {
        Schedule::Forward => (0, 0),
        Schedule::Reverse => (1, 0),
        Schedule::Shuffle(seed) => (2, seed),
    };
    // SAFETY: stores two atomics.
    unsafe { sft_emu_set_schedule(kind, seed) }
}

/// The sanitizer the emulated kernels were built with (`SFT_EMU_SANITIZE`), if any.
pub const SANITIZER: Option<&str> = option_env!("SFT_EMU_SANITIZER");

/// Runs `kernel` over `grid` blocks of `block` threads with `smem` bytes of dynamic shared
/// memory. `args[i]` points to the value of parameter i (as `cuLaunchKernel`'s
/// kernelParams).
///
/// # Safety
/// `args` must match the kernel's parameters (the caller checks them against
/// [`Kernel::params`]) and every pointer among them must point to host memory the kernel may
/// read and write as it does on a GPU.
pub unsafe fn launch(
    kernel: &Kernel,
    args: &mut [*mut c_void],
    grid: [u32; 3],
    block: [u32; 3],
    smem: u64,
) -> Result<(), String> {
    let mut err = vec![0 as c_char; 2048];
    let rc = unsafe {
        sft_emu_launch(
            kernel.invoke as *const c_void,
            args.as_mut_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            smem,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: the runtime wrote a NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
        Err(format!("{}: {}", kernel.name, msg.to_string_lossy()))
    }
}
