//! The tests' one generator, seeded and with the seed printed: `FERRY_TEST_SEED`
//! replays a run's choices (not a loaded machine's timing).

/// SplitMix64: tiny, fast, good enough to generate test data and choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// A non-zero byte.
    pub fn nonzero_byte(&mut self) -> u8 {
        1 + self.below(255) as u8
    }
}

/// The seed for a randomised test: `FERRY_TEST_SEED` if set, else fresh. Printed so a
/// failure can be replayed (the harness shows a failing test's output).
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("FERRY_TEST_SEED") {
        Ok(s) => s.parse().expect("FERRY_TEST_SEED must be a u64"),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            nanos ^ (std::process::id() as u64) << 32
        }
    };
    eprintln!("{test}: seed {seed} (replay with FERRY_TEST_SEED={seed})");
    seed
}
