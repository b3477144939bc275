//! The sandbox's cgroup on the host, so that a pod's overhead (its shim, husk-vmm and
//! virtiofsd) is accounted to the pod, as Kata's `sandbox_cgroup_only` does.
//!
//! The sandbox container's OCI `linux.cgroupsPath` names it: containerd's CRI plugin with the
//! cgroupfs driver gives `<cgroup_parent>/<sandbox id>`, plain `ctr run` `/<namespace>/<id>`.
//! That cgroup is made a leaf holding all three processes: cgroup v2's "no internal
//! processes" rule forbids processes in a cgroup whose children have controllers enabled, and
//! a VM runtime has no host cgroups of its own below the sandbox's (the containers' cgroups
//! are in the guest). Its ancestors get every available controller enabled for their
//! children, as runc does, so that the leaf's memory, CPU and pids are counted.
//!
//! The systemd driver's `slice:prefix:name` form (containerd with `SystemdCgroup = true`,
//! huskd with `cgroup_driver = "systemd"`) names the same place systemd would create: the
//! slice expanded into its parents (`kubepods-burstable-pod1.slice` is
//! `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice`) and the scope
//! `<prefix>-<name>.scope` in it. The directories are made directly in the cgroup
//! filesystem, as runc's cgroupfs manager would, not through systemd's D-Bus API: no systemd
//! runs where husk is tested, and on a systemd host kubelet has already created the slices.
//!
//! Only the unified cgroup v2 hierarchy mounted at `/sys/fs/cgroup` is supported; a v1 or
//! hybrid host is refused with an error that says so.
//!
//! The owner (the shim) moves itself in before it starts the VM, so that the VMM and
//! virtiofsd are born there, and out again (back to where it came from) before removing the
//! cgroup: a populated cgroup cannot be removed.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Result, SandboxError};

/// Where the unified hierarchy must be mounted.
pub const CGROUP2_MOUNT: &str = "/sys/fs/cgroup";
/// How long removal waits for the cgroup's last processes to leave it.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The sandbox's host cgroup, as recorded in its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupRecord {
    /// The cgroup's directory (absolute, in the cgroup2 mount).
    pub path: PathBuf,
    /// The directory of the cgroup the owner came from, where it goes back before removal.
    pub return_to: PathBuf,
}

fn err(message: impl Into<String>) -> SandboxError {
    SandboxError::Cgroup(message.into())
}

/// The cgroup2 mount point at `/sys/fs/cgroup`, or an error saying what this host has
/// instead (read from `mountinfo`, the text of `/proc/self/mountinfo`).
pub fn unified_mount(mountinfo: &str) -> Result<PathBuf> {
    let mut v2 = Vec::new();
    let mut v1 = false;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let (Some(point), Some(fstype)) = (
            left.split_whitespace().nth(4),
            right.split_whitespace().next(),
        ) else {
            continue;
        };
        match fstype {
            "cgroup2" => v2.push(point.to_string()),
            "cgroup" => v1 = true,
            _ => {}
        }
    }
    if v2.iter().any(|p| p == CGROUP2_MOUNT) && !v1 {
        return Ok(PathBuf::from(CGROUP2_MOUNT));
    }
    let what = match (v1, v2.first()) {
        (true, Some(p)) => format!("hybrid cgroups (v1 controllers, cgroup2 at {p})"),
        (true, None) => "cgroup v1 only".to_string(),
        (false, Some(p)) => format!("cgroup2 at {p}, not at {CGROUP2_MOUNT}"),
        (false, None) => "no cgroup filesystem mounted".to_string(),
    };
    Err(err(format!(
        "pod cgroups need the unified cgroup v2 hierarchy at {CGROUP2_MOUNT}; this host has \
         {what}. Boot the host with cgroup v2 (systemd.unified_cgroup_hierarchy=1), or run \
         the pod without a cgroupsPath"
    )))
}

