//! What a test containerd and its pods can leave on the host, narrowed to what is theirs
//! (other engineers' VMs and taps on the same host must not fail these tests): shim
//! processes started for this containerd's socket, pause processes, mounts under its
//! directory, CNI network namespaces and veths. Plus the sweep that removes
//! such leftovers when a test failed half-way.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// A snapshot of the host state one test containerd could leak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostState {
    pub shims: BTreeSet<String>,
    pub pause: BTreeSet<String>,
    pub mounts: BTreeSet<String>,
    pub netns: BTreeSet<String>,
    pub links: BTreeSet<String>,
    /// Pod cgroups left under the harness's cgroup parent (any hierarchy).
    pub cgroups: BTreeSet<String>,
    /// Sockets of husk shims (`<husk run root>/s`), pod share directories and sandbox state
    /// files (`<husk run root>/sandbox`).
    pub husk_shim: BTreeSet<String>,
    /// The husk leak snapshot (husk-vmm and virtiofsd processes, husk's VM run dirs).
    pub husk: BTreeSet<String>,
}

fn processes() -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        out.push((pid, comm.trim().to_string(), cmdline));
    }
    out
}

/// Shims (ours or runc's) serving containerd at `socket`: their command line names it.
fn shim_pids(socket: &Path) -> Vec<(u32, String)> {
    let sock = socket.to_string_lossy();
    processes()
        .into_iter()
        .filter(|(_, comm, cmd)| comm.starts_with("containerd-shim") && cmd.contains(&*sock))
        .map(|(pid, comm, _)| (pid, comm))
        .collect()
}

fn husk_processes() -> BTreeSet<String> {
    processes()
        .into_iter()
        .filter(|(_, comm, _)| comm == "husk-vmm" || comm.starts_with("virtiofsd"))
        .map(|(pid, comm, _)| format!("{comm}[{pid}]"))
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .filter(|m| m.starts_with(&*dir) || m.starts_with("/run/netns/cni-"))
        .collect()
}

fn names(dir: &str, keep: impl Fn(&str) -> bool) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| keep(n))
        .collect()
}

impl HostState {
    /// The state now, for the containerd in `dir` serving `socket`. (Its bridge is not in
    /// it: CNI's bridge plugin makes it at the first pod and never removes it; the harness
    /// does, when it stops.)
    pub fn take(dir: &Path, socket: &Path, cgroup_parent: &str) -> HostState {
        HostState {
            shims: shim_pids(socket)
                .into_iter()
                .map(|(pid, comm)| format!("{comm}[{pid}]"))
                .collect(),
            pause: processes()
                .into_iter()
                .filter(|(_, comm, _)| comm == "pause")
                .map(|(pid, _, _)| format!("pause[{pid}]"))
                .collect(),
            mounts: mounts_under(dir).into_iter().collect(),
            netns: names("/run/netns", |n| n.starts_with("cni-")),
            links: names("/sys/class/net", |n| n.starts_with("veth")),
            cgroups: cgroup_dirs(cgroup_parent)
                .into_iter()
                .flat_map(|d| {
                    names(&d.to_string_lossy(), |_| true)
                        .into_iter()
                        .filter(|n| d.join(n).is_dir())
                        .map(|n| format!("{}/{n}", d.display()))
                        .collect::<Vec<_>>()
                })
                .collect(),
            husk_shim: ["s", "share", "sandbox", "shim"]
                .iter()
                .flat_map(|d| {
                    let dir = husk_shim::paths::run_root().join(d);
                    names(&dir.to_string_lossy(), |_| true)
                        .into_iter()
                        .map(move |n| format!("{d}/{n}"))
                })
                .collect(),
            husk: husk_processes()
                .into_iter()
                .chain(names(
                    &husk_shim::paths::run_root().join("vm").to_string_lossy(),
                    |_| true,
                ))
                .collect(),
        }
    }

    /// Panics with what differs unless the host gets back to `self` within 15 s (shims
    /// exit after containerd's Shutdown, which is asynchronous to RemovePodSandbox).
    pub fn assert_back_to(&self, now: impl Fn() -> HostState) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let n = now();
            if n == *self {
                return;
            }
            if Instant::now() > deadline {
                let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
                    b.symmetric_difference(a).cloned().collect::<Vec<_>>()
                };
                panic!(
                    "host state differs: shims {:?}, pause {:?}, mounts {:?}, netns {:?}, \
                     links {:?}, cgroups {:?}, husk shim {:?}, husk {:?}",
                    diff(&self.shims, &n.shims),
                    diff(&self.pause, &n.pause),
                    diff(&self.mounts, &n.mounts),
                    diff(&self.netns, &n.netns),
                    diff(&self.links, &n.links),
                    diff(&self.cgroups, &n.cgroups),
                    diff(&self.husk_shim, &n.husk_shim),
                    diff(&self.husk, &n.husk),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `cgroup_parent` in every mounted hierarchy where it exists.
fn cgroup_dirs(cgroup_parent: &str) -> Vec<std::path::PathBuf> {
    let rel = cgroup_parent.trim_start_matches('/');
    if rel.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let d = e.path().join(rel);
        if d.is_dir() {
            out.push(d);
        }
    }
    out
}

/// Removes what a stopped containerd left: its shims (SIGKILL), mounts under `dir`
/// (deepest first, detached), `bridge`, and the (then empty) pod cgroup parent. Returns a
/// line for each thing that was left when it should not have been.
pub fn sweep(dir: &Path, socket: &Path, bridge: &str, cgroup_parent: &str) -> Vec<String> {
    let mut swept = Vec::new();
    for (pid, comm) in shim_pids(socket) {
        // SAFETY: a signal to a process that serves only this test's containerd.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        swept.push(format!("killed {comm}[{pid}]"));
    }
    let mut mounts: Vec<String> = mounts_under(dir)
        .into_iter()
        .filter(|m| !m.starts_with("/run/netns/"))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let c = std::ffi::CString::new(m.clone()).expect("mount path without NUL");
        // SAFETY: unmounting a path under our own test directory.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        swept.push(format!("unmounted {m}"));
    }
    // The parent itself stays after its pods (runc removes only their own cgroups).
    for d in cgroup_dirs(cgroup_parent) {
        if std::fs::remove_dir(&d).is_err() {
            swept.push(format!("cgroup {} not empty", d.display()));
        }
    }
    if Path::new("/sys/class/net").join(bridge).exists() {
        let st = std::process::Command::new("ip")
            .args(["link", "del", bridge])
            .status();
        if !matches!(st, Ok(s) if s.success()) {
            swept.push(format!("could not delete bridge {bridge}"));
        }
    }
    swept
}
