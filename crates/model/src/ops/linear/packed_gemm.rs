//! Matrix products against a packed B on x86-64 CPUs with AVX-512, for the linear layers:
//! - bf16 × bf16 → f32 with AVX512-BF16 (`vdpbf16ps`): twice the multiply throughput of f32 FMA
//!   on such CPUs, where candle widens bf16 to f32 and runs an f32 GEMM;
//! - f32 × f32 → f32 with AVX-512 FMA, for frozen f32 weights packed once: the general GEMM
//!   candle calls packs both operands on every call, which at the few rows of a decoding step
//!   took as long as the multiply-adds.
//!
//! `C (m × n) = A (m × k) · B (k × n)`: A is row-major with contiguous rows (an activation), B
//! is any strided matrix (a weight or its transpose), packed by [`PackedB::new`] (bf16: 32-column
//! panels of k-pairs, the layout `vdpbf16ps` consumes) or [`PackedB::new_f32`] (32-column panels
//! of single k). Products of bf16 values are exact in f32; sums are accumulated in f32, as
//! PyTorch does. Where the CPU lacks the instructions (or for odd `k` in bf16) the constructors
//! return `None` and the caller falls back to candle.
use half::bf16;
use rayon::prelude::*;

/// Columns per packed panel: two 16-lane registers.
const NR: usize = 32;
/// Rows per micro-kernel call.
const MR: usize = 8;
/// k-pairs per block (k = 512): a packed panel block is 32 KiB.
const KP_BLOCK: usize = 256;
/// Rows per parallel task.
const MC: usize = 64;

/// Whether this CPU runs the bf16 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| available_f32() && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the f32 kernel.
pub fn available_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What a packed panel holds per k-step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// 32 lanes of (B[2p, j], B[2p + 1, j]) bf16 pairs per k-pair p.
    Bf16Pairs,
    /// 32 lanes of B[kk, j] as f32 bits per kk.
    F32,
}

/// B packed into 32-column panels; a frozen weight is packed once and kept (see
/// `ops::WeightPack`), other operands per product.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    kind: Kind,
    data: Vec<u32>,
}

impl PackedB {
    /// `B[kk, j] = b[kk * b_rs + j * b_cs]` (k × n) packed for the bf16 kernel, or `None` when
    /// it cannot run here (no AVX512-BF16, odd or zero `k`, zero `n`).
    pub fn new(b: &[bf16], k: usize, n: usize, b_rs: usize, b_cs: usize) -> Option<Self> {
        if !available() || !k.is_multiple_of(2) || n == 0 || k == 0 {
            return None;
        }
        assert!(
            b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
            "B is too short for its strides"
        );
        Some(Self {
            k,
            n,
            kind: Kind::Bf16Pairs,
            data: pack_b(b, k, n, b_rs, b_cs),
        })
    }

    /// The f32 kernel's packing of `B[kk, j] = b[kk * b_rs + j * b_cs]`, or `None` when it
    /// cannot run here (no AVX-512, zero `k` or `n`).
    pub fn new_f32(b: &[f32], k: usize, n: usize, b_rs: usize, b_cs: usize) -> Option<Self> {
        if !available_f32() || n == 0 || k == 0 {
            return None;
        }
        assert!(
            b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
            "B is too short for its strides"
        );
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k * NR];
        let pack_panel = |(pi, dst): (usize, &mut [u32])| {
            let j0 = pi * NR;
            for jj in 0..NR.min(n - j0) {
                let col = (j0 + jj) * b_cs;
                for kk in 0..k {
                    dst[kk * NR + jj] = b[col + kk * b_rs].to_bits();
                }
            }
        };
        data.par_chunks_mut(k * NR).enumerate().for_each(pack_panel);
        Some(Self {
            k,
            n,
            kind: Kind::F32,
            data,
        })
    }

    /// Whether this is an f32 pack ([`Self::new_f32`]).
    pub fn is_f32(&self) -> bool {
        self.kind == Kind::F32
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
    (b.kind == Kind::Bf16Pairs).then(|| run::<false, f32, bf16>(a, m, lda, b))?
}

/// [`matmul`] rounded to bf16 as it is stored (no f32 result is materialised). Rounding is to
/// nearest even; results below bf16's normal range become zero.
pub fn matmul_to_bf16(a: &[bf16], m: usize, lda: usize, b: &PackedB) -> Option<Vec<bf16>> {
    (b.kind == Kind::Bf16Pairs).then(|| run::<true, bf16, bf16>(a, m, lda, b))?
}

/// `A (m × k, row stride lda) · B` in f32 for an f32 pack, or `None` for an empty A or a bf16
/// pack.
pub fn matmul_f32(a: &[f32], m: usize, lda: usize, b: &PackedB) -> Option<Vec<f32>> {
    (b.kind == Kind::F32).then(|| run::<false, f32, f32>(a, m, lda, b))?
}

