//! The control API: how the VMM's parent (the shim) configures, starts and stops the microVM.
//!
//! This comment is the protocol's specification.
//!
//! # Transport
//!
//! A Unix stream socket, bound by the VMM (`ApiServer::bind`) with mode 0600. The protocol is
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
//!     id is optional (the guest sees it as the disk's serial).
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
//! [`ApiServer`] owns the socket and the protocol: framing, fds, JSON, argument checks
//! ([`Request::validate`]). The VMM owns the logic: it implements [`ApiHandler`], and the server
//! calls it once per well-formed request, on the event-loop thread (the server is an
//! `event_manager::MutEventSubscriber`, so it never blocks the loop).
//!
//! The server never removes its socket file (under seccomp and in a jail it could not): register
//! the path with `crate::cleanup`, or let the next `ApiServer::bind` replace it as stale.

mod client;
mod scm;
mod server;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use client::{request, request_with_timeout, ApiClient};
pub use server::ApiServer;

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
    Configure(VmConfig),
    AddBlock(BlockConfig),
    AddNet(NetConfig),
    AddFs(FsConfig),
    AddVsock(VsockConfig),
    Start,
    Pause,
    Resume,
    Shutdown,
    Status,
}

/// `configure`: the machine and how to boot it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub serial: SerialConfig,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialConfig {
    /// The VMM's standard output.
    Stdout,
    /// Discarded.
    #[serde(rename = "none")]
    Disabled,
    /// Appended to a file.
    File(PathBuf),
}

/// `add_block`: a virtio-blk disk backed by a host file or block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `add_net`: a virtio-net interface on a tap, by name or by fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_name: Option<String>,
    /// Index into the fds passed with the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_fd: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

/// `add_fs`: a virtio-fs share served by virtiofsd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub socket_path: PathBuf,
    pub tag: String,
}

/// `add_vsock`: the hybrid virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// A unicast Ethernet address, written `xx:xx:xx:xx:xx:xx` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `xx:xx:xx:xx:xx:xx` (hex, either case); multicast addresses are refused because
    /// a NIC cannot have one.
    pub fn parse(s: &str) -> Result<MacAddr, String> {
        let bad =
            || format!("invalid MAC address {s:?}: expected six hex bytes like 02:00:00:00:00:01");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            // from_str_radix alone would take "+1".
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 != 0 {
            return Err(format!(
                "MAC address {s} is a multicast address: the first byte must be even (e.g. 02:…)"
            ));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MacAddr::parse(&s).map_err(serde::de::Error::custom)
    }
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
        match self {
            Request::Configure(c) => {
                if c.mem_mib == 0 {
                    return Err("configure: mem_mib must be at least 1".into());
                }
                if c.vcpus == 0 {
                    return Err("configure: vcpus must be at least 1".into());
                }
            }
            Request::AddNet(n) => match (&n.tap_name, n.tap_fd) {
                (Some(_), Some(_)) => {
                    return Err("add_net: give either tap_name or tap_fd, not both".into())
                }
                (None, None) => {
                    return Err(
                        "add_net: give tap_name (a tap the VMM opens) or tap_fd (the \
                                index of a tap fd passed with the request)"
                            .into(),
                    )
                }
                (Some(name), None) if name.is_empty() || name.len() >= libc::IFNAMSIZ => {
                    return Err(format!(
                        "add_net: tap_name {name:?} must be 1 to {} bytes long",
                        libc::IFNAMSIZ - 1
                    ))
                }
                (None, Some(i)) if i >= num_fds => {
                    return Err(format!(
                        "add_net: tap_fd is {i} but {num_fds} fd(s) came with the request; \
                         send the tap fd as SCM_RIGHTS data on the same message"
                    ))
                }
                _ => {}
            },
            _ => {}
        }
        Ok(())
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
            | Request::AddVsock(_) => {
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

/// The VMM's side of the API: called once per well-formed request, on the event-loop thread.
///
/// `fds` are the descriptors passed with the request (only `add_net` with `tap_fd` gets any;
/// [`Request::validate`] has checked the index). Whatever the handler does not keep is closed
/// when it returns. The handler should answer quickly: the event loop waits for it.
pub trait ApiHandler {
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Response;
}

impl<T: ApiHandler + ?Sized> ApiHandler for Box<T> {
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Response {
        (**self).handle(req, fds)
    }
}

impl<T: ApiHandler + ?Sized> ApiHandler for &mut T {
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Response {
        (**self).handle(req, fds)
    }
}

/// For a VMM shared with other event-loop subscribers or threads.
impl<T: ApiHandler + ?Sized> ApiHandler for std::sync::Arc<std::sync::Mutex<T>> {
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Response {
        match self.lock() {
            Ok(mut handler) => handler.handle(req, fds),
            Err(_) => Response::error(
                "internal error: the VMM's state is poisoned by an earlier panic; stop this VM",
            ),
        }
    }
}
