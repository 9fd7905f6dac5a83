//! Matrix products against a packed B on x86-64 CPUs, for the linear layers, in the kernels
//! [`crate::cpu_features`] chose for this CPU (`SFT_CPU_KERNELS`):
//! - bf16 × bf16 → f32: AMX tiles (`tdpbf16ps`), AVX512-BF16 (`vdpbf16ps`: twice the multiply
//!   throughput of f32 FMA), or bf16 widened to f32 in registers with AVX-512F or AVX2 + FMA
//!   (candle widens bf16 to f32 in memory and runs an f32 GEMM);
//! - f32 × f32 → f32 with AVX-512F or AVX2 FMA, for frozen f32 weights packed once: the
//!   general GEMM candle calls packs both operands on every call, which at the few rows of a
//!   decoding step took as long as the multiply-adds.
//!
//! `C (m × n) = A (m × k) · B (k × n)`: A is row-major with contiguous rows (an activation), B
//! is any strided matrix (a weight or its transpose), packed by [`PackedB::new`] (bf16: 32-column
//! panels of k-pairs, the layout `vdpbf16ps` consumes and the AMX tiles load as B tiles of 16
//! columns) or [`PackedB::new_f32`] (32-column panels of single k). Products of bf16 values are
//! exact in f32; sums are accumulated in f32, as PyTorch does. Where the chosen kernels are
//! `portable` (or for odd `k` in bf16) the constructors return `None` and the caller falls back
//! to candle.
//!
//! The AMX kernel's data movement (tile configuration, padding of row and k tails, partial sums
//! between k-blocks) is tested here through an emulation of the tile instructions; the tile
//! instructions themselves run only on a CPU with AMX.
use half::bf16;
use rayon::prelude::*;

pub use crate::cpu_features::{Bf16Kernel, F32Kernel, Kernels};

/// Calls `$kernel::<R, ..>(args)` with the row count `R` = `$mr` (1 to 8) as a constant.
macro_rules! by_rows {
    ($mr:expr, $kernel:ident::<R $(, $c:ident)*>($($arg:expr),*)) => {
        match $mr {
            8 => $kernel::<8 $(, $c)*>($($arg),*),
            7 => $kernel::<7 $(, $c)*>($($arg),*),
            6 => $kernel::<6 $(, $c)*>($($arg),*),
            5 => $kernel::<5 $(, $c)*>($($arg),*),
            4 => $kernel::<4 $(, $c)*>($($arg),*),
            3 => $kernel::<3 $(, $c)*>($($arg),*),
            2 => $kernel::<2 $(, $c)*>($($arg),*),
            _ => $kernel::<1 $(, $c)*>($($arg),*),
        }
    };
}

/// Columns per packed panel: two 16-lane registers.
const NR: usize = 32;
/// k-pairs per block (k = 512): a packed panel block is 32 KiB.
const KP_BLOCK: usize = 256;
/// Rows per task (a multiple of every kernel's row step but AVX2's 6 and 4, AMX's 16 included):
/// a span's k-block of A is 256 KiB at most.
const SPAN: usize = 256;
/// Bytes of partial sums per task when k has several blocks.
const SCRATCH_BYTES: usize = 256 << 10;

/// The kernels of this process (`SFT_CPU_KERNELS` on this CPU), as a candle error when the
/// setting is refused.
pub fn kernels() -> candle_core::Result<Kernels> {
    crate::cpu_features::kernels().map_err(candle_core::Error::wrap)
}

/// How a pack's products run (fixed when packing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exec {
    /// bf16 pairs, `vdpbf16ps`.
    Avx512Bf16,
    /// bf16 pairs widened to f32, AVX-512F.
    Avx512Widen,
    /// bf16 pairs widened to f32, AVX2 + FMA.
    Avx2Widen,
    /// bf16 pairs on the AMX tiles.
    Amx,
    /// bf16 pairs through the same tiling as `Amx`, the tile instructions emulated (tests).
    #[cfg(test)]
    AmxEmulated,
    /// f32, AVX-512F.
    F32Avx512,
    /// f32, AVX2 + FMA.
    F32Avx2,
}

impl Exec {
    /// Whether this CPU runs the kernel (the AMX one only once Linux granted the tiles).
    fn runs_here(self) -> bool {
        let f = crate::cpu_features::features();
        match self {
            Exec::Avx512Bf16 => f.avx512bf16,
            Exec::Avx512Widen | Exec::F32Avx512 => f.avx512f,
            Exec::Avx2Widen | Exec::F32Avx2 => f.avx2_fma,
            Exec::Amx => f.amx_bf16 && crate::cpu_features::tile_permission().is_ok(),
            #[cfg(test)]
            Exec::AmxEmulated => true,
        }
    }

    fn is_f32(self) -> bool {
        matches!(self, Exec::F32Avx512 | Exec::F32Avx2)
    }

    /// Rows per micro-kernel call.
    fn rows(self) -> usize {
        match self {
            Exec::Avx512Bf16 | Exec::Avx512Widen | Exec::F32Avx512 => 8,
            Exec::F32Avx2 => 6,
            Exec::Avx2Widen => 4,
            Exec::Amx => 16,
            #[cfg(test)]
            Exec::AmxEmulated => 16,
        }
    }
}

/// B packed into 32-column panels; a frozen weight is packed once and kept (see
/// `ops::WeightPack`), other operands per product.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    exec: Exec,
    data: Vec<u32>,
}

impl PackedB {
    /// `B[kk, j] = b[kk * b_rs + j * b_cs]` (k × n) packed for the bf16 kernel of `kernels`, or
    /// `None` when there is none (portable, odd or zero `k`, zero `n`).
    pub fn new(
        b: &[bf16],
        k: usize,
        n: usize,
        b_rs: usize,
        b_cs: usize,
        kernels: Kernels,
    ) -> Option<Self> {
        let exec = match kernels.bf16 {
            Bf16Kernel::Portable => return None,
            Bf16Kernel::Avx2 => Exec::Avx2Widen,
            Bf16Kernel::Avx512 => Exec::Avx512Widen,
            Bf16Kernel::Avx512Bf16 => Exec::Avx512Bf16,
            Bf16Kernel::Amx => Exec::Amx,
        };
        Self::new_exec(b, k, n, (b_rs, b_cs), exec)
    }

    fn new_exec(
        b: &[bf16],
        k: usize,
        n: usize,
        (b_rs, b_cs): (usize, usize),
        exec: Exec,
    ) -> Option<Self> {
        if !exec.runs_here() || !k.is_multiple_of(2) || n == 0 || k == 0 {
            return None;
        }
        assert!(
            b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
            "B is too short for its strides"
        );
        Some(Self {
            k,
            n,
            exec,
            data: pack_b(b, k, n, b_rs, b_cs),
        })
    }

    /// The f32 kernel's packing of `B[kk, j] = b[kk * b_rs + j * b_cs]`, or `None` when
    /// `kernels` have no f32 kernel (portable) or `k` or `n` is zero.
    pub fn new_f32(
        b: &[f32],
        k: usize,
        n: usize,
        b_rs: usize,
        b_cs: usize,
        kernels: Kernels,
    ) -> Option<Self> {
        let exec = Self::f32_exec(kernels)?;
        if n == 0 || k == 0 {
            return None;
        }
        assert!(
            b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
            "B is too short for its strides"
        );
        let data = pack_f32(b, k, n, (b_rs, b_cs), true);
        Some(Self { k, n, exec, data })
    }

