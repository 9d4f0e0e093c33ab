//! Arbitrary bytes as the client's half of the handshake, against a fixed key.
//!
//! The harness is `ferry_fuzz::targets::handshake_server`. Under `cargo fuzz` this is a libFuzzer
//! target; any other build makes it a replayer of the files given as arguments.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::targets::handshake_server::run(data);
});

#[cfg(not(fuzzing))]
fn main() {
    ferry_fuzz::replay_main(
        "handshake_server",
        ferry_fuzz::targets::handshake_server::run,
    );
}
