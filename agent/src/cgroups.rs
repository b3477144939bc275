//! A container's cgroup: statistics, limit updates, freezing, OOM counts. The manager
//! (v1 on a legacy or hybrid host, v2 in the guest) is chosen by libcgroups from what is
//! mounted at /sys/fs/cgroup.

use std::path::{Path, PathBuf};

use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, AnyCgroupManager, CgroupConfig, CgroupManager,
    CgroupSetup, ControllerOpt, FreezerState,
};
use oci_spec::runtime::LinuxResources;

use crate::error::{AgentError, Result};
use husk_proto::agent as pb;

/// Cgroup failures.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup manager for {path}: {msg}")]
    Manager { path: PathBuf, msg: String },
    #[error("cgroup {op} on {path}: {msg}")]
    Op {
        op: &'static str,
        path: PathBuf,
        msg: String,
    },
}

impl From<CgroupError> for AgentError {
    fn from(e: CgroupError) -> Self {
        AgentError::Internal(e.to_string())
    }
}

fn manager(path: &Path) -> Result<AnyCgroupManager, CgroupError> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_path_buf(),
        systemd_cgroup: false,
        container_name: String::new(),
    })
    .map_err(|e| CgroupError::Manager {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

fn op_err(op: &'static str, path: &Path, e: impl std::fmt::Display) -> CgroupError {
    CgroupError::Op {
        op,
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// True when the host runs cgroup v1 controllers (legacy or hybrid layout).
pub fn is_v1() -> bool {
    matches!(
        get_cgroup_setup(),
        Ok(CgroupSetup::Legacy | CgroupSetup::Hybrid)
    )
}

/// Reads the statistics of the cgroup at `path` (relative to the cgroup root).
pub fn stats(path: &Path) -> Result<pb::StatsContainerResponse, CgroupError> {
    if !is_v1() {
        return stats_v2(path);
    }
    let s = manager(path)?
        .stats()
        .map_err(|e| op_err("stats", path, e))?;
    // v1's cpuacct counts nanoseconds, v2's cpu.stat microseconds.
    let div = if is_v1() { 1000 } else { 1 };
    let mut out = pb::StatsContainerResponse::new();
    let mut cpu = pb::CpuStats::new();
    cpu.usage_usec = s.cpu.usage.usage_total / div;
    cpu.user_usec = s.cpu.usage.usage_user / div;
    cpu.system_usec = s.cpu.usage.usage_kernel / div;
    cpu.nr_periods = s.cpu.throttling.periods;
    cpu.nr_throttled = s.cpu.throttling.throttled_periods;
    cpu.throttled_usec = s.cpu.throttling.throttled_time / div;
    out.cpu = Some(cpu).into();

    let mut mem = pb::MemoryStats::new();
    mem.usage_bytes = s.memory.memory.usage;
    // Both versions report "no limit" as a huge number.
    mem.limit_bytes = if s.memory.memory.limit >= i64::MAX as u64 / 2 {
        0
    } else {
        s.memory.memory.limit
    };
    mem.max_usage_bytes = s.memory.memory.max_usage;
    mem.anon_bytes = *s
        .memory
        .stats
        .get("anon")
        .or(s.memory.stats.get("rss"))
        .unwrap_or(&0);
    mem.file_bytes = *s
        .memory
        .stats
        .get("file")
        .or(s.memory.stats.get("cache"))
        .unwrap_or(&0);
    mem.oom_kill = oom_kills(path).unwrap_or(0);
    out.memory = Some(mem).into();

    let mut pids = pb::PidsStats::new();
    pids.current = s.pids.current;
    pids.limit = s.pids.limit;
    out.pids = Some(pids).into();

    for d in &s.blkio.service_bytes {
        let e = io_entry(&mut out.io, d.major, d.minor);
        match d.op_type.as_deref() {
            Some("Read" | "read") => e.read_bytes = d.value,
            Some("Write" | "write") => e.write_bytes = d.value,
            _ => {}
        }
    }
    for d in &s.blkio.serviced {
        let e = io_entry(&mut out.io, d.major, d.minor);
        match d.op_type.as_deref() {
            Some("Read" | "read") => e.read_ios = d.value,
            Some("Write" | "write") => e.write_ios = d.value,
            _ => {}
        }
    }
    Ok(out)
}

/// Statistics of a v2 cgroup, read from its files. Not libcgroups' v2 `stats()`: that also
/// reads `cpu.pressure` and fails as a whole on a kernel without PSI, as the guest's is.
fn stats_v2(path: &Path) -> Result<pb::StatsContainerResponse, CgroupError> {
    let dir = memory_dir(path);
    if !dir.is_dir() {
        return Err(op_err("stats", path, "no such cgroup"));
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    // "key value" lines (cpu.stat, memory.stat).
    let flat = |f: &str| -> std::collections::HashMap<String, u64> {
        read(f)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    };
    // A single value; "max" (no limit) and absent files are 0.
    let single = |f: &str| read(f).trim().parse::<u64>().unwrap_or(0);
    let mut out = pb::StatsContainerResponse::new();
    let c = flat("cpu.stat");
    let get = |m: &std::collections::HashMap<String, u64>, k: &str| *m.get(k).unwrap_or(&0);
    let mut cpu = pb::CpuStats::new();
    cpu.usage_usec = get(&c, "usage_usec");
    cpu.user_usec = get(&c, "user_usec");
    cpu.system_usec = get(&c, "system_usec");
    cpu.nr_periods = get(&c, "nr_periods");
    cpu.nr_throttled = get(&c, "nr_throttled");
    cpu.throttled_usec = get(&c, "throttled_usec");
    out.cpu = Some(cpu).into();
    let m = flat("memory.stat");
    let mut mem = pb::MemoryStats::new();
    mem.usage_bytes = single("memory.current");
    mem.limit_bytes = single("memory.max");
    mem.max_usage_bytes = single("memory.peak");
    mem.anon_bytes = get(&m, "anon");
    mem.file_bytes = get(&m, "file");
    mem.oom_kill = oom_kills(path).unwrap_or(0);
    out.memory = Some(mem).into();
    let mut pids = pb::PidsStats::new();
    pids.current = single("pids.current");
    pids.limit = single("pids.max");
    out.pids = Some(pids).into();
    // "MAJ:MIN rbytes=1 wbytes=2 rios=3 wios=4 ..."
    for line in read("io.stat").lines() {
        let mut f = line.split_whitespace();
        let Some((major, minor)) = f.next().and_then(|d| d.split_once(':')) else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        let e = io_entry(&mut out.io, major, minor);
        for kv in f {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let v = v.parse().unwrap_or(0);
            match k {
                "rbytes" => e.read_bytes = v,
                "wbytes" => e.write_bytes = v,
                "rios" => e.read_ios = v,
                "wios" => e.write_ios = v,
                _ => {}
            }
        }
    }
    Ok(out)
}

fn io_entry(v: &mut Vec<pb::IoDeviceStats>, major: u64, minor: u64) -> &mut pb::IoDeviceStats {
    let i = match v.iter().position(|d| d.major == major && d.minor == minor) {
        Some(i) => i,
        None => {
            let mut d = pb::IoDeviceStats::new();
            d.major = major;
            d.minor = minor;
            v.push(d);
            v.len() - 1
        }
    };
    &mut v[i]
}

/// Applies new limits.
pub fn update(path: &Path, resources: &LinuxResources) -> Result<(), CgroupError> {
    manager(path)?
        .apply(&ControllerOpt {
            resources,
            disable_oom_killer: resources
                .memory()
                .as_ref()
                .and_then(|m| m.disable_oom_killer())
                .unwrap_or(false),
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| op_err("update", path, e))
}

/// Freezes or thaws.
pub fn freeze(path: &Path, frozen: bool) -> Result<(), CgroupError> {
    let state = if frozen {
        FreezerState::Frozen
    } else {
        FreezerState::Thawed
    };
    manager(path)?
        .freeze(state)
        .map_err(|e| op_err("freeze", path, e))
}

/// Removes the (empty) cgroup.
pub fn remove(path: &Path) -> Result<(), CgroupError> {
    manager(path)?
        .remove()
        .map_err(|e| op_err("remove", path, e))
}

/// Pids in the cgroup.
pub fn pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
    Ok(manager(path)?
        .get_all_pids()
        .map_err(|e| op_err("list pids", path, e))?
        .into_iter()
        .map(|p| p.as_raw())
        .collect())
}

/// Where the memory controller's files for `path` live.
pub fn memory_dir(path: &Path) -> PathBuf {
    let rel = path.strip_prefix("/").unwrap_or(path);
    if is_v1() {
        Path::new("/sys/fs/cgroup/memory").join(rel)
    } else {
        Path::new("/sys/fs/cgroup").join(rel)
    }
}

/// The kernel's count of OOM kills in the cgroup (v2 memory.events, v1 memory.oom_control).
pub fn oom_kills(path: &Path) -> Option<u64> {
    let dir = memory_dir(path);
    let text = std::fs::read_to_string(dir.join("memory.events"))
        .or_else(|_| std::fs::read_to_string(dir.join("memory.oom_control")))
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// Removes the (empty) per-sandbox parent cgroup `/husk/<sandbox>` in every hierarchy.
pub fn remove_sandbox_parent(sandbox_id: &str) {
    let rel = format!("husk/{sandbox_id}");
    let mut dirs = vec![Path::new("/sys/fs/cgroup").join(&rel)];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        dirs.extend(rd.flatten().map(|e| e.path().join(&rel)));
    }
    for d in dirs {
        if d.is_dir() {
            if let Err(e) = std::fs::remove_dir(&d) {
                tracing::warn!(dir = %d.display(), "remove sandbox cgroup: {e}");
            }
        }
    }
}
