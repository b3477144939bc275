//! huskd's streaming server against independent clients: node's spdy-transport (SPDY/3.1
//! exec and port-forward) and Python's websockets (channel.k8s.io v4/v5 exec), plus
//! hostile clients built from our own codec. The backend runs local processes (`sh -c`)
//! and dials a local TCP echo server: this tests the protocols, not the VM.
//!
//! The clients come from scripts/setup-stream-clients (run by scripts/setup); a missing
//! client fails these tests, it never skips them.

#[path = "streaming/conformance.rs"]
mod conformance;
#[path = "streaming/hostile_clients.rs"]
mod hostile_clients;
#[path = "streaming/independent_clients.rs"]
mod independent_clients;
#[path = "streaming/local_backend.rs"]
mod local_backend;
