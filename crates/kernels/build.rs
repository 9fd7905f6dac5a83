//! Builds the kernels twice from the same `src/*.cu` sources:
//! - always, the emulated GPU: each `.cu` compiled as C++ for the CPU with the system's C++
//!   compiler (`cc`; C++20) against `emu/include` (CUDA's headers as the emulator provides
//!   them), plus `emu/runtime.cpp`; and `kernels.rs`, the table of every kernel's name per
//!   module, read off the preprocessed sources, which launches on both devices resolve through;
//! - with the `cuda` feature, PTX with nvcc (found through CUDA_ROOT, CUDA_PATH or the PATH;
//!   `scripts/build-cuda.sh` provides one) for compute capability `CUDA_COMPUTE_CAP` (90 when
//!   unset: H100, H200), written to `ptx.rs` as one `&str` constant per file.
//!
//! `SFT_EMU_SANITIZE=address` or `thread` (scripts/kernel-sanitize) builds the emulated kernels
//! with AddressSanitizer or ThreadSanitizer; `SFT_EMU_UCONTEXT=1` the portable fiber switch.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=emu");
    println!("cargo::rerun-if-env-changed=SFT_EMU_SANITIZE");
    println!("cargo::rerun-if-env-changed=SFT_EMU_UCONTEXT");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("src");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&src)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    emulator(&out, &sources)?;
    #[cfg(feature = "cuda")]
    ptx(&out)?;
    Ok(())
}

/// The module's name: the file stem (`attention.cu` -> `attention`).
fn module(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn base_build() -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .include("emu/include")
        .include("src")
        // The kernels reinterpret 16-bit tiles as uint4 rows, as CUDA code does.
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(true);
    b
}

/// `(name, __launch_bounds__ or 0)` of every `extern "C" __global__` kernel of a `.cu` file,
/// from its preprocessed text (the kernels are instantiated by macros).
fn scan(path: &Path) -> Res<Vec<(String, u32)>> {
    let text = base_build()
        .define("SFT_EMU_SCAN", None)
        .flag("-x")
        .flag("c++")
        .file(path)
        .try_expand()?;
    let text = String::from_utf8_lossy(&text);
    let mut found = vec![];
    let mut rest: &str = &text;
    while let Some(i) = rest.find("SFT_EMU_KERNEL") {
        rest = &rest[i + "SFT_EMU_KERNEL".len()..];
        let t = rest
            .trim_start()
            .strip_prefix("void")
            .ok_or("a kernel not returning void")?;
        let mut t = t.trim_start();
        let mut bound = 0;
        if let Some(b) = t.strip_prefix("SFT_EMU_LAUNCH_BOUNDS") {
            let b = b
                .trim_start()
                .strip_prefix('(')
                .ok_or("__launch_bounds__")?;
            let close = b.find(')').ok_or("__launch_bounds__")?;
            bound = b[..close].trim().parse()?;
            t = b[close + 1..].trim_start();
        }
        let name: String = t
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            return Err(format!("{}: a kernel without a name", path.display()).into());
        }
        found.push((name, bound));
    }
    Ok(found)
}

fn emulator(out: &Path, sources: &[PathBuf]) -> Res<()> {
    let sanitize = std::env::var("SFT_EMU_SANITIZE").unwrap_or_default();
    let (define, lib) = match sanitize.as_str() {
        "" => (None, None),
        "address" => (Some("SFT_EMU_ASAN"), Some("asan")),
        "thread" => (Some("SFT_EMU_TSAN"), Some("tsan")),
        s => return Err(format!("SFT_EMU_SANITIZE={s}: expected address or thread").into()),
    };
    let mut kernels = base_build();
    kernels.define("SFT_EMU_BUILD", None);
    if lib.is_some() {
        kernels
            .flag(format!("-fsanitize={sanitize}"))
            .flag("-fno-omit-frame-pointer")
            .flag("-g")
            .opt_level(1);
    } else {
        kernels.opt_level(2);
    }
    let mut rs = String::from(
        "/// The kernels of each module (`.cu` file), as its sources define them.\n\
         pub const MODULES: &[(&str, &[&str])] = &[\n",
    );
    let mut ffi = String::from("extern \"C\" {\n");
    let mut tables = String::from(
        "/// Each module's kernel table in the emulator.\n\
         pub(crate) fn raw_tables() -> Vec<(&'static str, *const RawKernel, usize)> {\n    \
         let mut v = vec![];\n",
    );
    for path in sources {
        let m = module(path);
        let found = scan(path)?;
        let mut cpp = format!(
            "// Generated by build.rs from {}.cu: the module and its kernel table.\n\
             #include \"sft_emu_registry.h\"\n#include \"{}\"\n\
             static const sft_emu_kernel KERNELS[] = {{\n",
            m,
            path.display()
        );
        let _ = write!(rs, "    (\"{m}\", &[");
        for (name, bound) in &found {
            let _ = writeln!(cpp, "    SFT_EMU_ENTRY({name}, {bound}),");
            let _ = write!(rs, "\"{name}\", ");
        }
        rs.push_str("]),\n");
        let _ = write!(
            cpp,
            "}};\nextern \"C\" const sft_emu_kernel* sft_emu_kernels_{m}(size_t* n) {{\n    \
             *n = sizeof(KERNELS) / sizeof(KERNELS[0]);\n    return KERNELS;\n}}\n"
        );
        let file = out.join(format!("emu_{m}.cpp"));
        std::fs::write(&file, cpp)?;
        kernels.file(&file);
        let _ = writeln!(
            ffi,
            "    fn sft_emu_kernels_{m}(n: *mut usize) -> *const RawKernel;"
        );
        let _ = writeln!(
            tables,
            "    let mut n = 0;\n    // SAFETY: the generated table function only writes n.\n    \
             let p = unsafe {{ sft_emu_kernels_{m}(&mut n) }};\n    v.push((\"{m}\", p, n));"
        );
    }
    rs.push_str("];\n");
    ffi.push_str("}\n");
    tables.push_str("    v\n}\n");
    std::fs::write(out.join("kernels.rs"), format!("{rs}\n{ffi}\n{tables}"))?;
    kernels.compile("sft_emu_kernels");
    // The runtime is never instrumented: only the kernels' own accesses are checked.
    let mut runtime = base_build();
    runtime.file("emu/runtime.cpp").opt_level(2);
    // The portable fiber switch (ucontext) that CPUs other than x86-64 use, forced here.
    if std::env::var_os("SFT_EMU_UCONTEXT").is_some() {
        runtime.define("SFT_EMU_UCONTEXT", None);
    }
    if let Some(d) = define {
        runtime.define(d, None);
    }
    runtime.compile("sft_emu_runtime");
    if let Some(lib) = lib {
        println!("cargo::rustc-link-lib=dylib={lib}");
        println!("cargo::rustc-env=SFT_EMU_SANITIZER={sanitize}");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn ptx(out: &Path) -> Res<()> {
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(90);
    let ptx = cudaforge::KernelBuilder::new()
        .source_dir("src")
        .watch(["src/common.cuh"])
        .compute_cap(cap)
        .no_incremental()
        .arg("-std=c++17")
        .arg("-O3")
        .arg("--expt-relaxed-constexpr")
        .arg("-Isrc")
        .build_ptx()?;
    ptx.write(out.join("ptx.rs"))?;
    Ok(())
}
