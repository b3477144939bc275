//! Tests that need a usable /dev/kvm: run inside the lab (`scripts/test` does it), or
//! directly on a host with hardware virtualization.
mod agent;
mod containerd;
mod huskd;
mod run;
mod sandbox;
mod smoke;
mod vmm;
