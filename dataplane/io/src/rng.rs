//! The one seeded generator of ferry's tests and tools (image generation, benchmarks,
//! the power-cut file system's choices): SplitMix64, tiny and fast, not for secrets.
//!
//! A randomised test takes its seed from [`test_seed`], which prints it, so
//! `FERRY_TEST_SEED=<seed>` replays the run's choices (not a loaded machine's timing).

/// SplitMix64 (Steele, Lea, Flood 2014): every seed, zero included, gives a full-period
/// stream.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`, without modulo bias (Lemire's multiply-shift).
    ///
    /// # Panics
    /// If `n` is zero.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Fills `buf` with the stream's bytes, eight at a time, little-endian.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// A non-zero byte.
    pub fn nonzero_byte(&mut self) -> u8 {
        1 + self.below(255) as u8
    }
}

/// The seed for a randomised test: `FERRY_TEST_SEED` if set, else fresh. Printed on
/// stderr with `test`'s name so a failure can be replayed (the harness shows a failing
/// test's output).
///
/// # Panics
/// If `FERRY_TEST_SEED` is set to something that is not a `u64`.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("FERRY_TEST_SEED") {
        Ok(s) => s.parse().expect("FERRY_TEST_SEED must be a u64"),
        Err(_) => fresh_seed(),
    };
    eprintln!("{test}: seed {seed} (replay with FERRY_TEST_SEED={seed})");
    seed
}

/// A seed that differs between runs and between processes.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()) << 32
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn same_seed_same_stream_and_below_stays_below() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            assert!(a.below(10) < 10);
            b.below(10);
        }
        let mut buf = [0u8; 13];
        a.fill(&mut buf);
        assert!(buf.iter().any(|&x| x != 0));
        assert_ne!(a.nonzero_byte(), 0);
    }
}
