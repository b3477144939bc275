//! A container: its init process, its exec processes, where its files and cgroup are.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{AgentError, Result};
use crate::process::Process;

/// One container of the sandbox.
pub struct Container {
    pub id: String,
    /// The exec id the host gave the init process ("" names it too).
    pub init_exec_id: String,
    /// The bundle directory we wrote (config.json).
    pub bundle: PathBuf,
    /// The cgroup path (relative to the cgroup root).
    pub cgroup_path: PathBuf,
    /// Whether the container has its own PID namespace (then killing init kills all).
    pub own_pid_ns: bool,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    started: AtomicBool,
}

impl Container {
    pub fn new(
        id: String,
        init_exec_id: String,
        bundle: PathBuf,
        cgroup_path: PathBuf,
        own_pid_ns: bool,
        init: Arc<Process>,
    ) -> Self {
        Self {
            id,
            init_exec_id,
            bundle,
            cgroup_path,
            own_pid_ns,
            init,
            execs: Mutex::new(HashMap::new()),
            started: AtomicBool::new(false),
        }
    }

    /// Marks the container started; false if it already was.
    pub fn mark_started(&self) -> bool {
        !self.started.swap(true, Ordering::SeqCst)
    }

    /// Whether StartContainer ran.
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Finds a process by exec id ("" or the init's exec id = init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() || exec_id == self.init_exec_id {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .expect("execs lock")
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                AgentError::NotFound(format!(
                    "container {} has no process with exec id {exec_id:?}",
                    self.id
                ))
            })
    }

    /// Whether the exec id is taken.
    pub fn has_exec(&self, exec_id: &str) -> bool {
        exec_id == self.init_exec_id || self.execs.lock().expect("execs lock").contains_key(exec_id)
    }

    pub fn add_exec(&self, p: Arc<Process>) {
        self.execs
            .lock()
            .expect("execs lock")
            .insert(p.exec_id.clone(), p);
    }

    /// All processes: init first.
    pub fn processes(&self) -> Vec<Arc<Process>> {
        let mut v = vec![self.init.clone()];
        v.extend(self.execs.lock().expect("execs lock").values().cloned());
        v
    }
}