fn run<const BF: bool, O: Copy, A: Copy + Sync>(
    a: &[A],
    m: usize,
    lda: usize,
    b: &PackedB,
) -> Option<Vec<O>> {
    let (k, n, packed) = (b.k, b.n, &b.data);
    if m == 0 {
        return None;
    }
    assert_eq!(std::mem::size_of::<O>(), if BF { 2 } else { 4 });
    assert!(lda >= k && a.len() >= (m - 1) * lda + k, "A is too short");
    // k-steps: pairs for bf16, single k for f32 (a panel's step is 32 u32 either way).
    let kp = match b.kind {
        Kind::Bf16Pairs => k / 2,
        Kind::F32 => k,
    };
    // Every element is written exactly once (at the last k-block), so no zeroing.
    let mut out: Vec<std::mem::MaybeUninit<O>> = Vec::with_capacity(m * n);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { out.set_len(m * n) };
    let out_ptr = SendPtr(out.as_mut_ptr() as *mut u8);
    let chunks = m.div_ceil(MC);
    let panels = n.div_ceil(NR);
    // Tasks are (row chunk, group of panels): with few rows (decoding a batch), the columns
    // give the parallelism.
    let threads = rayon::current_num_threads().max(1);
    let groups = if chunks >= 2 * threads {
        1
    } else {
        (4 * threads).div_ceil(chunks).min(panels)
    };
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let task = |t: usize| {
        let (ci, gi) = (t / groups, t % groups);
        let r0 = ci * MC;
        let rows = MC.min(m - r0);
        let mut scratch = [0f32; MC * NR];
        let pa = gi * per_group;
        let pb = (pa + per_group).min(panels);
        for pi in pa..pb {
            let panel = &packed[pi * kp * NR..(pi + 1) * kp * NR];
            let j0 = pi * NR;
            let cols = NR.min(n - j0);
            for p0 in (0..kp).step_by(KP_BLOCK) {
                let p1 = (p0 + KP_BLOCK).min(kp);
                for rb in (0..rows).step_by(MR) {
                    let mr = MR.min(rows - rb);
                    let a_ptr = a[(r0 + rb) * lda..].as_ptr();
                    let elem = (r0 + rb) * n + j0;
                    // SAFETY: the pack exists only where its kernel runs (`available()` for
                    // bf16 pairs, `available_f32()` for f32, checked when packing); the pointers
                    // cover `mr` rows of A (row stride lda, k-steps p0..p1), of the scratch tile
                    // (stride NR) and of the output (stride n, `cols` columns), which no other
                    // task writes; the panel holds kp * NR packed steps.
                    unsafe {
                        let o = out_ptr.get().add(elem * std::mem::size_of::<O>());
                        let tile = Tile {
                            scratch: scratch[rb * NR..].as_mut_ptr(),
                            first: p0 == 0,
                            last: p1 == kp,
                            out: o,
                            ldo: n,
                            cols,
                        };
                        match b.kind {
                            Kind::Bf16Pairs => kernel_dispatch::<BF>(
                                mr,
                                a_ptr as *const u16,
                                lda,
                                panel.as_ptr(),
                                p0,
                                p1,
                                tile,
                            ),
                            Kind::F32 => kernel_f32_dispatch(
                                mr,
                                a_ptr as *const f32,
                                lda,
                                panel.as_ptr() as *const f32,
                                p0,
                                p1,
                                tile,
                            ),
                        }
                    }
                }
            }
        }
    };
    if m * n * k < 1 << 20 {
        (0..chunks * groups).for_each(task);
    } else {
        (0..chunks * groups).into_par_iter().for_each(task);
    }
    // SAFETY: every element was written; MaybeUninit<O> and O share their layout.
    let mut out = std::mem::ManuallyDrop::new(out);
    Some(unsafe { Vec::from_raw_parts(out.as_mut_ptr() as *mut O, m * n, out.capacity()) })
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
    /// Partial sums of earlier k-blocks, rows NR apart (f32).
    scratch: *mut f32,
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

unsafe fn kernel_dispatch<const BF: bool>(
    mr: usize,
    a: *const u16,
    lda: usize,
    panel: *const u32,
    p0: usize,
    p1: usize,
    tile: Tile,
) {
    #[cfg(target_arch = "x86_64")]
    by_rows!(mr, kernel::<R, BF>(a, lda, panel, p0, p1, tile));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mr, a, lda, panel, p0, p1, tile);
        unreachable!("packed_gemm runs only on x86-64");
    }
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
    store_tile::<R, BF>(&mut acc, tile);
}

