//! The containerd-facing half of `containerd-shim-husk-v2`: task bookkeeping, events,
//! stdio FIFOs, runtime options and the config file.

pub mod config;
pub mod error;
pub mod events;
pub mod options;
pub mod pod_spec;
pub mod runtime;
pub mod stdio;
pub mod tasks;

pub use error::{Error, Result};

/// The runtime type containerd maps to this shim (`containerd-shim-husk-v2`).
pub const RUNTIME_TYPE: &str = "io.containerd.husk.v2";
pub use runtime::PodRuntime;
