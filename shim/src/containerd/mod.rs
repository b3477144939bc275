//! The containerd-facing half of `containerd-shim-husk-v2`: the shim v2 bootstrap
//! (`start`, `delete`, the server), the Task service with its bookkeeping, events, stdio
//! FIFOs, runtime options and the config file. The pod itself (VM, agent, shares, network)
//! sits behind [`runtime::PodRuntime`]; [`vm_runtime::VmRuntime`] implements it on the
//! crate's `vm` and `agent` modules until the sandbox layer takes over.

pub mod bootstrap;
pub mod config;
pub mod error;
pub mod events;
pub mod oom_order;
pub mod options;
pub mod pod_spec;
pub mod runtime;
pub mod sandbox_state;
pub mod service;
pub mod stdio;
pub mod task_api;
pub mod tasks;
pub mod vm_runtime;

pub use error::{Error, Result};
pub use runtime::PodRuntime;

/// The runtime type containerd maps to this shim (`containerd-shim-husk-v2`).
pub const RUNTIME_TYPE: &str = "io.containerd.husk.v2";
