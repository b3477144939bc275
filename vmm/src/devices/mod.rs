//! Emulated devices: legacy PC pieces on the I/O bus and virtio devices on MMIO.
pub mod bus;
pub mod legacy;
pub mod virtio;
