//! husk-vmm: a KVM microVM monitor, one process per pod sandbox.
//!
//! Layout follows Firecracker's `src/vmm`: `arch` is the guest's memory layout and boot
//! structures, `vstate` owns KVM objects, `devices` the emulated hardware, `builder`
//! puts a VM together from a `VmConfig`, `api` serves the control socket. The API's types,
//! client and the per-device configs are in the `husk-vmm-api` crate (`vmm/api`).
pub mod api;
pub mod arch;
pub mod builder;
pub mod cleanup;
pub mod controller;
pub mod devices;
pub mod jail;
pub mod listener;
pub mod seccomp;
pub mod vstate;

/// The stack size of every thread the VMM starts. Below 2 MiB on purpose: on a host whose
/// transparent huge pages are `always`, a 2 MiB stack mapping (Rust's default) that happens to
/// be 2 MiB-aligned is backed by one huge page at its first touch, 2 MiB resident per thread
/// for the few KiB a VMM thread uses.
pub const THREAD_STACK_SIZE: usize = 1 << 20;
