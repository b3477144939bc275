//! A sandbox's host resources on disk, so that `delete` (a fresh process, run by containerd
//! after our shim died) can remove what the dead shim owned: the VMM and virtiofsd (by pid
//! *and* start time, so a recycled pid is never killed), the host mounts of the containers'
//! rootfs and volumes, the pod's share directory and the VM's run directory.
//!
//! One JSON file per sandbox, `<run root>/shim/<namespace>.<sandbox id>.json`, rewritten
//! (write aside + rename) whenever the set changes, removed at a clean teardown. Kept apart
//! from `vm_runtime.rs` so the sandbox layer (issue 9's `state.json`) can take it over.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// A process the sandbox started, as it can be recognised again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot): with the pid, unique.
    pub start_time: u64,
    /// For the logs only.
    pub comm: String,
}

/// What to remove when the shim that made the sandbox is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub sandbox_id: String,
    pub processes: Vec<Proc>,
    /// The VM's run directory (sockets, logs).
    pub vm_dir: PathBuf,
    /// The pod's shared directory (exported by virtiofsd).
    pub share: PathBuf,
    /// Host mount points, in the order they were made (unmounted in reverse).
    pub mounts: Vec<PathBuf>,
}

/// The state file of `sandbox_id` in containerd namespace `namespace`.
pub fn path(namespace: &str, sandbox_id: &str) -> PathBuf {
    // Not under the sandbox layer's `sandbox/`, whose entries are its sandboxes.
    crate::paths::run_root()
        .join("shim")
        .join(format!("{namespace}.{sandbox_id}.json"))
}

impl SandboxState {
    /// Writes the state atomically (a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let data = serde_json::to_vec_pretty(self).map_err(|e| Error::Other(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    /// The state at `path`; `None` when there is none (a clean teardown removed it).
    pub fn load(path: &Path) -> Result<Option<SandboxState>> {
        match std::fs::read(path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }
}

/// `/proc/<pid>/stat`'s start time, if `pid` exists.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The comm field may hold spaces and parentheses: count from the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// `pid` as a [`Proc`], if it runs.
pub fn proc_of(pid: u32) -> Option<Proc> {
    Some(Proc {
        pid,
        start_time: start_time(pid)?,
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string(),
    })
}

/// Processes whose command line mentions `needle` (virtiofsd is started with a socket under
/// the VM's run directory; `vm.rs` does not hand out its pid).
pub fn processes_mentioning(needle: &str) -> Vec<Proc> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .filter_map(proc_of)
        .collect()
}

/// Whether `p` is still the process that was recorded.
fn alive(p: &Proc) -> bool {
    start_time(p.pid) == Some(p.start_time)
}

/// Removes everything the state names, then the state file. Best effort: each failure is
/// logged and the rest still done.
pub fn cleanup(path: &Path) {
    let state = match SandboxState::load(path) {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("sandbox state: {e}");
            return;
        }
    };
    tracing::info!(sandbox = %state.sandbox_id, "cleaning up after a dead shim");
    for p in state.processes.iter().filter(|p| alive(p)) {
        tracing::info!(pid = p.pid, comm = %p.comm, "killing a dead shim's process");
        // SAFETY: kill(2) of a pid whose start time was just checked to be the recorded one.
        unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
    }
    // Their parent (the shim) is gone: init reaps them. Wait until they are.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.processes.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for m in state.mounts.iter().rev() {
        if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                tracing::warn!("unmount {}: {e}", m.display());
            }
        }
    }
    if !state.share.as_os_str().is_empty() {
        super::vm_runtime::remove_share(&state.share);
    }
    if !state.vm_dir.as_os_str().is_empty() {
        if let Err(e) = std::fs::remove_dir_all(&state.vm_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("remove {}: {e}", state.vm_dir.display());
            }
        }
    }
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!("remove {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_cleanup_kills_only_the_recorded_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir_all(share.join("c1")).unwrap();
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let mut stale = proc_of(child.id()).unwrap();
        stale.start_time += 1;
        let state = SandboxState {
            sandbox_id: "sb".into(),
            processes: vec![stale],
            vm_dir: vm_dir.clone(),
            share: share.clone(),
            mounts: vec![],
        };
        let path = dir.path().join("ns.sb.json");
        state.save(&path).unwrap();
        assert_eq!(SandboxState::load(&path).unwrap(), Some(state.clone()));
        // A recorded pid with another start time is a recycled pid: left alone.
        cleanup(&path);
        assert!(
            child.try_wait().unwrap().is_none(),
            "a recycled pid was killed"
        );
        assert!(!path.exists() && !share.exists() && !vm_dir.exists());

        let state = SandboxState {
            processes: vec![proc_of(child.id()).unwrap()],
            ..state
        };
        state.save(&path).unwrap();
        let t = Instant::now();
        // Not reaped by init here (we are its parent): reap it from another thread.
        let waiter = std::thread::spawn(move || child.wait().unwrap());
        cleanup(&path);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(waiter.join().unwrap().signal(), Some(libc::SIGKILL));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(SandboxState::load(&path).unwrap(), None);
    }
}