/// `cgroupsPath` of an OCI spec as a path relative to the hierarchy's root. Absolute and
/// relative paths both start at the root (as runc's cgroupfs driver takes them); the
/// systemd driver's `slice:prefix:name` is expanded as systemd lays it out.
pub fn parse_cgroups_path(cgroups_path: &str) -> Result<PathBuf> {
    if cgroups_path.contains(':') {
        return systemd_path(cgroups_path);
    }
    let mut rel = PathBuf::new();
    for c in Path::new(cgroups_path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(err(format!(
                    "cgroupsPath {cgroups_path:?} must not contain '..'"
                )))
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(err(format!(
            "cgroupsPath {cgroups_path:?} names the root cgroup, not a pod's"
        )));
    }
    Ok(rel)
}

/// `slice:prefix:name` as a path: the slice's ancestors, the slice, and `prefix-name.scope`.
fn systemd_path(cgroups_path: &str) -> Result<PathBuf> {
    let bad = |why: &str| {
        err(format!(
            "cgroupsPath {cgroups_path:?} is not the systemd driver's slice:prefix:name ({why})"
        ))
    };
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("three fields"));
    };
    let unit_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
            && s != "."
            && s != ".."
    };
    if !unit_ok(prefix) || !unit_ok(name) {
        return Err(bad("prefix and name: letters, digits, - _ . @"));
    }
    let mut rel = PathBuf::new();
    let slice = if slice.is_empty() { "-.slice" } else { slice };
    if slice != "-.slice" {
        let stem = slice
            .strip_suffix(".slice")
            .filter(|s| unit_ok(s) && !s.starts_with('-') && !s.ends_with('-'))
            .filter(|s| !s.contains("--"))
            .ok_or_else(|| bad("a slice is <name>.slice, with '-' between its parents' names"))?;
        // "a-b-c.slice" lives in "a.slice/a-b.slice/".
        let mut prefix_of_parent = String::new();
        for part in stem.split('-') {
            if !prefix_of_parent.is_empty() {
                prefix_of_parent.push('-');
            }
            prefix_of_parent.push_str(part);
            rel.push(format!("{prefix_of_parent}.slice"));
        }
    }
    rel.push(format!("{prefix}-{name}.scope"));
    Ok(rel)
}

/// The cgroup directory of process `pid` (`"self"` for ours) in the hierarchy at `mount`.
pub fn cgroup_of(mount: &Path, pid: &str) -> Result<PathBuf> {
    let file = format!("/proc/{pid}/cgroup");
    let text =
        fs::read_to_string(&file).map_err(|e| SandboxError::io(format!("read {file}"), e))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| err(format!("{file} has no cgroup v2 line")))?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Makes `rel` (and its missing ancestors) under `mount`, enabling every controller each
/// ancestor offers for its children, best effort (a controller that cannot be enabled, e.g.
/// under an ancestor that holds processes itself, is logged and only not accounted).
pub fn create(mount: &Path, rel: &Path) -> Result<PathBuf> {
    let mut dir = mount.to_path_buf();
    for c in rel.components() {
        enable_controllers(&dir);
        dir.push(c);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(SandboxError::io(format!("create {}", dir.display()), e)),
        }
    }
    Ok(dir)
}

fn enable_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in available.split_whitespace() {
        if enabled.split_whitespace().any(|e| e == c) {
            continue;
        }
        if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::warn!(
                "cannot enable the {c} controller below {}: {e}",
                dir.display()
            );
        }
    }
}

/// Moves process `pid` (all its threads) into the cgroup at `dir`.
pub fn enter(dir: &Path, pid: u32) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, pid.to_string())
        .map_err(|e| SandboxError::io(format!("move process {pid} into {}", dir.display()), e))
}

