//! huskd: husk's CRI v1 server (RuntimeService + ImageService) for kubelet and crictl.
//!
//! Layers, top to bottom: `server` (the gRPC edge; CRI types stop there), `image` (store,
//! pull, unpack), `cni` and `netns` (pod networking). Each has its own error type; the
//! server maps them to gRPC codes.

pub mod client;
pub mod cni;
pub mod config;
pub mod container_spec;
pub mod containers;
pub mod events;
pub mod fanout;
pub mod image;
pub mod layer_files;
pub mod logs;
pub mod metrics;
pub mod netns;
pub mod pause;
pub mod pod_files;
pub mod pods;
pub mod port_forward;
pub mod records;
pub mod seccomp_default;
pub mod security_context;
pub mod server;
pub mod shim_client;
pub mod streaming;
pub mod users;
