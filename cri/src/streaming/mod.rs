//! huskd's streaming server: the URLs that Exec, Attach and PortForward return, and the
//! protocols kubelet's clients (kubectl, crictl) speak on them.
//!
//! Layers, bottom up: `spdy` (SPDY/3.1 codec and session), `websocket` (the channel.k8s.io
//! framings), `remotecommand` (exec/attach over either transport), `portforward`, `tokens`
//! (single-use request tokens), `server` (HTTP routes, upgrades, protocol negotiation).
//! The container side is behind `backend::StreamBackend`, so every protocol is tested
//! against local processes without a VM.

pub mod backend;
pub mod portforward;
pub mod remotecommand;
pub mod server;
pub mod spdy;
pub mod status;
pub mod tokens;
pub mod websocket;
pub mod ws_tunnel;
