//! A sandbox's state on disk (`<run root>/sandbox/<id>/state.json`): everything it made on
//! the host, recorded before or as it is made, so that a process that never held the sandbox
//! (the shim's `delete` after the shim was killed, or the next `husk run`) can take it all
//! down with [`cleanup`].

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::host_cgroup::{self, CgroupRecord};
use super::network;
use super::process::{self, ProcessRef};
use super::{Result, SandboxError};

const STATE_FILE: &str = "state.json";
/// How long a killed process of a dead owner gets to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// A process the sandbox started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub name: String,
    #[serde(flatten)]
    pub process: ProcessRef,
}

/// A tap the sandbox opened for its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapRecord {
    pub name: String,
    /// Its network namespace; `None`: the owner's.
    pub netns: Option<PathBuf>,
    /// Made by us (it goes when its last fd closes), not a tap that was there before.
    pub created: bool,
}

/// A network namespace the sandbox uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRecord {
    pub path: PathBuf,
    /// Made by us, so ours to remove (not one CNI made for the pod).
    pub owned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub id: String,
    /// The process that holds the sandbox (`husk run`, the shim); when it is gone, so is
    /// anyone who would clean up, so the next one does.
    pub owner: ProcessRef,
    pub processes: Vec<ProcessRecord>,
    /// Sockets outside the sandbox directory (those inside go with it).
    pub sockets: Vec<PathBuf>,
    /// Mount points, unmounted in reverse order.
    pub mounts: Vec<PathBuf>,
    pub taps: Vec<TapRecord>,
    pub netns: Option<NetnsRecord>,
    /// The pod's host cgroup (removed once its processes are gone).
    #[serde(default)]
    pub cgroup: Option<CgroupRecord>,
    /// The lock file of the jailed VMM's uid (freed once its processes are gone).
    #[serde(default)]
    pub jail_id: Option<PathBuf>,
}

/// The sandbox directories' parent under a run root.
pub fn sandboxes_dir(run_root: &Path) -> PathBuf {
    run_root.join("sandbox")
}

/// The state of a live sandbox: changed only through [`StateFile::update`], which writes it
/// out before returning.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    state: SandboxState,
}

impl StateFile {
    /// Creates the sandbox's directory (it must not exist) and its state, owned by us.
    pub fn create(run_root: &Path, id: &str) -> Result<StateFile> {
        let parent = sandboxes_dir(run_root);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(|e| SandboxError::io(format!("create {}", parent.display()), e))?;
        let dir = parent.join(id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                SandboxError::io(format!("create the sandbox directory {}", dir.display()), e)
            })?;
        let file = StateFile {
            dir,
            state: SandboxState {
                id: id.into(),
                owner: ProcessRef::current(),
                processes: Vec::new(),
                sockets: Vec::new(),
                mounts: Vec::new(),
                taps: Vec::new(),
                netns: None,
                cgroup: None,
                jail_id: None,
            },
        };
        file.save()?;
        Ok(file)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state(&self) -> &SandboxState {
        &self.state
    }

    /// Changes the state and writes it out (atomically: a reader sees the old or the new).
    pub fn update(&mut self, change: impl FnOnce(&mut SandboxState)) -> Result<()> {
        change(&mut self.state);
        self.save()
    }

    fn save(&self) -> Result<()> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(&self.state).map_err(|e| SandboxError::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| SandboxError::io(format!("write {}", path.display()), e))
    }
}

/// Reads a sandbox's state.
pub fn load(run_root: &Path, id: &str) -> Result<SandboxState> {
    let path = sandboxes_dir(run_root).join(id).join(STATE_FILE);
    let text =
        fs::read(&path).map_err(|e| SandboxError::io(format!("read {}", path.display()), e))?;
    serde_json::from_slice(&text).map_err(|e| SandboxError::State {
        path,
        message: e.to_string(),
    })
}

/// Takes down everything sandbox `id`'s state records, then its directory: kills its
/// processes (only those whose pid still names the recorded process), unmounts its mounts,
/// removes its sockets and the netns it made. Safe to run again, and on a half-made sandbox.
/// Errors are collected: one step failing does not stop the others.
pub fn cleanup(run_root: &Path, id: &str) -> Result<()> {
    let dir = sandboxes_dir(run_root).join(id);
    let state = match load(run_root, id) {
        Ok(s) => Some(s),
        Err(SandboxError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut failures = Vec::new();
    if let Some(state) = &state {
        for p in &state.processes {
            match process::kill_and_wait(&p.process, KILL_TIMEOUT) {
                Ok(true) => {}
                Ok(false) => {
                    failures.push(format!("{} [{}] survived SIGKILL", p.name, p.process.pid))
                }
                Err(e) => failures.push(format!("kill {} [{}]: {e}", p.name, p.process.pid)),
            }
        }
        for m in state.mounts.iter().rev() {
            if let Err(e) = unmount(m) {
                failures.push(e.to_string());
            }
        }
        for s in &state.sockets {
            if let Err(e) = fs::remove_file(s) {
                if e.kind() != io::ErrorKind::NotFound {
                    failures.push(format!("remove {}: {e}", s.display()));
                }
            }
        }
        for t in state.taps.iter().filter(|t| t.created) {
            // With its holders dead, a tap we made is gone, unless its netns is too.
            let netns = t.netns.as_deref().filter(|ns| ns.exists());
            if (t.netns.is_none() || netns.is_some())
                && network::interface_exists(netns, &t.name).unwrap_or(false)
            {
                failures.push(format!(
                    "tap {} is still held open by another process",
                    t.name
                ));
            }
        }
        if let Some(ns) = state.netns.as_ref().filter(|ns| ns.owned) {
            if let Err(e) = network::remove_netns(&ns.path) {
                failures.push(e.to_string());
            }
        }
        if let Some(lock) = &state.jail_id {
            if let Err(e) = super::jail::release(lock) {
                failures.push(e.to_string());
            }
        }
        // Last: its processes are dead by now (or draining out of it).
        if let Some(cg) = &state.cgroup {
            if let Err(e) = host_cgroup::remove(cg, host_cgroup::DRAIN_TIMEOUT) {
                failures.push(e.to_string());
            }
        }
    }
    if let Err(e) = fs::remove_dir_all(&dir) {
        if e.kind() != io::ErrorKind::NotFound {
            failures.push(format!("remove {}: {e}", dir.display()));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(SandboxError::State {
            path: dir,
            message: format!("cleanup incomplete: {}", failures.join("; ")),
        })
    }
}

fn unmount(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SandboxError::Invalid(format!("{} contains a NUL byte", path.display())))?;
    // SAFETY: a NUL-terminated path alive for the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // Not mounted (any more), or gone: nothing to undo.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(SandboxError::io(format!("unmount {}", path.display()), e));
        }
    }
    Ok(())
}

/// Cleans up every sandbox whose owner process is gone (a `husk run` or shim that was
/// killed: its children died with it, its mounts and files stayed).
pub fn sweep_orphans(run_root: &Path) {
    let Ok(entries) = fs::read_dir(sandboxes_dir(run_root)) else {
        return;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        // A sandbox being created has no state yet for an instant: leave those alone.
        let Ok(state) = load(run_root, &id) else {
            continue;
        };
        if !state.owner.is_alive() {
            tracing::debug!("cleaning up sandbox {id}, whose owner is gone");
            if let Err(e) = cleanup(run_root, &id) {
                tracing::warn!("{e}");
            }
        }
    }
}