    /// The f32 exec of `kernels` when this CPU runs it.
    fn f32_exec(kernels: Kernels) -> Option<Exec> {
        let exec = match kernels.f32 {
            F32Kernel::Portable => return None,
            F32Kernel::Avx2 => Exec::F32Avx2,
            F32Kernel::Avx512 => Exec::F32Avx512,
        };
        exec.runs_here().then_some(exec)
    }

    /// Whether this is an f32 pack ([`Self::new_f32`]).
    pub fn is_f32(&self) -> bool {
        self.exec.is_f32()
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }
}

/// `A (m × k, row stride lda) · B` as f32 (m × n) for a bf16 pack, or `None` for an empty A or
/// an f32 pack.
pub fn matmul(a: &[bf16], m: usize, lda: usize, b: &PackedB) -> Option<Vec<f32>> {
    (!b.is_f32()).then(|| run::<false, f32, bf16>(a, m, lda, b))?
}

/// [`matmul`] rounded to bf16 as it is stored (no f32 result is materialised). Rounding is to
/// nearest even; results below bf16's normal range become zero with `vdpbf16ps` (the other
/// kernels keep them).
pub fn matmul_to_bf16(a: &[bf16], m: usize, lda: usize, b: &PackedB) -> Option<Vec<bf16>> {
    (!b.is_f32()).then(|| run::<true, bf16, bf16>(a, m, lda, b))?
}

/// `A (m × k, row stride lda) · B` in f32 for an f32 pack, or `None` for an empty A or a bf16
/// pack.
pub fn matmul_f32(a: &[f32], m: usize, lda: usize, b: &PackedB) -> Option<Vec<f32>> {
    b.is_f32().then(|| run::<false, f32, f32>(a, m, lda, b))?
}

fn run<const BF: bool, O: Copy, A: Copy + Sync>(
    a: &[A],
    m: usize,
    lda: usize,
    b: &PackedB,
) -> Option<Vec<O>> {
    if m == 0 {
        return None;
    }
    let n = b.n;
    // Every element is written exactly once (at the last k-block), so no zeroing.
    let mut out: Vec<std::mem::MaybeUninit<O>> = Vec::with_capacity(m * n);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { out.set_len(m * n) };
    let parallel = m * n * b.k >= 1 << 20;
    // SAFETY: `out` holds m rows of n elements.
    unsafe { run_into::<BF, O, A>(a, m, lda, b, out.as_mut_ptr() as *mut O, n, parallel) };
    // SAFETY: every element was written; MaybeUninit<O> and O share their layout.
    let mut out = std::mem::ManuallyDrop::new(out);
    Some(unsafe { Vec::from_raw_parts(out.as_mut_ptr() as *mut O, m * n, out.capacity()) })
}

/// `out (m rows, ldo apart) = A · B`, every element written once; over rayon's threads when
/// `parallel`, else on the calling thread.
///
/// Work is split into tasks of (up to [`SPAN`] rows, a group of panels). Within a task the
/// k-blocks are the outer loop, then the panels, then the rows: a panel's k-block (32 KiB)
/// stays in L1/L2 while all the span's rows pass, and the span's k-block of A (at most 256
/// KiB) stays in L2 while the group's panels pass, so B is read from memory once per span and
/// A once per group. Partial sums of earlier k-blocks are kept in a per-task scratch of the
/// span's rows by the group's columns (at most [`SCRATCH_BYTES`], which bounds the group).
///
/// # Safety
/// `out` must address `m` rows of `b.n` elements, `ldo` apart, that nothing else accesses
/// during the call.
unsafe fn run_into<const BF: bool, O: Copy, A: Copy + Sync>(
    a: &[A],
    m: usize,
    lda: usize,
    b: &PackedB,
    out: *mut O,
    ldo: usize,
    parallel: bool,
) {
    let (k, n, packed) = (b.k, b.n, &b.data);
    if m == 0 || n == 0 {
        return;
    }
    assert_eq!(std::mem::size_of::<O>(), if BF { 2 } else { 4 });
    assert!(lda >= k && a.len() >= (m - 1) * lda + k, "A is too short");
    assert!(ldo >= n, "output rows overlap");
    // k-steps: pairs for bf16, single k for f32 (a panel's step is 32 u32 either way).
    let kp = if b.is_f32() { k } else { k / 2 };
    let mr_step = b.exec.rows();
    let out_ptr = SendPtr(out as *mut u8);
    let span = SPAN.min(m);
    let spans = m.div_ceil(span);
    let panels = n.div_ceil(NR);
    let multi = kp > KP_BLOCK;
    // At least 4 tasks per thread (a shared machine's threads run at uneven speeds); with
    // several k-blocks, groups small enough for their scratch.
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let mut groups = (4 * threads).div_ceil(spans).min(panels);
    if multi {
        let max_panels = (SCRATCH_BYTES / (span * NR * 4)).max(1);
        groups = groups.max(panels.div_ceil(max_panels));
    }
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let task = |t: usize| {
        let (si, gi) = (t / groups, t % groups);
        let r0 = si * span;
        let rows = span.min(m - r0);
        let pa = gi * per_group;
        let pb = (pa + per_group).min(panels);
        let lds = (pb - pa) * NR;
        // Rows rounded up to 16: the AMX kernel moves whole 16-row tiles through it.
        let mut scratch = if multi {
            vec![0f32; rows.next_multiple_of(16) * lds]
        } else {
            Vec::new()
        };
        for p0 in (0..kp).step_by(KP_BLOCK) {
            let p1 = (p0 + KP_BLOCK).min(kp);
            for pi in pa..pb {
                let panel = &packed[pi * kp * NR..(pi + 1) * kp * NR];
                let j0 = pi * NR;
                let cols = NR.min(n - j0);
                for rb in (0..rows).step_by(mr_step) {
                    let mr = mr_step.min(rows - rb);
                    let a_ptr = a[(r0 + rb) * lda..].as_ptr();
                    let elem = (r0 + rb) * ldo + j0;
                    let sc = if multi {
                        scratch[rb * lds + (pi - pa) * NR..].as_mut_ptr()
                    } else {
                        std::ptr::null_mut()
                    };
                    // SAFETY: a pack exists only for kernels this CPU runs (`Kernels` come
                    // from `cpu_features`, which checked the CPU, and the AMX tile permission
                    // for the AMX kernel); the pointers cover `mr` rows of A (row stride lda,
                    // k-steps p0..p1), of the scratch (stride lds, 32 columns; used only with
                    // several k-blocks) and of the output (stride ldo, `cols` columns), which
                    // no other task writes; the panel holds kp * NR packed steps.
                    unsafe {
                        let o = out_ptr.get().add(elem * std::mem::size_of::<O>());
                        let tile = Tile {
                            scratch: sc,
                            lds,
                            first: p0 == 0,
                            last: p1 == kp,
                            out: o,
                            ldo,
                            cols,
                        };
                        let (pa, pp) = (a_ptr as *const u16, panel.as_ptr());
                        let pf = pp as *const f32;
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (mr, pa, pp, pf, tile);
                        #[cfg(not(target_arch = "x86_64"))]
                        unreachable!("packs exist only on x86-64");
                        #[cfg(target_arch = "x86_64")]
                        match b.exec {
                            Exec::Avx512Bf16 => {
                                by_rows!(mr, kernel::<R, BF>(pa, lda, pp, p0, p1, tile))
                            }
                            Exec::Avx512Widen => {
                                by_rows!(mr, kernel_widen::<R, BF>(pa, lda, pp, p0, p1, tile))
                            }
                            Exec::Avx2Widen => {
                                by_rows!(mr, kernel_widen_avx2::<R, BF>(pa, lda, pp, p0, p1, tile))
                            }
                            Exec::Amx => amx::block::<amx::Hw, BF>(mr, pa, lda, pp, (p0, p1), tile),
                            #[cfg(test)]
                            Exec::AmxEmulated => {
                                amx::block::<amx::Emulated, BF>(mr, pa, lda, pp, (p0, p1), tile)
                            }
                            Exec::F32Avx512 => by_rows!(
                                mr,
                                kernel_f32::<R>(a_ptr as *const f32, lda, pf, p0, p1, tile)
                            ),
                            Exec::F32Avx2 => by_rows!(
                                mr,
                                kernel_f32_avx2::<R>(a_ptr as *const f32, lda, pf, p0, p1, tile)
                            ),
                        }
                    }
                }
            }
        }
    };
    if parallel {
        (0..spans * groups).into_par_iter().for_each(task);
    } else {
        (0..spans * groups).for_each(task);
    }
}

