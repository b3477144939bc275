//! The shim's own bookkeeping of containerd's tasks: every container's init process and
//! exec processes, their state, stdio paths, pid and exit. State, Wait, Connect and Shutdown
//! are answered from here alone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use containerd_shim::protos::api::Status;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use super::error::{Error, Result};
use super::runtime::RootfsMount;
use super::stdio::{Pumps, StdioPaths};

/// How a process ended, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn timestamp(&self) -> Timestamp {
        let d = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
            ..Default::default()
        }
    }
}

/// One process: a container's init (`exec_id` "") or an exec.
pub struct Process {
    pub exec_id: String,
    pub stdio: StdioPaths,
    pub status: Status,
    pub pid: u32,
    pub pumps: Option<Pumps>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: StdioPaths, pid: u32) -> Process {
        let (exit_tx, _) = watch::channel(None);
        Process {
            exec_id: exec_id.into(),
            stdio,
            status: Status::CREATED,
            pid,
            pumps: None,
            exit_tx,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        self.exit_tx.borrow().clone()
    }

    /// Records the exit; wakes every Wait.
    pub fn set_exited(&mut self, exit: Exit) {
        self.status = Status::STOPPED;
        self.exit_tx.send_replace(Some(exit));
    }

    /// A receiver that yields the exit once it is recorded.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }
}

/// Whether a container is its pod's sandbox (pause) container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sandbox,
    Container,
}

/// A container as containerd knows it.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub kind: Kind,
    pub rootfs: Vec<RootfsMount>,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            Ok(&self.init)
        } else {
            self.execs
                .get(exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {exec_id} of {}", self.id)))
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            Ok(&mut self.init)
        } else {
            let id = self.id.clone();
            self.execs
                .get_mut(exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {exec_id} of {id}")))
        }
    }
}

/// Every container of the pod this shim serves.
#[derive(Default)]
pub struct Tasks {
    containers: HashMap<String, Container>,
}

impl Tasks {
    pub fn get(&self, id: &str) -> Result<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))
    }

    pub fn get_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))
    }

    pub fn insert(&mut self, c: Container) -> Result<()> {
        if self.containers.contains_key(&c.id) {
            return Err(Error::AlreadyExists(format!("task {}", c.id)));
        }
        self.containers.insert(c.id.clone(), c);
        Ok(())
    }

    pub fn remove(&mut self, id: &str) -> Option<Container> {
        self.containers.remove(id)
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    pub fn has_sandbox(&self) -> bool {
        self.containers.values().any(|c| c.kind == Kind::Sandbox)
    }

    /// Ids of every container (for Shutdown's "am I still needed").
    pub fn ids(&self) -> Vec<String> {
        self.containers.keys().cloned().collect()
    }
}

/// The annotations by which containerd's CRI plugin tells a sandbox from its containers.
pub mod annotations {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    pub const TYPE_SANDBOX: &str = "sandbox";
    pub const TYPE_CONTAINER: &str = "container";
}

/// A spec's kind, and the sandbox it belongs to: a CRI app container names its sandbox; a
/// sandbox, or a container from plain `ctr` (no annotations), is its own.
pub fn kind_of(spec: &serde_json::Value, id: &str) -> (Kind, String) {
    let ann = &spec["annotations"];
    let ty = ann[annotations::CONTAINER_TYPE].as_str().unwrap_or("");
    match (ty, ann[annotations::SANDBOX_ID].as_str()) {
        (annotations::TYPE_CONTAINER, Some(sb)) if !sb.is_empty() => {
            (Kind::Container, sb.to_string())
        }
        _ => (Kind::Sandbox, id.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_from_cri_annotations() {
        let sb = json!({"annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "pod1"}});
        assert_eq!(kind_of(&sb, "pod1"), (Kind::Sandbox, "pod1".into()));
        let c = json!({"annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1"}});
        assert_eq!(kind_of(&c, "c1"), (Kind::Container, "pod1".into()));
        // plain ctr: no annotations, its own sandbox
        assert_eq!(kind_of(&json!({}), "x"), (Kind::Sandbox, "x".into()));
    }

    #[tokio::test]
    async fn exit_wakes_waiters_registered_before_and_after() {
        let mut p = Process::new("", StdioPaths::default(), 42);
        let mut early = p.exit_watch();
        let exit = Exit {
            status: 3,
            at: SystemTime::now(),
        };
        p.set_exited(exit.clone());
        let got = early.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(got, Some(exit.clone()));
        let mut late = p.exit_watch();
        assert_eq!(*late.wait_for(Option::is_some).await.unwrap(), Some(exit));
        assert_eq!(p.status, Status::STOPPED);
    }
}
