//! The NBD client the tests drive the shim with: `filter_driver_shim::nbd::client`,
//! written from the protocol specification, independent of the shim's server code.

pub use filter_driver_shim::nbd::client::*;
