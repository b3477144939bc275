//! The agent's side of the runtime helper (see [`crate::helper`]): starts it, waits for it
//! through the reaper, and reads its answer.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::helper::{HelperRequest, HelperResult, LOG_FILE, REQUEST_FILE, RESULT_FILE};
use crate::reaper::Reaper;

/// Errors of running the helper.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The helper could not be run at all.
    #[error("runtime helper: {0}")]
    Spawn(String),
    /// The helper ran and reported a failure (libcontainer's message).
    #[error("{0}")]
    Failed(String),
}

/// The stdio the created process inherits.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Runs helper requests.
pub struct Runtime {
    exe: PathBuf,
    work_root: PathBuf,
    reaper: Arc<Reaper>,
    seq: AtomicU64,
}

impl Runtime {
    /// `exe` is the agent binary (it is also the helper); `work_root` holds the per-call
    /// work directories.
    pub fn new(exe: PathBuf, work_root: PathBuf, reaper: Arc<Reaper>) -> Self {
        Self {
            exe,
            work_root,
            reaper,
            seq: AtomicU64::new(0),
        }
    }

    /// Runs one request; `stdio` (or /dev/null) becomes the helper's, and so the new
    /// process's, fds 0-2. Returns the pid the helper reported.
    pub async fn run(
        &self,
        req: &HelperRequest,
        stdio: Option<ChildStdio>,
    ) -> Result<Option<i32>, RuntimeError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .work_root
            .join(format!("helper-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| RuntimeError::Spawn(format!("create {}: {e}", dir.display())))?;
        let res = self.run_in(&dir, req, stdio).await;
        let _ = std::fs::remove_dir_all(&dir);
        res
    }

    async fn run_in(
        &self,
        dir: &std::path::Path,
        req: &HelperRequest,
        stdio: Option<ChildStdio>,
    ) -> Result<Option<i32>, RuntimeError> {
        let json = serde_json::to_vec(req).map_err(|e| RuntimeError::Spawn(e.to_string()))?;
        std::fs::write(dir.join(REQUEST_FILE), json)
            .map_err(|e| RuntimeError::Spawn(format!("write request: {e}")))?;

        let mut cmd = Command::new(&self.exe);
        cmd.arg("__runtime").arg(dir);
        if let Ok(v) = std::env::var("HUSK_AGENT_LOG") {
            cmd.env("HUSK_AGENT_LOG", v);
        }
        match stdio {
            Some(s) => {
                cmd.stdin(Stdio::from(s.stdin))
                    .stdout(Stdio::from(s.stdout))
                    .stderr(Stdio::from(s.stderr));
            }
            None => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Spawn(format!("start {}: {e}", self.exe.display())))?;
        // Our copies of the child's stdio ends must close now, or EOF would never come.
        drop(cmd);
        // The reaper, not std, collects the helper: it owns waitpid(-1).
        let exited = self.reaper.watch(child.id() as i32);
        drop(child);
        let info = exited
            .await
            .map_err(|_| RuntimeError::Spawn("reaper went away".into()))?;

        if let Ok(log) = std::fs::read_to_string(dir.join(LOG_FILE)) {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                tracing::debug!(target: "husk_agent::helper", "{line}");
            }
        }
        let result = std::fs::read(dir.join(RESULT_FILE)).map_err(|e| {
            RuntimeError::Spawn(format!(
                "helper exited with status {} without an answer ({e})",
                info.status
            ))
        })?;
        match serde_json::from_slice::<HelperResult>(&result) {
            Ok(HelperResult::Ok { pid }) => Ok(pid),
            Ok(HelperResult::Err { message }) => Err(RuntimeError::Failed(message)),
            Err(e) => Err(RuntimeError::Spawn(format!("bad helper answer: {e}"))),
        }
    }
}
