//! husk-agent: PID 1 of every pod microVM, serving the agent API (`husk_proto::agent`) over
//! ttrpc. It creates OCI containers with youki's libcontainer, captures their stdio, reports
//! exits and OOM kills, and configures the sandbox. The same code runs as an ordinary process
//! on a Linux host (host mode), which is how most of its tests run.

pub mod agent;
pub mod boot_timeline;
pub mod cgroups;
pub mod config;
pub mod container;
pub mod error;
pub mod exec_seccomp;
pub mod fdio;
pub mod helper;
pub mod ids;
pub mod init;
pub mod net;
pub mod oom;
pub mod port_forward;
pub mod process;
pub mod reaper;
pub mod runtime;
pub mod sandbox;
pub mod security;
pub mod server;
pub mod service;
pub mod spec;
pub mod stdio;
pub mod tty;

pub use agent::Agent;
pub use config::{Config, Mode};
pub use error::AgentError;
pub use server::Server;