/// 32-column panels of single k (columns past n zero), in parallel when `parallel` and large.
fn pack_f32(
    b: &[f32],
    k: usize,
    n: usize,
    (b_rs, b_cs): (usize, usize),
    parallel: bool,
) -> Vec<u32> {
    let panels = n.div_ceil(NR);
    let mut data = vec![0u32; panels * k * NR];
    let pack_panel = |(pi, dst): (usize, &mut [u32])| {
        let j0 = pi * NR;
        let cols = NR.min(n - j0);
        if b_cs == 1 {
            // Rows of B are contiguous: copy 32-column pieces of them.
            for (kk, d) in dst.chunks_exact_mut(NR).enumerate() {
                let src = &b[kk * b_rs + j0..][..cols];
                for (d, s) in d.iter_mut().zip(src) {
                    *d = s.to_bits();
                }
            }
        } else {
            // Eight k at a time from each column (a transposed B reads them contiguously).
            let (src, d) = (b.as_ptr(), dst.as_mut_ptr());
            assert!(b.len() > (k - 1) * b_rs + (j0 + cols - 1) * b_cs);
            for k0 in (0..k).step_by(8) {
                let k1 = (k0 + 8).min(k);
                for jj in 0..cols {
                    let col = (j0 + jj) * b_cs;
                    for kk in k0..k1 {
                        // SAFETY: kk < k and j0 + jj < n (asserted above); the panel holds
                        // k rows of NR.
                        unsafe { *d.add(kk * NR + jj) = (*src.add(col + kk * b_rs)).to_bits() };
                    }
                }
            }
        }
    };
    if parallel && k * n >= 1 << 16 {
        data.par_chunks_mut(k * NR).enumerate().for_each(pack_panel);
    } else {
        data.chunks_mut(k * NR).enumerate().for_each(pack_panel);
    }
    data
}

/// Products with fewer rows or columns than this go to the caller's general GEMM: under half
/// a 32-column panel the kernel computes mostly zero columns, and with a few rows the pack of B
/// made per call costs more than the product (examples/small_gemm_bench: the LoRA adapter's
/// products with r = 8 columns ran at 0.54-0.61x the `gemm` crate, with r = 8 rows at
/// 0.40-0.68x; those with r = 8 as k at 1.7-3.0x).
pub const THIN: usize = 16;

/// `C = [C +] alpha · A · B` in f32 through the f32 kernel of `kernels`, for an A (m × k) and a
/// B (k × n) of any strides (row, column; in elements) and a C of row stride `c_rs`: B is
/// packed for this call, A copied when its rows are not contiguous. The product is summed in
/// f32 in a fixed order (the same bits on any number of threads), then scaled and added.
/// Returns `false`, with C untouched, where `kernels` have no f32 kernel this CPU runs
/// (portable) or the product is [`THIN`]: the caller uses its general GEMM. `parallel`: over rayon's threads when the
/// product is large, else on the calling thread (callers that split the work themselves).
///
/// These are the small products of attention (per block of 64 query rows) and of the LoRA
/// adapters (rank r), and the f32 input gradient `grad · W`.
///
/// # Safety
/// `a`, `b` and `c` must address the whole matrices their shapes and strides describe; `c`
/// must not overlap `a` or `b`, and nothing else may access it during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    kernels: Kernels,
    c: *mut f32,
    c_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
    accumulate: bool,
    alpha: f32,
    parallel: bool,
) -> bool {
    let Some(exec) = PackedB::f32_exec(kernels) else {
        return false;
    };
    if m < THIN || n < THIN {
        return false;
    }
    let row = |i: usize| std::slice::from_raw_parts_mut(c.add(i * c_rs), n);
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| row(i).fill(0.0));
        }
        return true;
    }
    let parallel = parallel && m * n * k >= 1 << 20;
    // A single row's stride is free; the kernels want it at least a row long.
    let (a_rs, c_rs) = if m == 1 { (k, n) } else { (a_rs, c_rs) };
    let bs = std::slice::from_raw_parts(b, (k - 1) * b_rs + (n - 1) * b_cs + 1);
    let pack = PackedB {
        k,
        n,
        exec,
        data: pack_f32(bs, k, n, (b_rs, b_cs), parallel),
    };
    let copy;
    let (av, lda) = if a_cs == 1 {
        (std::slice::from_raw_parts(a, (m - 1) * a_rs + k), a_rs)
    } else {
        let mut d = vec![0f32; m * k];
        if a_rs < a_cs {
            // Columns of A are contiguous (a transpose): eight rows of the copy at a time.
            let dp = d.as_mut_ptr();
            for i0 in (0..m).step_by(8) {
                let i1 = (i0 + 8).min(m);
                for kk in 0..k {
                    for i in i0..i1 {
                        *dp.add(i * k + kk) = *a.add(i * a_rs + kk * a_cs);
                    }
                }
            }
        } else {
            for (i, dr) in d.chunks_exact_mut(k).enumerate() {
                for (kk, x) in dr.iter_mut().enumerate() {
                    *x = *a.add(i * a_rs + kk * a_cs);
                }
            }
        }
        copy = d;
        (&copy[..], k)
    };
    if !accumulate && alpha == 1.0 {
        run_into::<false, f32, f32>(av, m, lda, &pack, c, c_rs, parallel);
        return true;
    }
    let mut t = vec![0f32; m * n];
    run_into::<false, f32, f32>(av, m, lda, &pack, t.as_mut_ptr(), n, parallel);
    for (i, tr) in t.chunks_exact(n).enumerate() {
        let cr = row(i);
        if accumulate {
            cr.iter_mut().zip(tr).for_each(|(c, &t)| *c += alpha * t);
        } else {
            cr.iter_mut().zip(tr).for_each(|(c, &t)| *c = alpha * t);
        }
    }
    true
}