/// Adds earlier k-blocks' partial sums from the scratch tile, then keeps the sums there (not
/// the last k-block) or writes them to the output as f32 or (`BF`, only from the bf16 kernel)
/// rounded to bf16. AVX-512F alone, so it inlines into the f32 kernel too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const R: usize, const BF: bool>(
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
        let sc = tile.scratch.add(r * NR);
        if !tile.first {
            acc_r[0] = _mm512_add_ps(acc_r[0], _mm512_loadu_ps(sc));
            acc_r[1] = _mm512_add_ps(acc_r[1], _mm512_loadu_ps(sc.add(16)));
        }
        if !tile.last {
            _mm512_storeu_ps(sc, acc_r[0]);
            _mm512_storeu_ps(sc.add(16), acc_r[1]);
        } else if BF {
            store_bf16_row((tile.out as *mut u16).add(r * tile.ldo), acc_r, (m0, m1));
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

unsafe fn kernel_f32_dispatch(
    mr: usize,
    a: *const f32,
    lda: usize,
    panel: *const f32,
    p0: usize,
    p1: usize,
    tile: Tile,
) {
    #[cfg(target_arch = "x86_64")]
    by_rows!(mr, kernel_f32::<R>(a, lda, panel, p0, p1, tile));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mr, a, lda, panel, p0, p1, tile);
        unreachable!("packed_gemm runs only on x86-64");
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
    store_tile::<R, false>(&mut acc, tile);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(
        a: &[bf16],
        m: usize,
        k: usize,
        b: &[bf16],
        n: usize,
        rs: usize,
        cs: usize,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|kk| a[i * k + kk].to_f64() * b[kk * rs + j * cs].to_f64())
                    .sum();
            }
        }
        c
    }

    #[test]
    fn gemm_bf16_matches_f64_reference_on_odd_shapes() {
        if !available() {
            eprintln!("skipping: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for &(m, k, n) in &[(1, 2, 1), (9, 6, 33), (70, 1030, 45), (131, 64, 96)] {
            let a: Vec<bf16> = (0..m * k)
                .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            let b: Vec<bf16> = (0..k * n)
                .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            // B row-major (k × n), then the same values seen as the transpose of (n × k).
            let bt: Vec<bf16> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (bb, rs, cs) in [(&b, n, 1), (&bt, 1, k)] {
                let packed = PackedB::new(bb, k, n, rs, cs).unwrap();
                let got = matmul(&a, m, k, &packed).unwrap();
                let want = reference(&a, m, k, bb, n, rs, cs);
                let got_bf = matmul_to_bf16(&a, m, k, &packed).unwrap();
                for (h, g) in got_bf.iter().zip(&got) {
                    assert_eq!(
                        h.to_bits(),
                        bf16::from_f32(*g).to_bits(),
                        "bf16 output of {g}"
                    );
                }
                let scale = want.iter().fold(1f64, |x, v| x.max(v.abs()));
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5 * scale * (k as f64).sqrt(),
                        "({m}, {k}, {n}): {g} vs {w}"
                    );
                }
            }
        }
        assert!(PackedB::new(&[bf16::ONE; 3], 3, 1, 1, 1).is_none());
    }

    #[test]
    fn gemm_f32_matches_f64_reference_on_odd_shapes() {
        if !available_f32() {
            eprintln!("skipping: this CPU has no AVX-512");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        // k over 256 crosses k-blocks (partial sums through the scratch tile); n not a
        // multiple of 16 or 32 exercises the masked stores; m over 64 splits row chunks.
        for &(m, k, n) in &[
            (1, 1, 1),
            (9, 7, 33),
            (70, 700, 45),
            (131, 64, 96),
            (3, 576, 17),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (bb, rs, cs) in [(&b, n, 1), (&bt, 1, k)] {
                let packed = PackedB::new_f32(bb, k, n, rs, cs).unwrap();
                assert!(packed.is_f32());
                // An f32 pack never serves the bf16 entry points, nor the reverse.
                assert!(matmul(&[bf16::ONE; 4096], 1, k, &packed).is_none());
                let got = matmul_f32(&a, m, k, &packed).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|kk| a[i * k + kk] as f64 * bb[kk * rs + j * cs] as f64)
                            .sum();
                        let g = got[i * n + j] as f64;
                        assert!(
                            (g - want).abs() < 1e-5 * (k as f64).sqrt(),
                            "({m}, {k}, {n}) at ({i}, {j}): {g} vs {want}"
                        );
                    }
                }
            }
        }
        if available() {
            let bfp = PackedB::new(&[bf16::ONE; 4], 2, 2, 2, 1).unwrap();
            assert!(matmul_f32(&[1.0; 2], 1, 2, &bfp).is_none());
        }
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
