//! husk's wire protocols. No logic lives here: only generated code and re-exports.
//!
//! - [`agent`]: the agent API messages (`proto/agent.proto`, rust-protobuf 3).
//! - [`agent_ttrpc`]: its ttrpc services, async clients and servers (`*Client`, `create_*`).

/// Messages of the agent API (`husk.agent.v1`).
#[allow(
    warnings,
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_results,
    unsafe_op_in_unsafe_fn,
    rustdoc::all
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent/agent.rs"));
}

/// ttrpc services of the agent API: `HealthClient`, `create_health`, and so on.
#[allow(
    warnings,
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_results,
    rustdoc::all
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent/agent_ttrpc.rs"));
}

/// The API version string the agent reports in `Health.Version`.
pub const AGENT_API_VERSION: &str = "husk.agent.v1";

/// The AF_VSOCK port the agent serves ttrpc on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The AF_VSOCK port of the agent's port-forward service inside the guest: one stream per
/// forwarded connection, opened with `PORT <n>\n` and answered `OK\n` or `ERR <why>\n`
/// before the bytes of the TCP connection to `localhost:<n>` in the pod flow both ways.
pub const AGENT_PORT_FORWARD_VSOCK_PORT: u32 = 1025;

/// The file the shim writes into the pod sandbox's bundle once the VM is up: the path of
/// the VM's hybrid vsock socket (`CONNECT <port>\n`), so that huskd can open port-forward
/// streams to the agent without a hop through the shim.
pub const VSOCK_ADDRESS_FILE: &str = "husk-vsock-address";

/// The share tag under which the guest agent offers the images embedded in its initramfs
/// (`RootfsSource { share_tag: EMBEDDED_SHARE_TAG, path: "busybox" }`). Reserved: a
/// virtio-fs share may not use it.
pub const EMBEDDED_SHARE_TAG: &str = "husk-embedded";

/// Where guest-image puts the embedded images inside the initramfs, one directory each.
pub const EMBEDDED_IMAGES_DIR: &str = "/usr/share/husk/images";

/// The embedded image `husk run` uses when no other is given: busybox.
pub const DEFAULT_EMBEDDED_IMAGE: &str = "busybox";

pub use protobuf;
pub use ttrpc;