/// [`gemm_f32`] on slices: `C (m × n, row stride c_rs) = A · B` with `a` and `b` (starting at
/// their first element) of any strides; `false` where `kernels` have no f32 kernel here.
/// Panics when a slice is shorter than its shape and strides.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32_slices(
    kernels: Kernels,
    c: &mut [f32],
    c_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    a_st: (usize, usize),
    b: &[f32],
    b_st: (usize, usize),
    parallel: bool,
) -> bool {
    let end = |(rs, cs): (usize, usize), r: usize, cl: usize| {
        if r == 0 || cl == 0 {
            0
        } else {
            (r - 1) * rs + (cl - 1) * cs + 1
        }
    };
    assert!(a.len() >= end(a_st, m, k), "A is too short for its strides");
    assert!(b.len() >= end(b_st, k, n), "B is too short for its strides");
    assert!(
        c.len() >= end((c_rs, 1), m, n) && (m <= 1 || c_rs >= n),
        "C is too short"
    );
    // SAFETY: the asserts above: each slice covers its matrix; `c` is borrowed mutably, so it
    // overlaps neither `a` nor `b`.
    unsafe {
        gemm_f32(
            kernels,
            c.as_mut_ptr(),
            c_rs,
            (m, n, k),
            a.as_ptr(),
            a_st,
            b.as_ptr(),
            b_st,
            false,
            1.0,
            parallel,
        )
    }
}

/// A pointer that may cross threads: tasks write disjoint elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut u8 {
        self.0
    }
}

/// Where a micro-kernel call reads partial sums from and writes its results to.
#[derive(Clone, Copy)]
struct Tile {
    /// Partial sums of earlier k-blocks (f32), rows `lds` apart.
    scratch: *mut f32,
    lds: usize,
    /// No earlier k-block: start from zero.
    first: bool,
    /// The last k-block: write the output instead of the scratch.
    last: bool,
    /// Output (f32 or bf16), rows `ldo` elements apart.
    out: *mut u8,
    ldo: usize,
    cols: usize,
}

/// f32 → bf16 with the `half` crate's rounding (to nearest even; NaN stays NaN, denormals
/// kept), in a loop the compiler vectorises, in parallel for large inputs.
pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    let chunk = 1 << 16;
    let convert = |(src, dst): (&[f32], &mut [bf16])| {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(round_bf16(s.to_bits()));
        }
    };
    if v.len() < 4 * chunk {
        convert((v, &mut out));
    } else {
        v.par_chunks(chunk)
            .zip(out.par_chunks_mut(chunk))
            .for_each(convert);
    }
    out
}

/// The bf16 bits of an f32's bits, rounded to nearest even (NaN stays a quiet NaN).
#[inline(always)]
pub fn round_bf16(bits: u32) -> u16 {
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        ((bits >> 16) | 0x0040) as u16
    } else {
        (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
    }
}

/// Panels of 32 columns; in each, for every k-pair p, 32 lanes of (B[2p, j], B[2p+1, j]).
/// Columns past n are zero.
fn pack_b(b: &[bf16], k: usize, n: usize, b_rs: usize, b_cs: usize) -> Vec<u32> {
    let kp = k / 2;
    let panels = n.div_ceil(NR);
    let mut out = vec![0u32; panels * kp * NR];
    let pack_panel = |(pi, dst): (usize, &mut [u32])| {
        let j0 = pi * NR;
        let cols = NR.min(n - j0);
        let bits = |v: &bf16| v.to_bits() as u32;
        if b_cs == 1 {
            // Rows 2p and 2p + 1 of B are contiguous: interleave them.
            for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
                let r0 = &b[2 * p * b_rs + j0..][..cols];
                let r1 = &b[(2 * p + 1) * b_rs + j0..][..cols];
                for ((d, lo), hi) in d.iter_mut().zip(r0).zip(r1) {
                    *d = bits(lo) | (bits(hi) << 16);
                }
            }
        } else if b_rs == 1 {
            // Column j of B is contiguous: its k-pairs are adjacent.
            for jj in 0..cols {
                let col = &b[(j0 + jj) * b_cs..][..2 * kp];
                for (p, pair) in col.chunks_exact(2).enumerate() {
                    dst[p * NR + jj] = bits(&pair[0]) | (bits(&pair[1]) << 16);
                }
            }
        } else {
            for jj in 0..cols {
                let col = (j0 + jj) * b_cs;
                for p in 0..kp {
                    let lo = bits(&b[col + 2 * p * b_rs]);
                    let hi = bits(&b[col + (2 * p + 1) * b_rs]);
                    dst[p * NR + jj] = lo | (hi << 16);
                }
            }
        }
    };
    if kp * n < 1 << 16 {
        out.chunks_mut(kp * NR).enumerate().for_each(pack_panel);
    } else {
        out.par_chunks_mut(kp * NR).enumerate().for_each(pack_panel);
    }
    out
}

/// `tile[0..R, 0..cols] (+)= A[0..R, pairs p0..p1] · panel[p0..p1]`, accumulators in
/// registers; partial sums go through the scratch tile, the last k-block writes the output.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn kernel<const R: usize, const BF: bool>(
    a: *const u16,
    lda: usize,
    panel: *const u32,
    p0: usize,
    p1: usize,
    tile: Tile,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in p0..p1 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR) as *const _));
        let b1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16) as *const _));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let pair = (a.add(r * lda + 2 * p) as *const i32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
            acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
        }
    }
    store_tile::<R, BF, true>(&mut acc, tile);
}

/// [`kernel`] for an AVX-512 CPU without AVX512-BF16: each bf16 pair is widened to two f32
/// (a shift and a mask: bf16 is the top half of an f32) and multiplied with two FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_widen<const R: usize, const BF: bool>(
    a: *const u16,
    lda: usize,
    panel: *const u32,
    p0: usize,
    p1: usize,
    tile: Tile,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for p in p0..p1 {
        let v0 = _mm512_loadu_si512(panel.add(p * NR) as *const _);
        let v1 = _mm512_loadu_si512(panel.add(p * NR + 16) as *const _);
        let b0l = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0));
        let b0h = _mm512_castsi512_ps(_mm512_and_si512(v0, hi));
        let b1l = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1));
        let b1h = _mm512_castsi512_ps(_mm512_and_si512(v1, hi));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let pair = (a.add(r * lda + 2 * p) as *const u32).read_unaligned();
            let al = _mm512_set1_ps(f32::from_bits(pair << 16));
            let ah = _mm512_set1_ps(f32::from_bits(pair & 0xffff_0000));
            acc_r[0] = _mm512_fmadd_ps(ah, b0h, _mm512_fmadd_ps(al, b0l, acc_r[0]));
            acc_r[1] = _mm512_fmadd_ps(ah, b1h, _mm512_fmadd_ps(al, b1l, acc_r[1]));
        }
    }
    store_tile::<R, BF, false>(&mut acc, tile);
}

