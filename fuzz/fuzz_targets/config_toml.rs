//! Arbitrary UTF-8 as a ferry config file.
//!
//! The harness is `ferry_fuzz::targets::config_toml`. Under `cargo fuzz` this is a libFuzzer
//! target; any other build makes it a replayer of the files given as arguments.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::targets::config_toml::run(data);
});

#[cfg(not(fuzzing))]
fn main() {
    ferry_fuzz::replay_main("config_toml", ferry_fuzz::targets::config_toml::run);
}