/// Makes the cgroup `rel` under `mount` and moves this process into it. `record_first` gets
/// the record before anything exists, so that an owner killed half-way leaves it on disk.
pub fn create_and_enter(
    mount: &Path,
    rel: &Path,
    record_first: impl FnOnce(&CgroupRecord) -> Result<()>,
) -> Result<CgroupRecord> {
    let record = CgroupRecord {
        path: mount.join(rel),
        return_to: cgroup_of(mount, "self")?,
    };
    record_first(&record)?;
    create(mount, rel)?;
    enter(&record.path, std::process::id())?;
    Ok(record)
}

/// For a sandbox whose spec has `cgroups_path`: checks this host's hierarchy and the path,
/// then [`create_and_enter`].
pub fn enter_pod_cgroup(
    cgroups_path: &str,
    record_first: impl FnOnce(&CgroupRecord) -> Result<()>,
) -> Result<CgroupRecord> {
    let rel = parse_cgroups_path(cgroups_path)?;
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SandboxError::io("read /proc/self/mountinfo", e))?;
    let mount = unified_mount(&info)?;
    let record = create_and_enter(&mount, &rel, record_first)?;
    tracing::debug!(cgroup = %record.path.display(), "in the pod's host cgroup");
    Ok(record)
}

/// Removes the sandbox's cgroup once its processes have left it: this process goes back to
/// `return_to` first if it is inside; others (a VMM being killed) get `timeout` to drain.
/// Gone already is fine.
pub fn remove(record: &CgroupRecord, timeout: Duration) -> Result<()> {
    if !record.path.exists() {
        return Ok(());
    }
    let mount = record
        .path
        .ancestors()
        .find(|a| a.join("cgroup.controllers").exists() && !a.join("cgroup.type").exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(CGROUP2_MOUNT));
    if cgroup_of(&mount, "self").is_ok_and(|c| c == record.path) {
        let me = std::process::id();
        // Back where we came from; if that went meanwhile, to the root (always allowed).
        if let Err(e) = enter(&record.return_to, me) {
            tracing::warn!("{e}; moving to the root cgroup instead");
            enter(&mount, me)?;
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        match fs::remove_dir(&record.path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                // Killed processes leave the cgroup as they exit; this runs on blocking
                // threads (teardown, `delete`), never on an async one.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                let left = fs::read_to_string(record.path.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                return Err(SandboxError::io(
                    format!(
                        "remove the pod cgroup {} (processes still in it: [{left}])",
                        record.path.display()
                    ),
                    e,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::Mutex;

    /// Tests that move this test process between cgroups run one at a time.
    static MOVES: Mutex<()> = Mutex::new(());

    #[test]
    fn cgroups_paths_are_checked() {
        assert_eq!(
            parse_cgroups_path("/kubepods/pod1/abc").unwrap(),
            PathBuf::from("kubepods/pod1/abc")
        );
        assert_eq!(
            parse_cgroups_path("default/x").unwrap(),
            PathBuf::from("default/x")
        );
        assert_eq!(
            parse_cgroups_path("kubepods-burstable-pod1.slice:husk:abc").unwrap(),
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/husk-abc.scope"
            )
        );
        assert_eq!(
            parse_cgroups_path("system.slice:cri-containerd:abc").unwrap(),
            Path::new("system.slice/cri-containerd-abc.scope")
        );
        assert_eq!(
            parse_cgroups_path(":husk:abc").unwrap(),
            Path::new("husk-abc.scope")
        );
        for bad in [
            "kubepods.slice:husk",
            "kubepods.slice:husk:a:b",
            "kubepods:husk:abc",
            "a--b.slice:husk:abc",
            "-a.slice:husk:abc",
            "../x.slice:husk:abc",
            "kubepods.slice:husk:../../etc",
            "kubepods.slice::abc",
        ] {
            let e = parse_cgroups_path(bad).unwrap_err();
            assert!(e.to_string().contains("systemd"), "{bad}: {e}");
        }
        assert!(parse_cgroups_path("/a/../b").is_err());
        assert!(parse_cgroups_path("/").is_err());
    }

    #[test]
    fn only_a_unified_hierarchy_at_sys_fs_cgroup_is_taken() {
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(unified_mount(v2).unwrap(), PathBuf::from(CGROUP2_MOUNT));
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let e = unified_mount(hybrid).unwrap_err().to_string();
        assert!(
            e.contains("hybrid") && e.contains("/sys/fs/cgroup/unified"),
            "{e}"
        );
        let e = unified_mount("").unwrap_err().to_string();
        assert!(e.contains("no cgroup filesystem"), "{e}");
    }

    /// A writable cgroup2 mount on this host: `/sys/fs/cgroup` on a v2 host, the hybrid
    /// layout's `/sys/fs/cgroup/unified` otherwise. These tests need root and one of them;
    /// without, they fail saying so rather than pass without testing anything.
    fn writable_cgroup2() -> PathBuf {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = info
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next()? == "cgroup2")
                    .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
            })
            .next()
            .expect("this host has no cgroup2 mount: the host cgroup tests cannot run");
        let probe = mount.join(format!("husk-probe-{}", std::process::id()));
        match fs::create_dir(&probe) {
            Ok(()) => fs::remove_dir(&probe).unwrap(),
            Err(e) => panic!(
                "the cgroup2 mount {} is not writable here ({e}): the host cgroup tests need \
                 root and a writable cgroup2",
                mount.display()
            ),
        }
        mount
    }

    fn procs(dir: &Path) -> Vec<u32> {
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    #[test]
    fn the_owner_and_its_children_enter_and_the_owner_leaves_before_removal() {
        let _one = MOVES.lock().unwrap_or_else(|e| e.into_inner());
        let mount = writable_cgroup2();
        let parent = format!("husk-test-{}", std::process::id());
        let rel = PathBuf::from(&parent).join("pod-a");
        let before = cgroup_of(&mount, "self").unwrap();

        let mut recorded = None;
        let rec = create_and_enter(&mount, &rel, |r| {
            assert!(!r.path.exists(), "recorded before it is made");
            recorded = Some(r.clone());
            Ok(())
        })
        .unwrap();
        assert_eq!(recorded.as_ref(), Some(&rec));
        assert_eq!(rec.path, mount.join(&rel));
        assert_eq!(rec.return_to, before);
        assert_eq!(cgroup_of(&mount, "self").unwrap(), rec.path);
        // A child forked now is born in it (as the VMM and virtiofsd are).
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(
            cgroup_of(&mount, &child.id().to_string()).unwrap(),
            rec.path
        );
        assert!(procs(&rec.path).contains(&child.id()));

        // A live process keeps it: removal gives up after the timeout and says who is in.
        let e = remove(&rec, Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains(&child.id().to_string()), "{e}");
        // ... after this process went back where it came from.
        assert_eq!(cgroup_of(&mount, "self").unwrap(), before);

        child.kill().unwrap();
        child.wait().unwrap();
        remove(&rec, DRAIN_TIMEOUT).unwrap();
        assert!(!rec.path.exists());
        // Removed twice: nothing to do.
        remove(&rec, DRAIN_TIMEOUT).unwrap();
        // The parent stays (shared by pods, as runc leaves it); the test removes it.
        fs::remove_dir(mount.join(&parent)).unwrap();
    }

    #[test]
    fn a_process_of_a_dead_owner_drains_before_removal() {
        let mount = writable_cgroup2();
        let rel = PathBuf::from(format!("husk-test-drain-{}", std::process::id()));
        let dir = create(&mount, &rel).unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        enter(&dir, child.id()).unwrap();
        assert_eq!(procs(&dir), vec![child.id()]);
        let rec = CgroupRecord {
            path: dir.clone(),
            return_to: mount.clone(),
        };
        // Killed and reaped from another thread while removal waits.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            child.kill().unwrap();
            child.wait().unwrap();
        });
        remove(&rec, DRAIN_TIMEOUT).unwrap();
        killer.join().unwrap();
        assert!(!dir.exists());
    }
}
