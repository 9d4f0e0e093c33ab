//! The tests' one generator ([`ferry_io::rng`]), seeded and with the seed printed:
//! `FERRY_TEST_SEED` replays a run's choices (not a loaded machine's timing).

pub use ferry_io::rng::{test_seed, Rng};
