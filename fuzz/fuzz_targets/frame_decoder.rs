//! Arbitrary bytes through `FrameReader::read_frame` until an error or a clean close.
//!
//! The harness is `ferry_fuzz::targets::frame_decoder`. Under `cargo fuzz` this is a libFuzzer
//! target; any other build makes it a replayer of the files given as arguments.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::targets::frame_decoder::run(data);
});

#[cfg(not(fuzzing))]
fn main() {
    ferry_fuzz::replay_main("frame_decoder", ferry_fuzz::targets::frame_decoder::run);
}
