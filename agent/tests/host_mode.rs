//! Host-mode tests: the real agent binary on a Unix socket, driven by the real ttrpc clients,
//! creating busybox containers with libcontainer. They need root and fail, with the reason, without it.

mod common;

#[path = "host_mode/container_lifecycle.rs"]
mod container_lifecycle;
#[path = "host_mode/isolation.rs"]
mod isolation;
#[path = "host_mode/network.rs"]
mod network;
#[path = "host_mode/processes.rs"]
mod processes;
#[path = "host_mode/rpc_errors.rs"]
mod rpc_errors;
#[path = "host_mode/transport.rs"]
mod transport;