/// Adds earlier k-blocks' partial sums from the scratch tile, then keeps the sums there (not
/// the last k-block) or writes them to the output as f32 or (`BF`) rounded to bf16: with
/// `vcvtneps2bf16` (`NATIVE`, only from the AVX512-BF16 kernel) or in scalar code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const R: usize, const BF: bool, const NATIVE: bool>(
    acc: &mut [[std::arch::x86_64::__m512; 2]; R],
    tile: Tile,
) {
    use std::arch::x86_64::*;
    let cols = tile.cols;
    let m0: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as u16
    };
    let m1: __mmask16 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as u16
    } else {
        0
    };
    for (r, acc_r) in acc.iter_mut().enumerate() {
        let sc = tile.scratch.add(r * tile.lds);
        if !tile.first {
            acc_r[0] = _mm512_add_ps(acc_r[0], _mm512_loadu_ps(sc));
            acc_r[1] = _mm512_add_ps(acc_r[1], _mm512_loadu_ps(sc.add(16)));
        }
        if !tile.last {
            _mm512_storeu_ps(sc, acc_r[0]);
            _mm512_storeu_ps(sc.add(16), acc_r[1]);
        } else if BF && NATIVE {
            store_bf16_row((tile.out as *mut u16).add(r * tile.ldo), acc_r, (m0, m1));
        } else if BF {
            let mut v = [0f32; NR];
            _mm512_storeu_ps(v.as_mut_ptr(), acc_r[0]);
            _mm512_storeu_ps(v.as_mut_ptr().add(16), acc_r[1]);
            let row = (tile.out as *mut u16).add(r * tile.ldo);
            for (j, x) in v[..cols].iter().enumerate() {
                *row.add(j) = round_bf16(x.to_bits());
            }
        } else {
            let row = (tile.out as *mut f32).add(r * tile.ldo);
            _mm512_mask_storeu_ps(row, m0, acc_r[0]);
            if m1 != 0 {
                _mm512_mask_storeu_ps(row.add(16), m1, acc_r[1]);
            }
        }
    }
}

/// One output row of the bf16 kernel: 32 sums rounded to bf16, masked to the tile's columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[inline]
unsafe fn store_bf16_row(
    row: *mut u16,
    acc: &[std::arch::x86_64::__m512; 2],
    (m0, m1): (u16, u16),
) {
    use std::arch::x86_64::*;
    let h0: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(acc[0]));
    _mm256_mask_storeu_epi16(row as *mut _, m0, h0);
    if m1 != 0 {
        let h1: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(acc[1]));
        _mm256_mask_storeu_epi16(row.add(16) as *mut _, m1, h1);
    }
}

/// The f32 twin of [`kernel`]: `tile (+)= A[0..R, p0..p1] · panel[p0..p1]` with one FMA per
/// (row, 16 columns, k).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_f32<const R: usize>(
    a: *const f32,
    lda: usize,
    panel: *const f32,
    p0: usize,
    p1: usize,
    tile: Tile,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in p0..p1 {
        let b0 = _mm512_loadu_ps(panel.add(p * NR));
        let b1 = _mm512_loadu_ps(panel.add(p * NR + 16));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * lda + p));
            acc_r[0] = _mm512_fmadd_ps(av, b0, acc_r[0]);
            acc_r[1] = _mm512_fmadd_ps(av, b1, acc_r[1]);
        }
    }
    store_tile::<R, false, false>(&mut acc, tile);
}

/// The AVX2 f32 kernel: a 32-column panel in two halves of 16 columns (two 8-lane
/// accumulators per row; at most 6 rows keep the 12 accumulators, 2 B vectors and the
/// broadcast A in the 16 registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_f32_avx2<const R: usize>(
    a: *const f32,
    lda: usize,
    panel: *const f32,
    p0: usize,
    p1: usize,
    tile: Tile,
) {
    use std::arch::x86_64::*;
    for half in 0..2 {
        if half * 16 >= tile.cols {
            break;
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let panel = panel.add(half * 16);
        for p in p0..p1 {
            let b0 = _mm256_loadu_ps(panel.add(p * NR));
            let b1 = _mm256_loadu_ps(panel.add(p * NR + 8));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(r * lda + p));
                acc_r[0] = _mm256_fmadd_ps(av, b0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(av, b1, acc_r[1]);
            }
        }
        store_half_avx2::<R, false>(&acc, tile, half);
    }
}

/// The AVX2 bf16 kernel: pairs widened to f32 as in [`kernel_widen`], 16 columns at a time, at
/// most 4 rows (8 accumulators, 4 widened B vectors, 2 broadcasts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_widen_avx2<const R: usize, const BF: bool>(
    a: *const u16,
    lda: usize,
    panel: *const u32,
    p0: usize,
    p1: usize,
    tile: Tile,
) {
    use std::arch::x86_64::*;
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    for half in 0..2 {
        if half * 16 >= tile.cols {
            break;
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let panel = panel.add(half * 16);
        for p in p0..p1 {
            let v0 = _mm256_loadu_si256(panel.add(p * NR) as *const _);
            let v1 = _mm256_loadu_si256(panel.add(p * NR + 8) as *const _);
            let b0l = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v0));
            let b0h = _mm256_castsi256_ps(_mm256_and_si256(v0, hi));
            let b1l = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v1));
            let b1h = _mm256_castsi256_ps(_mm256_and_si256(v1, hi));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let pair = (a.add(r * lda + 2 * p) as *const u32).read_unaligned();
                let al = _mm256_set1_ps(f32::from_bits(pair << 16));
                let ah = _mm256_set1_ps(f32::from_bits(pair & 0xffff_0000));
                acc_r[0] = _mm256_fmadd_ps(ah, b0h, _mm256_fmadd_ps(al, b0l, acc_r[0]));
                acc_r[1] = _mm256_fmadd_ps(ah, b1h, _mm256_fmadd_ps(al, b1l, acc_r[1]));
            }
        }
        store_half_avx2::<R, BF>(&acc, tile, half);
    }
}

/// [`store_tile`] for one 16-column half of the AVX2 kernels' tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store_half_avx2<const R: usize, const BF: bool>(
    acc: &[[std::arch::x86_64::__m256; 2]; R],
    tile: Tile,
    half: usize,
) {
    use std::arch::x86_64::*;
    let c0 = half * 16;
    let cols = (tile.cols - c0).min(16);
    for (r, acc_r) in acc.iter().enumerate() {
        let sc = tile.scratch.add(r * tile.lds + c0);
        let (mut x0, mut x1) = (acc_r[0], acc_r[1]);
        if !tile.first {
            x0 = _mm256_add_ps(x0, _mm256_loadu_ps(sc));
            x1 = _mm256_add_ps(x1, _mm256_loadu_ps(sc.add(8)));
        }
        if !tile.last {
            _mm256_storeu_ps(sc, x0);
            _mm256_storeu_ps(sc.add(8), x1);
            continue;
        }
        if !BF && cols == 16 {
            let row = (tile.out as *mut f32).add(r * tile.ldo + c0);
            _mm256_storeu_ps(row, x0);
            _mm256_storeu_ps(row.add(8), x1);
            continue;
        }
        let mut v = [0f32; 16];
        _mm256_storeu_ps(v.as_mut_ptr(), x0);
        _mm256_storeu_ps(v.as_mut_ptr().add(8), x1);
        if BF {
            let row = (tile.out as *mut u16).add(r * tile.ldo + c0);
            for (j, x) in v[..cols].iter().enumerate() {
                *row.add(j) = round_bf16(x.to_bits());
            }
        } else {
            let row = (tile.out as *mut f32).add(r * tile.ldo + c0);
            std::ptr::copy_nonoverlapping(v.as_ptr(), row, cols);
        }
    }
}

