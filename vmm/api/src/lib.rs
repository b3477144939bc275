//! husk-vmm-api: how the VMM's parent (the shim, the `husk` CLI, the tests) configures,
//! starts and stops a microVM, without linking the VMM: the control API's types and client,
//! `SCM_RIGHTS` fd passing, the per-device configs the VMM's command line, API and builder
//! share ([`config`]), the VMM's exit statuses ([`VmmExitStatus`]), the host check
//! ([`check`]), and the host-side helpers a device's back end needs ([`tap`],
//! [`virtiofsd_path`]). No KVM crate is a dependency.
//!
//! The rest of this comment is the control protocol's specification.
//!
//! # Transport
//!
//! A Unix stream socket, bound by the VMM (its `api::ApiServer`) with mode 0600. The protocol is
//! newline-delimited JSON: each request is one JSON object on one line (UTF-8, terminated by
//! `\n`; a trailing `\r` is tolerated), and the VMM answers every request with exactly one
//! response line, in order. A client may keep its connection open for many requests, or open
//! one per request (what [`request`] does). Blank lines are ignored and get no response.
//!
//! * A line longer than [`MAX_REQUEST_SIZE`] bytes (64 KiB, without its `\n`) is answered with
//!   an error and skipped; the connection stays usable.
//! * A line that is not a valid request (bad JSON, unknown `op`, missing or unknown field, wrong
//!   type, …) is answered with an error; the connection stays usable.
//! * File descriptors travel as `SCM_RIGHTS` ancillary data on the `sendmsg` that carries the
//!   request's first byte; at most [`MAX_FDS_PER_REQUEST`] per request. Only `add_net` takes one
//!   (`tap_fd`); fds sent with any other request are closed and the request is refused.
//! * A client that disconnects in the middle of a line leaves nothing behind: the partial line is
//!   dropped and any fds it carried are closed.
//! * At most [`MAX_CLIENTS`] connections at once; one more gets an error line and is closed.
//!
//! # Requests
//!
//! The `op` field selects the request; the other fields are the request's arguments. Unknown
//! fields are an error (a misspelt optional field would otherwise be silently ignored).
//!
//! ```text
//! {"op":"configure","kernel":"/path/vmlinux","initramfs":"/path/initrd","cmdline":"console=ttyS0",
//!  "mem_mib":512,"vcpus":2,"serial":"stdout"}
//!     initramfs and cmdline are optional. serial is "stdout", "none" or {"file":"/path/log"}.
//!     May be sent again before start; the last one wins.
//! {"op":"add_block","path":"/path/disk.img","read_only":false,"id":"rootfs"}
//!     id is optional: the guest reads it as the disk's serial (virtio-blk GET_ID,
//!     /sys/block/vdX/serial); at most 20 printable ASCII bytes.
//! {"op":"add_net","tap_name":"tap0","mac":"02:00:00:00:00:01"}
//! {"op":"add_net","tap_fd":0}
//!     Exactly one of tap_name (the VMM opens /dev/net/tun and attaches to that tap) or tap_fd
//!     (an index into the fds passed with this request: 0 for the first) must be given.
//!     mac is optional (unicast, "xx:xx:xx:xx:xx:xx").
//! {"op":"add_fs","socket_path":"/run/virtiofsd.sock","tag":"shared"}
//!     virtiofsd's vhost-user socket; the guest mounts the file system by tag.
//! {"op":"add_vsock","guest_cid":3,"uds_path":"/run/husk/vsock.sock"}
//!     Host side of the hybrid vsock: host clients connect to uds_path and send
//!     "CONNECT <port>\n"; guest connections to host port P go to "<uds_path>_P".
//! {"op":"configure_entropy","rate_limiter":{"ops":{"size":100,"refill_time_ms":1000}}}
//!     The virtio-rng device every VM has; rate_limiter is optional.
//!
//!     add_block takes "rate_limiter", add_net "rx_rate_limiter" and "tx_rate_limiter", in
//!     the same form: {"bandwidth":BUCKET,"ops":BUCKET}, either optional, where BUCKET is
//!     {"size":N,"one_time_burst":N,"refill_time_ms":N} (bytes or requests/frames; the
//!     burst is optional, spent first and never refilled). A throttled request waits in its
//!     queue until the bucket holds enough; one larger than the bucket waits for a full one.
//! {"op":"start"}     boots the VM (needs a configure first).
//! {"op":"pause"}     stops the vCPUs (state running -> paused).
//! {"op":"resume"}    restarts them (paused -> running).
//! {"op":"shutdown"}  stops the VM (there is no ACPI to ask the guest): state -> exited,
//!                    exit_reason "api". Allowed in any state but exited.
//! {"op":"status"}    always allowed.
//! ```
//!
//! `configure` and the `add_*` requests are only accepted before `start`: devices cannot be
//! hot-plugged, and afterwards they get an error saying so ([`Request::check_state`]).
//!
//! # Responses
//!
//! ```text
//! {"ok":true,"result":{}}                        success; result is {} unless stated
//! {"ok":false,"error":"<message a user can act on>"}
//! ```
//!
//! `status` answers `{"ok":true,"result":{"state":S,"exit_reason":R,"boot_ms":N}}` where S is
//! `"configuring"`, `"running"`, `"paused"` or `"exited"`; R (only once exited) is
//! `"guest_reset"`, `"guest_panic"`, `"vcpu_error"`, `"api"`, `"signal"` or `"internal_error"`;
//! and N (only once the guest has booted) is the milliseconds from `start` to the guest's
//! boot-complete signal. Clients must ignore fields and exit reasons they do not know
//! ([`ExitReason::Unknown`]).
//!
//! # Who does what
//!
//! The VMM's `api::ApiServer` owns the socket and the protocol: framing, fds, JSON, argument
//! checks ([`Request::validate`]). The VMM owns the logic, behind the server. This crate is
//! the client side ([`request`], [`ApiClient`]) and what both sides share.

