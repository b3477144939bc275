//! Tests that need a usable /dev/kvm: run inside the lab (`scripts/test` does it), or
//! directly on a host with hardware virtualization.
mod smoke;
mod vmm;
