//! Arbitrary bytes as a session and the request stream of an NBD client of the shim.
//!
//! The harness is `ferry_fuzz::targets::nbd_request`. Under `cargo fuzz` this is a
//! libFuzzer target; any other build makes it a replayer of the files given as arguments.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::targets::nbd_request::run(data);
});

#[cfg(not(fuzzing))]
fn main() {
    ferry_fuzz::replay_main("nbd_request", ferry_fuzz::targets::nbd_request::run);
}
