//! One harness per trust boundary. Each module's `run` is what both drivers call.

pub mod bitmap_file;
pub mod config_toml;
pub mod data_frame_verify;
pub mod frame_decoder;
pub mod handshake_server;
pub mod nbd_option;
pub mod nbd_request;