/// The AMX-BF16 kernel: 16 rows × 32 columns per call, in two C tiles of 16 × 16 f32; per 16
/// k-pairs one A tile (16 rows × 16 pairs, loaded straight from A) and two B tiles (16 pairs ×
/// 16 columns, loaded straight from the packed panel: a panel's 32-column rows are the VNNI
/// layout `tdpbf16ps` reads). Row and k tails go through zero-padded copies; partial sums of
/// earlier k-blocks are loaded into the C tiles from the scratch tile.
mod amx {
    use super::{round_bf16, Tile, NR};

    /// The tile instructions used, as methods on the tile state.
    pub(super) trait Tiles {
        /// `ldtilecfg`: every later instruction uses this configuration.
        unsafe fn start(cfg: &[u8; 64]) -> Self;
        unsafe fn zero<const T: u8>(&mut self);
        unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize);
        unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize);
        /// `tdpbf16ps tmm{C}, tmm{A}, tmm{B}`.
        unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self);
        unsafe fn release(self);
    }

    /// The CPU's tiles (`asm!`; the permission was asked by `cpu_features` before any pack for
    /// this kernel was made).
    pub(super) struct Hw;

    #[cfg(target_arch = "x86_64")]
    impl Tiles for Hw {
        unsafe fn start(cfg: &[u8; 64]) -> Self {
            std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly));
            Hw
        }
        unsafe fn zero<const T: u8>(&mut self) {
            std::arch::asm!("tilezero tmm{t}", t = const T, options(nostack, nomem));
        }
        unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize) {
            std::arch::asm!(
                "tileloadd tmm{t}, [{p} + {s} * 1]",
                t = const T,
                p = in(reg) p,
                s = in(reg) stride,
                options(nostack, readonly)
            );
        }
        unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize) {
            std::arch::asm!(
                "tilestored [{p} + {s} * 1], tmm{t}",
                t = const T,
                p = in(reg) p,
                s = in(reg) stride,
                options(nostack)
            );
        }
        unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self) {
            std::arch::asm!(
                "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
                c = const C,
                a = const A,
                b = const B,
                options(nostack, nomem)
            );
        }
        unsafe fn release(self) {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    impl Tiles for Hw {
        unsafe fn start(_: &[u8; 64]) -> Self {
            unreachable!("AMX exists only on x86-64")
        }
        unsafe fn zero<const T: u8>(&mut self) {}
        unsafe fn load<const T: u8>(&mut self, _: *const u8, _: usize) {}
        unsafe fn store<const T: u8>(&mut self, _: *mut u8, _: usize) {}
        unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self) {}
        unsafe fn release(self) {}
    }

    /// The tile instructions in plain code, from Intel's description: 8 tiles of up to 16 rows
    /// of 64 bytes, shaped by the configuration; `tdpbf16ps` checks the shapes agree as the
    /// CPU does (it faults otherwise).
    #[cfg(test)]
    pub(super) struct Emulated {
        rows: [usize; 8],
        colsb: [usize; 8],
        t: Box<[[u8; 1024]; 8]>,
    }

    #[cfg(test)]
    impl Tiles for Emulated {
        unsafe fn start(cfg: &[u8; 64]) -> Self {
            assert_eq!(cfg[0], 1, "palette 1");
            let mut e = Emulated {
                rows: [0; 8],
                colsb: [0; 8],
                t: Box::new([[0; 1024]; 8]),
            };
            for i in 0..8 {
                e.colsb[i] = u16::from_le_bytes([cfg[16 + 2 * i], cfg[17 + 2 * i]]) as usize;
                e.rows[i] = cfg[48 + i] as usize;
                assert!(e.rows[i] <= 16 && e.colsb[i] <= 64, "tile {i} too large");
            }
            e
        }
        unsafe fn zero<const T: u8>(&mut self) {
            self.t[T as usize] = [0; 1024];
        }
        unsafe fn load<const T: u8>(&mut self, p: *const u8, stride: usize) {
            let (rows, cb) = (self.rows[T as usize], self.colsb[T as usize]);
            assert!(rows > 0, "tile {T} is not configured");
            for r in 0..rows {
                let src = std::slice::from_raw_parts(p.add(r * stride), cb);
                self.t[T as usize][r * 64..r * 64 + cb].copy_from_slice(src);
            }
        }
        unsafe fn store<const T: u8>(&mut self, p: *mut u8, stride: usize) {
            let (rows, cb) = (self.rows[T as usize], self.colsb[T as usize]);
            for r in 0..rows {
                let dst = std::slice::from_raw_parts_mut(p.add(r * stride), cb);
                dst.copy_from_slice(&self.t[T as usize][r * 64..r * 64 + cb]);
            }
        }
        unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self) {
            let (c, a, b) = (C as usize, A as usize, B as usize);
            let (m, kp, n) = (self.rows[c], self.colsb[a] / 4, self.colsb[c] / 4);
            assert!(
                self.rows[a] == m && self.rows[b] == kp && self.colsb[b] == n * 4,
                "tdpbf16ps: tile shapes disagree"
            );
            let word = |t: usize, r: usize, i: usize| {
                let o = r * 64 + 2 * i;
                let bits = u16::from_le_bytes([self.t[t][o], self.t[t][o + 1]]);
                f32::from_bits((bits as u32) << 16)
            };
            let mut out = self.t[c];
            for i in 0..m {
                for j in 0..n {
                    let o = i * 64 + 4 * j;
                    let mut acc = f32::from_le_bytes(out[o..o + 4].try_into().expect("4"));
                    for p in 0..kp {
                        acc += word(a, i, 2 * p + 1) * word(b, p, 2 * j + 1)
                            + word(a, i, 2 * p) * word(b, p, 2 * j);
                    }
                    out[o..o + 4].copy_from_slice(&acc.to_le_bytes());
                }
            }
            self.t[c] = out;
        }
        unsafe fn release(self) {}
    }

    /// `tile (+)= A[0..mr, pairs p0..p1] · panel[p0..p1]` for `mr` <= 16 rows.
    pub(super) unsafe fn block<T: Tiles, const BF: bool>(
        mr: usize,
        a: *const u16,
        lda: usize,
        panel: *const u32,
        (p0, p1): (usize, usize),
        tile: Tile,
    ) {
        // Tiles 0, 1: C (16 rows x 16 f32); 2: A (16 rows x 16 pairs); 3, 4: B (16 pairs x
        // 16 columns of pairs). Every tile 16 rows of 64 bytes.
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..5 {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            cfg[48 + t] = 16;
        }
        let row_b = NR * 4;
        let mut tl = T::start(&cfg);
        let sc = tile.scratch as *mut u8;
        if tile.first {
            tl.zero::<0>();
            tl.zero::<1>();
        } else {
            tl.load::<0>(sc, tile.lds * 4);
            tl.load::<1>(sc.add(64), tile.lds * 4);
        }
        let mut abuf = [0u16; 16 * 32];
        let mut bbuf = [0u32; 16 * NR];
        let mut q = p0;
        while q < p1 {
            let np = (p1 - q).min(16);
            if mr == 16 && np == 16 {
                tl.load::<2>(a.add(2 * q) as *const u8, lda * 2);
            } else {
                abuf.fill(0);
                for r in 0..mr {
                    let src = std::slice::from_raw_parts(a.add(r * lda + 2 * q), 2 * np);
                    abuf[r * 32..r * 32 + 2 * np].copy_from_slice(src);
                }
                tl.load::<2>(abuf.as_ptr() as *const u8, 64);
            }
            let bp = if np == 16 {
                panel.add(q * NR)
            } else {
                bbuf.fill(0);
                let src = std::slice::from_raw_parts(panel.add(q * NR), np * NR);
                bbuf[..np * NR].copy_from_slice(src);
                bbuf.as_ptr()
            };
            tl.load::<3>(bp as *const u8, row_b);
            tl.load::<4>((bp as *const u8).add(64), row_b);
            tl.dp::<0, 2, 3>();
            tl.dp::<1, 2, 4>();
            q += np;
        }
        if !tile.last {
            tl.store::<0>(sc, tile.lds * 4);
            tl.store::<1>(sc.add(64), tile.lds * 4);
            tl.release();
            return;
        }
        let mut cbuf = [0f32; 16 * NR];
        tl.store::<0>(cbuf.as_mut_ptr() as *mut u8, row_b);
        tl.store::<1>((cbuf.as_mut_ptr() as *mut u8).add(64), row_b);
        tl.release();
        for r in 0..mr {
            let src = &cbuf[r * NR..r * NR + tile.cols];
            if BF {
                let row = (tile.out as *mut u16).add(r * tile.ldo);
                for (j, x) in src.iter().enumerate() {
                    *row.add(j) = round_bf16(x.to_bits());
                }
            } else {
                let row = (tile.out as *mut f32).add(r * tile.ldo);
                std::ptr::copy_nonoverlapping(src.as_ptr(), row, tile.cols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_features::{features, Features};
    use rand::{Rng, SeedableRng};

    /// Every bf16 kernel this CPU runs, with the AMX tiling through the emulated tiles (on any
    /// CPU) and through the CPU's tiles where it has them.
    fn bf16_execs(f: &Features) -> Vec<Exec> {
        let mut v = vec![Exec::AmxEmulated];
        for e in [
            Exec::Avx2Widen,
            Exec::Avx512Widen,
            Exec::Avx512Bf16,
            Exec::Amx,
        ] {
            if e.runs_here() {
                v.push(e);
            }
        }
        if f.avx512bf16 {
            assert!(v.contains(&Exec::Avx512Bf16), "AVX512-BF16 left untested");
        }
        v
    }

    fn f32_execs() -> Vec<Exec> {
        [Exec::F32Avx2, Exec::F32Avx512]
            .into_iter()
            .filter(|e| e.runs_here())
            .collect()
    }

    /// f64 products of bf16 or f32 values: `A (m × k) · B[kk, j] = b[kk * rs + j * cs]`.
    fn reference<T: Copy + Into<f64>>(
        a: &[T],
        (m, k, n): (usize, usize, usize),
        b: &[T],
        (rs, cs): (usize, usize),
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|kk| a[i * k + kk].into() * b[kk * rs + j * cs].into())
                    .sum();
            }
        }
        c
    }

    /// Shapes with row tails for every kernel's row step (1-16), column tails of 16 and 32,
    /// k over 512 (several k-blocks: partial sums through the scratch tile) and k-pair tails
    /// of the AMX tile's 16, and the linears' shapes: SmolLM2's x W^T (576 -> 192, LoRA's
    /// rank 8 products, the backward's grad · W (192 -> 576).
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 2, 1),
        (9, 6, 33),
        (17, 34, 16),
        (70, 1030, 45),
        (131, 64, 96),
        (5, 576, 8),
        (37, 8, 576),
        (64, 576, 192),
        (33, 192, 576),
        (3, 600, 17),
        // Two row spans (the second short), several k-blocks and panel groups: partial sums
        // in a scratch wider than one panel.
        (300, 1100, 200),
    ];

    #[test]
    fn gemm_bf16_every_kernel_matches_f64_reference_on_odd_shapes() {
        let f = features();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for exec in bf16_execs(&f) {
            for &(m, k, n) in SHAPES {
                let a: Vec<bf16> = (0..m * k)
                    .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                    .collect();
                let b: Vec<bf16> = (0..k * n)
                    .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                    .collect();
                // B row-major (k × n), then the same values seen as the transpose of (n × k).
                let bt: Vec<bf16> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                for (bb, rs, cs) in [(&b, n, 1), (&bt, 1, k)] {
                    let packed = PackedB::new_exec(bb, k, n, (rs, cs), exec).unwrap();
                    let got = matmul(&a, m, k, &packed).unwrap();
                    let want = reference(&a, (m, k, n), bb, (rs, cs));
                    let got_bf = matmul_to_bf16(&a, m, k, &packed).unwrap();
                    for (h, g) in got_bf.iter().zip(&got) {
                        assert_eq!(
                            h.to_bits(),
                            bf16::from_f32(*g).to_bits(),
                            "{exec:?}: bf16 output of {g}"
                        );
                    }
                    let scale = want.iter().fold(1f64, |x, v| x.max(v.abs()));
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5 * scale * (k as f64).sqrt(),
                            "{exec:?} ({m}, {k}, {n}): {g} vs {w}"
                        );
                    }
                }
            }
        }
        let k = Kernels::for_path(crate::cpu_features::Path::Avx512, &f);
        if let Ok(k) = k {
            assert!(PackedB::new(&[bf16::ONE; 3], 3, 1, 1, 1, k).is_none());
        }
    }

    #[test]
    fn gemm_f32_every_kernel_matches_f64_reference_on_odd_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let execs = f32_execs();
        if features().avx2_fma {
            assert!(execs.contains(&Exec::F32Avx2), "AVX2 left untested");
        }
        for exec in execs {
            for &(m, k, n) in SHAPES.iter().chain(&[(1, 1, 1), (9, 7, 33), (3, 576, 17)]) {
                let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                for (bb, rs, cs) in [(&b, n, 1), (&bt, 1, k)] {
                    let kernels = Kernels {
                        f32: if exec == Exec::F32Avx2 {
                            F32Kernel::Avx2
                        } else {
                            F32Kernel::Avx512
                        },
                        bf16: Bf16Kernel::Portable,
                    };
                    let packed = PackedB::new_f32(bb, k, n, rs, cs, kernels).unwrap();
                    assert_eq!(packed.exec, exec);
                    assert!(packed.is_f32());
                    // An f32 pack never serves the bf16 entry points, nor the reverse.
                    assert!(matmul(&[bf16::ONE; 4096], 1, k, &packed).is_none());
                    let got = matmul_f32(&a, m, k, &packed).unwrap();
                    let want = reference(&a, (m, k, n), bb, (rs, cs));
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5 * (k as f64).sqrt(),
                            "{exec:?} ({m}, {k}, {n}) at {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
        let bfp = PackedB::new_exec(&[bf16::ONE; 4], 2, 2, (2, 1), Exec::AmxEmulated).unwrap();
        assert!(matmul_f32(&[1.0; 2], 1, 2, &bfp).is_none());
        assert!(PackedB::new_f32(&[1.0; 4], 2, 2, 2, 1, Kernels::PORTABLE).is_none());
        assert!(PackedB::new(&[bf16::ONE; 4], 2, 2, 2, 1, Kernels::PORTABLE).is_none());
    }

    /// `gemm_f32` (the attention and adapter products, the f32 input gradient) with each f32
    /// kernel this CPU runs: A and B row-major, transposed or with padded rows, C with padded
    /// rows (the padding left untouched), overwritten or accumulated, scaled or not, on the
    /// calling thread or in parallel (the same bits), against an f64 reference; the portable
    /// kernels and the thin products leave C untouched and say so.
    #[test]
    fn gemm_f32_strided_every_kernel_matches_f64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let mut kernels: Vec<Kernels> = f32_execs()
            .into_iter()
            .map(|e| Kernels {
                f32: if e == Exec::F32Avx2 {
                    F32Kernel::Avx2
                } else {
                    F32Kernel::Avx512
                },
                bf16: Bf16Kernel::Portable,
            })
            .collect();
        if features().avx2_fma {
            assert!(!kernels.is_empty(), "AVX2 left untested");
        }
        kernels.push(Kernels::PORTABLE);
        // Attention's block shapes (64 query rows, head size 64, keys 1-256), the adapters'
        // (rank 8), tails of every kernel's rows and of the 32-column panels, k over several
        // blocks with two row spans.
        let shapes: &[(usize, usize, usize)] = &[
            (1, 1, 1),
            (1, 9, 40),
            (64, 64, 1),
            (16, 5, 16),
            (64, 64, 137),
            (137, 64, 40),
            (64, 137, 64),
            (17, 300, 70),
            (270, 8, 33),
            (300, 700, 45),
        ];
        for &(m, k, n) in shapes {
            let rand = |len: usize, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            // A (m × k): row-major with 3 padding columns, and transposed.
            let a_pad = rand(m * (k + 3), &mut rng);
            let a_t: Vec<f32> = (0..k * m)
                .map(|i| a_pad[(i % m) * (k + 3) + i / m])
                .collect();
            // B (k × n): row-major with 5 padding columns, and transposed.
            let b_pad = rand(k * (n + 5), &mut rng);
            let b_t: Vec<f32> = (0..n * k)
                .map(|i| b_pad[(i % k) * (n + 5) + i / k])
                .collect();
            let a_at = |i: usize, kk: usize| a_pad[i * (k + 3) + kk] as f64;
            let b_at = |kk: usize, j: usize| b_pad[kk * (n + 5) + j] as f64;
            let c_rs = n + 2;
            let c0 = rand(m * c_rs, &mut rng);
            for &kern in &kernels {
                let portable = kern == Kernels::PORTABLE;
                for (av, a_st) in [(&a_pad, (k + 3, 1)), (&a_t, (1, m))] {
                    for (bv, b_st) in [(&b_pad, (n + 5, 1)), (&b_t, (1, k))] {
                        for (accumulate, alpha) in
                            [(false, 1.0f32), (true, 1.0), (false, 0.3), (true, -0.7)]
                        {
                            let mut runs = Vec::new();
                            for parallel in [false, true] {
                                let mut c = c0.clone();
                                // SAFETY: every matrix lies within its vector.
                                let done = unsafe {
                                    gemm_f32(
                                        kern,
                                        c.as_mut_ptr(),
                                        c_rs,
                                        (m, n, k),
                                        av.as_ptr(),
                                        a_st,
                                        bv.as_ptr(),
                                        b_st,
                                        accumulate,
                                        alpha,
                                        parallel,
                                    )
                                };
                                let thin = m < THIN || n < THIN;
                                assert_eq!(done, !portable && !thin, "{kern:?} ({m}, {k}, {n})");
                                runs.push(c);
                            }
                            let c = &runs[0];
                            assert_eq!(
                                c.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                                runs[1].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                                "{kern:?} ({m}, {k}, {n}): threads changed the bits"
                            );
                            for i in 0..m {
                                for j in 0..c_rs {
                                    let (got, before) = (c[i * c_rs + j], c0[i * c_rs + j]);
                                    if j >= n || portable || m < THIN || n < THIN {
                                        assert_eq!(got, before, "{kern:?} wrote C[{i}, {j}]");
                                        continue;
                                    }
                                    let dot: f64 = (0..k).map(|kk| a_at(i, kk) * b_at(kk, j)).sum();
                                    let want = alpha as f64 * dot
                                        + if accumulate { before as f64 } else { 0.0 };
                                    assert!(
                                        (got as f64 - want).abs() < 1e-5 * (k as f64).sqrt() + 1e-6,
                                        "{kern:?} ({m}, {k}, {n}) A {a_st:?} B {b_st:?} acc \
                                         {accumulate} alpha {alpha}: C[{i}, {j}] {got} vs {want}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A kernel this CPU lacks is never packed for, whatever `Kernels` a caller builds.
    #[test]
    fn packs_refuse_kernels_this_cpu_lacks() {
        let f = features();
        let amx = Kernels {
            f32: F32Kernel::Avx512,
            bf16: Bf16Kernel::Amx,
        };
        let p = PackedB::new(&[bf16::ONE; 4], 2, 2, 2, 1, amx);
        assert_eq!(
            p.is_some(),
            f.amx_bf16 && crate::cpu_features::tile_permission().is_ok()
        );
        let avx512 = Kernels {
            f32: F32Kernel::Avx512,
            bf16: Bf16Kernel::Avx512Bf16,
        };
        assert_eq!(
            PackedB::new(&[bf16::ONE; 4], 2, 2, 2, 1, avx512).is_some(),
            f.avx512bf16
        );
        assert_eq!(
            PackedB::new_f32(&[1.0; 4], 2, 2, 2, 1, avx512).is_some(),
            f.avx512f
        );
    }

    #[test]
    fn to_bf16_rounds_like_half() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut v: Vec<f32> = (0..300_000)
            .map(|_| f32::from_bits(rng.random::<u32>()))
            .filter(|x| !x.is_nan())
            .collect();
        v.extend([
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0039062,
            3.4e38,
            1e-40,
        ]);
        let got = to_bf16(&v);
        for (g, x) in got.iter().zip(&v) {
            assert_eq!(g.to_bits(), bf16::from_f32(*x).to_bits(), "{x:e}");
        }
        assert!(to_bf16(&[f32::NAN])[0].is_nan());
        assert_eq!(
            to_bf16(&[f32::NAN])[0].to_bits(),
            bf16::from_f32(f32::NAN).to_bits()
        );
    }
}