pub mod check;
mod client;
pub mod config;
mod exit;
pub mod jail_check;
pub mod rate_limit;
pub mod scm;
pub mod tap;
#[cfg(test)]
mod tests;
mod virtiofsd;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{request, request_with_timeout, ApiClient};
pub use config::{
    BlockConfig, FsConfig, MacAddr, MachineConfig, NetConfig, SerialConfig, VsockConfig,
};
pub use exit::VmmExitStatus;
pub use rate_limit::{EntropyConfig, RateLimiterConfig, TokenBucketConfig};
pub use virtiofsd::virtiofsd_path;

/// Longest request line, without its `\n`.
pub const MAX_REQUEST_SIZE: usize = 64 * 1024;
/// Most fds one request may carry.
pub const MAX_FDS_PER_REQUEST: usize = 16;
/// Most simultaneous connections; the shim needs one, tests and tools a few more.
pub const MAX_CLIENTS: usize = 16;
/// Longest response line the client accepts.
pub const MAX_RESPONSE_SIZE: usize = 1024 * 1024;
/// How long [`request`] waits for the whole exchange (connect, send, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the API server and client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket path {0} is too long for a Unix socket (at most 107 bytes)")]
    PathTooLong(PathBuf),
    #[error("another process is serving the API socket {0}: stop it, or use another path")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it with the API socket")]
    NotASocket(PathBuf),
    #[error("cannot tell whether the API socket {path} is in use: {source}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("cannot remove the stale API socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind the API socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot connect to the VMM's API socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("the VMM did not answer on {path} within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("API socket I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("at most {MAX_FDS_PER_REQUEST} fds can go with one request, not {0}")]
    TooManyFds(usize),
    #[error("cannot encode the request: {0}")]
    Encode(serde_json::Error),
    #[error("the VMM closed the API connection without answering")]
    Closed,
    #[error("the VMM sent an invalid response: {0}")]
    BadResponse(String),
    /// The VMM answered `{"ok": false, "error": ...}` (from [`Response::into_result`]).
    #[error("{0}")]
    Refused(String),
}

/// A request (see the module docs for the wire format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Configure(MachineConfig),
    AddBlock(BlockConfig),
    AddNet(NetConfig),
    AddFs(FsConfig),
    AddVsock(VsockConfig),
    ConfigureEntropy(EntropyConfig),
    Start,
    Pause,
    Resume,
    Shutdown,
    Status,
}

