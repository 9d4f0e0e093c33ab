//! Arbitrary bytes as a changed-block bitmap file, strict and recovering.
//!
//! The harness is `ferry_fuzz::targets::bitmap_file`. Under `cargo fuzz` this is a libFuzzer
//! target; any other build makes it a replayer of the files given as arguments.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::targets::bitmap_file::run(data);
});

#[cfg(not(fuzzing))]
fn main() {
    ferry_fuzz::replay_main("bitmap_file", ferry_fuzz::targets::bitmap_file::run);
}
