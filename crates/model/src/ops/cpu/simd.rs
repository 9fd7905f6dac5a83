//! The exponentials of the kernels' inner loops: an inlined polynomial `exp` for f32 and its
//! loops, compiled for AVX2 + FMA and chosen at run time (the crate targets baseline x86-64).

/// Two loops so the compiler vectorizes the exponentials (the sum keeps 8 lanes of partial
/// sums, a fixed order).
#[inline(always)]
pub(crate) fn exp_shift_sum_f32(row: &mut [f32], max: f32) -> f32 {
    row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_shift_sum_avx2(row: &mut [f32], max: f32) -> f32 {
    exp_shift_sum_f32(row, max)
}

#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by adding and subtracting 1.5 * 2^23 (no libm call, vectorizable).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    // 2^n: n is in -126..=127 after the clamp, a normal exponent.
    let y = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0 // exp(-inf) = 0 exactly (masked attention scores)
    } else if x > 88.0 {
        f32::INFINITY
    } else if x.is_nan() {
        f32::NAN
    } else {
        y
    }
}

/// The f32 loops of [`Elem::sum_exp_shift`] and [`Elem::exp_shift_scale`], vectorized with AVX2
/// where the CPU has it (the crate is built for baseline x86-64).
#[inline(always)]
pub(crate) fn sum_exp_shift_f32(row: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += exp_f32(v - shift);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp_f32(v - shift)).sum();
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
pub(crate) fn exp_shift_scale_f32(out: &mut [f32], x: &[f32], shift: f32, scale: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = scale * exp_f32(v - shift);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn sum_exp_shift_avx2(row: &[f32], shift: f32) -> f32 {
    sum_exp_shift_f32(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_shift_scale_avx2(out: &mut [f32], x: &[f32], shift: f32, scale: f32) {
    exp_shift_scale_f32(out, x, shift, scale)
}

/// Whether the AVX2 + FMA loops run here.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_exp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            assert!(
                ((got - want) / want).abs() < 2.5e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
