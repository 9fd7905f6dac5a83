//! Which CPU GEMM kernels run here: the one place that reads the CPU's features and
//! `SFT_CPU_KERNELS`, and the line that says what was chosen.
//!
//! Paths, fastest first (`auto`, the default, takes the first this CPU has):
//! - `amx`: bf16 products on the AMX tiles (`tdpbf16ps`; Intel Sapphire Rapids and later),
//!   f32 products on AVX-512F. Linux must grant the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
//!   requested once here, before any tile instruction runs).
//! - `avx512`: bf16 with AVX512-BF16 (`vdpbf16ps`) where the CPU has it, else bf16 widened to
//!   f32 in registers; f32 with AVX-512F FMA.
//! - `avx2`: AVX2 + FMA, bf16 widened to f32 in registers.
//! - `portable`: none of the packed kernels; candle's matmul (the `gemm` crate) runs every
//!   product.
//!
//! `SFT_CPU_KERNELS=auto|portable|avx2|avx512|amx` forces a path; a path this CPU (or its
//! kernel) lacks is refused with an error, as is an unknown value.

use std::sync::OnceLock;

/// The environment variable that forces a kernel path.
pub const ENV: &str = "SFT_CPU_KERNELS";

/// What was wrong with the kernel setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuKernelsError {
    #[error("{ENV}={0:?} is not a kernel path (expected auto, portable, avx2, avx512 or amx)")]
    Unknown(String),
    #[error("{ENV}={path}: this CPU ({model}) lacks {missing}")]
    Missing {
        path: &'static str,
        model: String,
        missing: String,
    },
    #[error(
        "{ENV}=amx: Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM for \
         XTILEDATA: {0}); a kernel older than 5.16 cannot grant it, choose avx512"
    )]
    TilePermission(String),
}

/// The instruction-set extensions the GEMM kernels use, as this CPU and OS report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    pub avx2_fma: bool,
    pub avx512f: bool,
    /// AVX512-BF16 (`vdpbf16ps`), with the AVX512 BW/VL the kernel also uses.
    pub avx512bf16: bool,
    /// AMX-TILE and AMX-BF16 in CPUID and the tile state enabled by the OS in XCR0.
    pub amx_bf16: bool,
}

/// A kernel path (what `SFT_CPU_KERNELS` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    Portable,
    Avx2,
    Avx512,
    Amx,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Avx512 => "avx512",
            Path::Amx => "amx",
        }
    }
}

/// The kernel of the f32 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum F32Kernel {
    /// candle's matmul.
    Portable,
    Avx2,
    Avx512,
}

/// The kernel of the bf16 products (bf16 × bf16, sums in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bf16Kernel {
    /// candle's f32 matmul on widened copies.
    Portable,
    /// AVX2 + FMA, bf16 widened to f32 in registers.
    Avx2,
    /// AVX-512F, bf16 widened to f32 in registers (an AVX-512 CPU without AVX512-BF16).
    Avx512,
    /// AVX512-BF16 `vdpbf16ps`.
    Avx512Bf16,
    /// AMX tiles, `tdpbf16ps`.
    Amx,
}

/// The kernels a path runs, one per dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernels {
    pub f32: F32Kernel,
    pub bf16: Bf16Kernel,
}

impl Kernels {
    pub const PORTABLE: Kernels = Kernels {
        f32: F32Kernel::Portable,
        bf16: Bf16Kernel::Portable,
    };

