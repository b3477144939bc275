//! Emulated devices: legacy PC pieces on the I/O bus and virtio devices on MMIO.
pub mod bus;
pub(crate) mod guest_warn;
pub mod helper_thread;
pub mod io_thread;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;