impl Request {
    /// The request's `op`, for logs and messages.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Configure(_) => "configure",
            Request::AddBlock(_) => "add_block",
            Request::AddNet(_) => "add_net",
            Request::AddFs(_) => "add_fs",
            Request::AddVsock(_) => "add_vsock",
            Request::ConfigureEntropy(_) => "configure_entropy",
            Request::Start => "start",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Shutdown => "shutdown",
            Request::Status => "status",
        }
    }

    /// Checks what can be checked without the VMM: argument sanity and the fds that came with
    /// the request. The server calls this before the handler, so handlers only see requests
    /// that pass it.
    pub fn validate(&self, num_fds: usize) -> Result<(), String> {
        if num_fds > 0
            && !matches!(
                self,
                Request::AddNet(NetConfig {
                    tap_fd: Some(_),
                    ..
                })
            )
        {
            return Err(format!(
                "{} takes no file descriptors, but {num_fds} came with it (they were closed)",
                self.op()
            ));
        }
        let checked = match self {
            Request::Configure(c) => c.validate(),
            Request::AddBlock(b) => b.validate(),
            Request::AddNet(n) => n.validate(num_fds),
            Request::ConfigureEntropy(e) => e.rate_limiter.as_ref().map_or(Ok(()), |r| {
                r.validate().map_err(|e| format!("rate_limiter: {e}"))
            }),
            _ => Ok(()),
        };
        checked.map_err(|e| format!("{}: {e}", self.op()))
    }

    /// Whether this request is allowed in `state`, with a message saying why not. A handler can
    /// call this first to get the protocol's state rules and wording.
    pub fn check_state(&self, state: VmState) -> Result<(), String> {
        use VmState::*;
        let allowed = match self {
            Request::Configure(_)
            | Request::AddBlock(_)
            | Request::AddNet(_)
            | Request::AddFs(_)
            | Request::AddVsock(_)
            | Request::ConfigureEntropy(_) => {
                return if state == Configuring {
                    Ok(())
                } else {
                    Err(format!(
                        "{} is only accepted before start, and the VM is {state}: \
                         devices and settings cannot be changed once it has started",
                        self.op()
                    ))
                };
            }
            Request::Start => state == Configuring,
            Request::Pause => state == Running,
            Request::Resume => state == Paused,
            Request::Shutdown => state != Exited,
            Request::Status => true,
        };
        if allowed {
            Ok(())
        } else {
            Err(format!("cannot {} the VM: it is {state}", self.op()))
        }
    }
}

/// The VM's life cycle, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Configuring,
    Running,
    Paused,
    Exited,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Configuring => "configuring",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Exited => "exited",
        })
    }
}

/// Why the VM exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest rebooted or powered off (we treat both as the end).
    GuestReset,
    /// The guest kernel panicked.
    GuestPanic,
    /// A vCPU hit an error KVM or the VMM could not handle.
    VcpuError,
    /// A `shutdown` request.
    Api,
    /// The VMM received SIGTERM or SIGINT.
    Signal,
    /// The VMM itself failed (a device, the event loop).
    InternalError,
    /// A reason this client does not know (a newer VMM); never sent.
    #[serde(other)]
    Unknown,
}

/// The `status` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<ExitReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
}

/// A response: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// Success with an empty result (`{}`).
    pub fn ok() -> Response {
        Response {
            ok: true,
            result: Some(serde_json::Value::Object(Default::default())),
            error: None,
        }
    }

    /// Success with `result`.
    pub fn ok_with(result: &impl Serialize) -> Response {
        match serde_json::to_value(result) {
            Ok(value) => Response {
                ok: true,
                result: Some(value),
                error: None,
            },
            Err(e) => Response::error(format!("internal error: cannot encode the result: {e}")),
        }
    }

    /// Failure; `message` should tell the user what to do about it.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }

    /// The result, or the VMM's error as [`ApiError::Refused`].
    pub fn into_result(self) -> Result<serde_json::Value, ApiError> {
        if self.ok {
            Ok(self
                .result
                .unwrap_or(serde_json::Value::Object(Default::default())))
        } else {
            Err(ApiError::Refused(self.error.unwrap_or_else(|| {
                "the VMM refused the request without saying why".into()
            })))
        }
    }

    /// The result decoded as `T` (e.g. [`VmStatus`]), or the VMM's error.
    pub fn parse_result<T: serde::de::DeserializeOwned>(self) -> Result<T, ApiError> {
        serde_json::from_value(self.into_result()?)
            .map_err(|e| ApiError::BadResponse(format!("unexpected result: {e}")))
    }
}