    /// The kernels of `path` on a CPU with `f`, or what it lacks.
    pub fn for_path(path: Path, f: &Features) -> Result<Kernels, String> {
        let need = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
        match path {
            Path::Portable => Ok(Kernels::PORTABLE),
            Path::Avx2 => {
                need(f.avx2_fma, "AVX2 and FMA")?;
                Ok(Kernels {
                    f32: F32Kernel::Avx2,
                    bf16: Bf16Kernel::Avx2,
                })
            }
            Path::Avx512 => {
                need(f.avx512f, "AVX-512F")?;
                Ok(Kernels {
                    f32: F32Kernel::Avx512,
                    bf16: if f.avx512bf16 {
                        Bf16Kernel::Avx512Bf16
                    } else {
                        Bf16Kernel::Avx512
                    },
                })
            }
            Path::Amx => {
                need(
                    f.amx_bf16,
                    "AMX-TILE and AMX-BF16 (with the tile state enabled)",
                )?;
                need(f.avx512f, "AVX-512F")?;
                Ok(Kernels {
                    f32: F32Kernel::Avx512,
                    bf16: Bf16Kernel::Amx,
                })
            }
        }
    }

    /// Every combination of kernels this CPU runs (for the tests: each is checked against the
    /// reference on the machine that has it).
    pub fn all_on(f: &Features) -> Vec<Kernels> {
        let mut out = vec![Kernels::PORTABLE];
        if f.avx2_fma {
            out.push(Kernels::for_path(Path::Avx2, f).expect("avx2"));
        }
        if f.avx512f {
            out.push(Kernels {
                f32: F32Kernel::Avx512,
                bf16: Bf16Kernel::Avx512,
            });
            if f.avx512bf16 {
                out.push(Kernels {
                    f32: F32Kernel::Avx512,
                    bf16: Bf16Kernel::Avx512Bf16,
                });
            }
        }
        if f.amx_bf16 && f.avx512f && tile_permission().is_ok() {
            out.push(Kernels::for_path(Path::Amx, f).expect("amx"));
        }
        out
    }
}

/// The path `auto` takes on a CPU with `f`: the fastest it has. AMX only when Linux grants the
/// tile state (`tile_ok`).
pub fn best_path(f: &Features, tile_ok: bool) -> Path {
    if f.amx_bf16 && f.avx512f && tile_ok {
        Path::Amx
    } else if f.avx512f {
        Path::Avx512
    } else if f.avx2_fma {
        Path::Avx2
    } else {
        Path::Portable
    }
}

/// The kernels for a `SFT_CPU_KERNELS` value (`None`: unset) on a CPU with `f`. `tile` asks
/// Linux for the AMX tile state (called only when the amx path is chosen or considered).
pub fn select(
    setting: Option<&str>,
    f: &Features,
    model: &str,
    tile: impl Fn() -> Result<(), String>,
) -> Result<(Path, Kernels), CpuKernelsError> {
    let path = match setting.map(str::trim).unwrap_or("") {
        "" | "auto" => best_path(f, f.amx_bf16 && tile().is_ok()),
        "portable" => Path::Portable,
        "avx2" => Path::Avx2,
        "avx512" => Path::Avx512,
        "amx" => Path::Amx,
        other => return Err(CpuKernelsError::Unknown(other.to_string())),
    };
    let kernels = Kernels::for_path(path, f).map_err(|missing| CpuKernelsError::Missing {
        path: path.name(),
        model: model.to_string(),
        missing,
    })?;
    if path == Path::Amx {
        tile().map_err(CpuKernelsError::TilePermission)?;
    }
    Ok((path, kernels))
}

