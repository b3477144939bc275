//! The host side of a pod sandbox: the sandbox layer ([`sandbox`]: its microVM's processes,
//! network, state on disk, and the agent inside it) and `husk run` on top of it. The
//! containerd shim's task service comes next, on the same layer.

pub mod containerd;
pub mod node_check;
pub mod paths;
pub mod run;
pub mod sandbox;
pub mod spec;

pub use sandbox::{Result, SandboxError};
