//! husk-vmm: a KVM microVM monitor, one process per pod sandbox.
//!
//! Layout follows Firecracker's `src/vmm`: `vstate` owns KVM objects, `devices` the
//! emulated hardware, `builder` puts a VM together, `api` is the control socket.
pub mod check;
pub mod devices;