/// This CPU's features (read once).
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    let avx512f = is_x86_feature_detected!("avx512f");
    Features {
        avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        avx512f,
        avx512bf16: avx512f
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl"),
        amx_bf16: amx_in_cpuid_and_xcr0(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

/// CPUID.(7,0):EDX bit 22 (AMX-BF16) and 24 (AMX-TILE), and XCR0 bits 17-18 (XTILECFG,
/// XTILEDATA) set by the OS. (`is_x86_feature_detected!("amx-bf16")` is not stable Rust.)
#[cfg(target_arch = "x86_64")]
fn amx_in_cpuid_and_xcr0() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // Leaf 7 is read only when leaf 0 lists it.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let cpuid = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0;
    // XGETBV runs only when CPUID.1:ECX.OSXSAVE says the OS enabled it.
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    cpuid && osxsave && {
        // SAFETY: OSXSAVE is set, so XGETBV with ECX = 0 is allowed.
        let xcr0 = unsafe { xgetbv0() };
        xcr0 & (0b11 << 17) == 0b11 << 17
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

/// Asks Linux once for the AMX tile data state (`ARCH_REQ_XCOMP_PERM`, XTILEDATA): without it
/// the first tile instruction kills the process with SIGILL. The answer is kept.
pub fn tile_permission() -> Result<(), String> {
    static P: OnceLock<Result<(), String>> = OnceLock::new();
    P.get_or_init(request_tile_permission).clone()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes this process's permitted
    // extended states; any answer is a plain return value.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_permission() -> Result<(), String> {
    Err("the AMX path is implemented for Linux on x86-64 only".to_string())
}

/// The CPU's model name from /proc/cpuinfo ("unknown CPU" elsewhere).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// The path and kernels of this process: `SFT_CPU_KERNELS` (read once) on this CPU.
pub fn selected() -> Result<(Path, Kernels), CpuKernelsError> {
    static S: OnceLock<Result<(Path, Kernels), CpuKernelsError>> = OnceLock::new();
    S.get_or_init(|| {
        let setting = std::env::var(ENV).ok();
        select(
            setting.as_deref(),
            &features(),
            &cpu_model(),
            tile_permission,
        )
    })
    .clone()
}

/// The kernels every GEMM call site runs: those of [`with_kernels`] inside it on this thread,
/// else [`selected`].
pub fn kernels() -> Result<Kernels, CpuKernelsError> {
    if let Some(k) = FORCED.with(std::cell::Cell::get) {
        return Ok(k);
    }
    selected().map(|(_, k)| k)
}

thread_local! {
    static FORCED: std::cell::Cell<Option<Kernels>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the products started on this thread in `k` (what `SFT_CPU_KERNELS` sets for
/// the whole process; tests use this to run every path without racing on the environment).
/// `k` must come from [`Kernels::for_path`] or [`Kernels::all_on`] for this CPU's
/// [`features`]: a pack for a kernel the CPU lacks is not made (the product goes to candle).
pub fn with_kernels<R>(k: Kernels, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(k))));
    f()
}

/// One line: the chosen path, its kernels, the CPU's model and the flags that matter, e.g.
/// `CPU kernels: avx512 (f32 avx512, bf16 avx512-bf16) on AMD EPYC [avx2+fma avx512f
/// avx512bf16 -amx-bf16], SFT_CPU_KERNELS unset`.
pub fn describe() -> Result<String, CpuKernelsError> {
    let (path, k) = selected()?;
    let f = features();
    Ok(describe_with(
        path,
        k,
        &f,
        &cpu_model(),
        std::env::var(ENV).ok().as_deref(),
    ))
}

/// [`describe`] for given values.
pub fn describe_with(
    path: Path,
    k: Kernels,
    f: &Features,
    model: &str,
    setting: Option<&str>,
) -> String {
    let flag = |on: bool, name: &str| format!("{}{name}", if on { "" } else { "-" });
    let f32k = match k.f32 {
        F32Kernel::Portable => "candle",
        F32Kernel::Avx2 => "avx2-fma",
        F32Kernel::Avx512 => "avx512f",
    };
    let bf16k = match k.bf16 {
        Bf16Kernel::Portable => "candle f32",
        Bf16Kernel::Avx2 => "avx2-fma widened",
        Bf16Kernel::Avx512 => "avx512f widened",
        Bf16Kernel::Avx512Bf16 => "avx512-bf16",
        Bf16Kernel::Amx => "amx-bf16 tiles",
    };
    let set = match setting {
        Some(s) => format!("{ENV}={s}"),
        None => format!("{ENV} unset (auto)"),
    };
    format!(
        "CPU kernels: {} (f32 {f32k}, bf16 {bf16k}) on {model} [{} {} {} {}], {set}",
        path.name(),
        flag(f.avx2_fma, "avx2+fma"),
        flag(f.avx512f, "avx512f"),
        flag(f.avx512bf16, "avx512bf16"),
        flag(f.amx_bf16, "amx-bf16"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Features = Features {
        avx2_fma: true,
        avx512f: true,
        avx512bf16: true,
        amx_bf16: true,
    };

    #[test]
    fn settings_choose_refuse_and_name_what_is_missing() {
        let ok = || Ok(());
        let avx2_only = Features {
            avx2_fma: true,
            ..Features::default()
        };
        let sel = |s: Option<&str>, f: &Features| select(s, f, "Test CPU", ok);
        assert_eq!(sel(None, &ALL).unwrap().0, Path::Amx);
        assert_eq!(sel(Some("auto"), &avx2_only).unwrap().0, Path::Avx2);
        assert_eq!(sel(None, &Features::default()).unwrap().0, Path::Portable);
        let (p, k) = sel(Some("avx512"), &ALL).unwrap();
        assert_eq!(
            (p, k.bf16, k.f32),
            (Path::Avx512, Bf16Kernel::Avx512Bf16, F32Kernel::Avx512)
        );
        let no_bf16 = Features {
            avx512bf16: false,
            amx_bf16: false,
            ..ALL
        };
        assert_eq!(
            sel(Some("avx512"), &no_bf16).unwrap().1.bf16,
            Bf16Kernel::Avx512
        );
        assert_eq!(sel(None, &no_bf16).unwrap().0, Path::Avx512);
        assert_eq!(sel(Some("avx2"), &ALL).unwrap().1.bf16, Bf16Kernel::Avx2);
        assert_eq!(sel(Some("portable"), &ALL).unwrap().1, Kernels::PORTABLE);
        let err = sel(Some("amx"), &no_bf16).unwrap_err();
        assert!(
            matches!(err, CpuKernelsError::Missing { path: "amx", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("Test CPU") && err.to_string().contains("AMX-TILE"));
        let err = sel(Some("avx512"), &avx2_only).unwrap_err().to_string();
        assert!(err.contains("AVX-512F"), "{err}");
        let err = sel(Some("avx2"), &Features::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("AVX2 and FMA"), "{err}");
        let err = sel(Some("sse"), &ALL).unwrap_err().to_string();
        assert!(err.contains("\"sse\"") && err.contains("avx512"), "{err}");
    }

    #[test]
    fn amx_needs_the_tile_permission() {
        let refused = || Err("Invalid argument (os error 22)".to_string());
        let err = select(Some("amx"), &ALL, "X", refused).unwrap_err();
        assert!(matches!(err, CpuKernelsError::TilePermission(_)));
        assert!(err.to_string().contains("ARCH_REQ_XCOMP_PERM"), "{err}");
        // auto falls back to AVX-512 when the tiles are refused.
        assert_eq!(select(None, &ALL, "X", refused).unwrap().0, Path::Avx512);
    }

    #[test]
    fn this_cpu_is_described_and_its_flags_match_cpuinfo() {
        let f = features();
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if let Some(flags) = info.lines().find(|l| l.starts_with("flags")) {
            let has = |n: &str| flags.split_whitespace().any(|w| w == n);
            assert_eq!(f.avx512f, has("avx512f"));
            assert_eq!(f.avx512bf16, has("avx512_bf16"));
            assert_eq!(f.amx_bf16, has("amx_bf16") && has("amx_tile"));
            assert_eq!(f.avx2_fma, has("avx2") && has("fma"));
        }
        // Refusing the tile state where there is no AMX: Linux says no.
        if !f.amx_bf16 {
            assert!(tile_permission().is_err());
        }
        let line = describe_with(
            Path::Avx512,
            Kernels::for_path(Path::Avx512, &ALL).unwrap(),
            &ALL,
            "M",
            None,
        );
        assert_eq!(
            line,
            "CPU kernels: avx512 (f32 avx512f, bf16 avx512-bf16) on M [avx2+fma avx512f \
             avx512bf16 amx-bf16], SFT_CPU_KERNELS unset (auto)"
        );
    }
}
