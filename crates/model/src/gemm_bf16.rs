//! A bf16 × bf16 → f32 matrix product on x86-64 CPUs with AVX512-BF16 (`vdpbf16ps`), for the
//! linear layers of a bf16 model: twice the multiply throughput of f32 FMA on such CPUs, where
//! candle widens bf16 to f32 and runs an f32 GEMM.
//!
//! `C (m × n) = A (m × k) · B (k × n)`: A is row-major with contiguous rows (an activation), B
//! is any strided matrix (a weight or its transpose), packed per call into 32-column panels of
//! k-pairs, the layout `vdpbf16ps` consumes. Products of bf16 values are exact in f32; sums are
//! accumulated in f32, as PyTorch does. Without AVX512-BF16 (or for odd `k`) [`matmul`] returns
//! `None` and the caller falls back to f32.
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

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `A (m × k, row stride lda) · B` with `B[kk, j] = b[kk * b_rs + j * b_cs]`, as f32 (m × n),
/// or `None` when the kernel cannot run here.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[bf16],
    m: usize,
    k: usize,
    lda: usize,
    b: &[bf16],
    n: usize,
    b_rs: usize,
    b_cs: usize,
) -> Option<Vec<f32>> {
    if !available() || !k.is_multiple_of(2) || m == 0 || n == 0 || k == 0 {
        return None;
    }
    assert!(lda >= k && a.len() >= (m - 1) * lda + k, "A is too short");
    assert!(
        b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "B is too short for its strides"
    );
    let packed = pack_b(b, k, n, b_rs, b_cs);
    let mut c = vec![0f32; m * n];
    let kp = k / 2;
    let task = |(ci, c_chunk): (usize, &mut [f32])| {
        let r0 = ci * MC;
        let rows = c_chunk.len() / n;
        for p0 in (0..kp).step_by(KP_BLOCK) {
            let p1 = (p0 + KP_BLOCK).min(kp);
            for (pi, panel) in packed.chunks(kp * NR).enumerate() {
                let j0 = pi * NR;
                let cols = NR.min(n - j0);
                for rb in (0..rows).step_by(MR) {
                    let mr = MR.min(rows - rb);
                    let a_ptr = a[(r0 + rb) * lda..].as_ptr() as *const u16;
                    let c_ptr = c_chunk[rb * n + j0..].as_mut_ptr();
                    // SAFETY: `available()` checked the CPU features; the pointers cover `mr`
                    // rows of A (row stride lda, k-pairs p0..p1) and of C (stride n, `cols`
                    // columns), and the panel holds kp * NR packed pairs.
                    unsafe {
                        kernel_dispatch(mr, a_ptr, lda, panel.as_ptr(), p0, p1, c_ptr, n, cols);
                    }
                }
            }
        }
    };
    if m * n * k < 1 << 20 {
        c.chunks_mut(MC * n).enumerate().for_each(task);
    } else {
        c.par_chunks_mut(MC * n).enumerate().for_each(task);
    }
    Some(c)
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

#[allow(clippy::too_many_arguments)]
unsafe fn kernel_dispatch(
    mr: usize,
    a: *const u16,
    lda: usize,
    panel: *const u32,
    p0: usize,
    p1: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match mr {
        8 => kernel::<8>(a, lda, panel, p0, p1, c, ldc, cols),
        7 => kernel::<7>(a, lda, panel, p0, p1, c, ldc, cols),
        6 => kernel::<6>(a, lda, panel, p0, p1, c, ldc, cols),
        5 => kernel::<5>(a, lda, panel, p0, p1, c, ldc, cols),
        4 => kernel::<4>(a, lda, panel, p0, p1, c, ldc, cols),
        3 => kernel::<3>(a, lda, panel, p0, p1, c, ldc, cols),
        2 => kernel::<2>(a, lda, panel, p0, p1, c, ldc, cols),
        _ => kernel::<1>(a, lda, panel, p0, p1, c, ldc, cols),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mr, a, lda, panel, p0, p1, c, ldc, cols);
        unreachable!("gemm_bf16 runs only on x86-64");
    }
}

/// `C[0..R, 0..cols] += A[0..R, pairs p0..p1] · panel[p0..p1]`, accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize>(
    a: *const u16,
    lda: usize,
    panel: *const u32,
    p0: usize,
    p1: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
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
    for (r, acc_r) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        let c0 = _mm512_maskz_loadu_ps(m0, row);
        _mm512_mask_storeu_ps(row, m0, _mm512_add_ps(c0, acc_r[0]));
        if m1 != 0 {
            let c1 = _mm512_maskz_loadu_ps(m1, row.add(16));
            _mm512_mask_storeu_ps(row.add(16), m1, _mm512_add_ps(c1, acc_r[1]));
        }
    }
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
                let got = matmul(&a, m, k, k, bb, n, rs, cs).unwrap();
                let want = reference(&a, m, k, bb, n, rs, cs);
                let scale = want.iter().fold(1f64, |x, v| x.max(v.abs()));
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5 * scale * (k as f64).sqrt(),
                        "({m}, {k}, {n}): {g} vs {w}"
                    );
                }
            }
        }
        assert!(matmul(&[bf16::ONE; 3], 1, 3, 3, &[bf16::ONE; 3], 1, 1, 1).is_none());
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
