//! Seed mixing.

/// splitmix64's finaliser over `seed ^ a·φ ^ b·c`: one 64-bit seed per (seed, a, b), so that
/// nearby seeds and counters (epochs, steps, modules) give unrelated streams.
pub fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_splitmix64() {
        // splitmix64's first output from state 0 is 0xE220A8397B1DCDAF: its finaliser applied
        // to the state after one increment, 0x9E3779B97F4A7C15 (a = 1).
        assert_eq!(mix(0, 1, 0), 0xE220_A839_7B1D_CDAF);
        assert_ne!(mix(1, 2, 3), mix(1, 3, 2));
    }
}
