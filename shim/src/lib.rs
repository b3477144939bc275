//! The host side of a pod sandbox: launching its microVM (`husk-vmm`, plus a `virtiofsd` per
//! shared directory) and driving the agent inside it over hybrid vsock.
//!
//! `husk run` is a thin layer over this crate, and so is the containerd shim: both build a
//! [`vm::VmSpec`], [`vm::Vm::launch`] it, [`agent::Agent::connect`] to its agent, and speak
//! the agent API.

pub mod agent;
pub mod containerd;
pub mod error;
pub mod paths;
pub mod run;
pub mod spec;
pub mod vm;

pub use error::{Result, ShimError};
