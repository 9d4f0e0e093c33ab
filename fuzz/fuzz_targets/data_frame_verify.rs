//! A session geometry and a Data frame payload through the target's verifier.
//!
//! The harness is `ferry_fuzz::targets::data_frame_verify`. Under `cargo fuzz` this is a libFuzzer
//! target; any other build makes it a replayer of the files given as arguments.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::targets::data_frame_verify::run(data);
});

#[cfg(not(fuzzing))]
fn main() {
    ferry_fuzz::replay_main(
        "data_frame_verify",
        ferry_fuzz::targets::data_frame_verify::run,
    );
}
