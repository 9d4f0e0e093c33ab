//! Arbitrary bytes as what an NBD client sends the shim during option haggling.
//!
//! The harness is `ferry_fuzz::targets::nbd_option`. Under `cargo fuzz` this is a
//! libFuzzer target; any other build makes it a replayer of the files given as arguments.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::targets::nbd_option::run(data);
});

#[cfg(not(fuzzing))]
fn main() {
    ferry_fuzz::replay_main("nbd_option", ferry_fuzz::targets::nbd_option::run);
}
