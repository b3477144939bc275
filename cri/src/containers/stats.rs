//! ContainerStats and friends: a running container's CPU and memory from the shim's Stats
//! (its cgroup in the guest), and its writable layer's use from the upper dir on the host.
//! The CPU rate (nano cores) is the usage since the previous sample of the same container,
//! as containerd computes it; the first sample has none.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use super::{now_ns, Container, ContainerError, ContainerState, Containers};
use crate::shim_client::Shim;

/// One sample of a container's usage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerStats {
    pub timestamp_ns: i64,
    pub cpu_usage_ns: u64,
    /// None on the first sample of a container.
    pub cpu_nano_cores: Option<u64>,
    pub memory_usage_bytes: u64,
    /// What the container may still use before its limit, when it has one.
    pub memory_available_bytes: Option<u64>,
    pub writable_layer_bytes: u64,
    pub writable_layer_inodes: u64,
}

/// The previous CPU sample per container: (timestamp ns, usage ns).
#[derive(Default)]
pub(super) struct CpuSamples(Mutex<HashMap<String, (i64, u64)>>);

impl CpuSamples {
    fn rate(&self, id: &str, ts: i64, usage: u64) -> Option<u64> {
        let mut m = self.0.lock().expect("cpu samples lock");
        let prev = m.insert(id.to_string(), (ts, usage));
        let (pts, pusage) = prev?;
        let dt = ts.checked_sub(pts).filter(|d| *d > 0)? as u128;
        let du = usage.checked_sub(pusage)? as u128;
        Some((du * 1_000_000_000 / dt) as u64)
    }

    pub(super) fn forget(&self, id: &str) {
        self.0.lock().expect("cpu samples lock").remove(id);
    }
}

/// Bytes and inodes under `dir` (not following links, not leaving its filesystem).
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            inodes += 1;
            bytes += md.blocks() * 512;
            if md.is_dir() && md.dev() == root.dev() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

impl Containers {
    /// The stats of one container: a running one is asked through its shim; one that is
    /// not running has none of CPU and memory (zero), only its writable layer.
    pub async fn stats(&self, c: &Container) -> Result<ContainerStats, ContainerError> {
        let (bytes, inodes) = disk_usage(&c.rw_dir.join("upper"));
        let mut s = ContainerStats {
            timestamp_ns: now_ns(),
            writable_layer_bytes: bytes,
            writable_layer_inodes: inodes,
            ..Default::default()
        };
        if c.state != ContainerState::Running {
            return Ok(s);
        }
        let shim = Shim::connect(&c.shim_address).await?;
        let t = shim.stats(&c.id).await?;
        s.timestamp_ns = now_ns();
        s.cpu_usage_ns = t.cpu_usage_usec.saturating_mul(1000);
        s.cpu_nano_cores = self.cpu_samples.rate(&c.id, s.timestamp_ns, s.cpu_usage_ns);
        s.memory_usage_bytes = t.memory_usage_bytes;
        // cgroup v2 reports "max" (no limit) as u64::MAX or 0, by who converts it.
        s.memory_available_bytes = (t.memory_limit_bytes > 0 && t.memory_limit_bytes < 1 << 62)
            .then(|| t.memory_limit_bytes.saturating_sub(t.memory_usage_bytes));
        Ok(s)
    }

    /// One container's stats by id.
    pub async fn stats_of(&self, id: &str) -> Result<(Container, ContainerStats), ContainerError> {
        let c = self
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        let s = self.stats(&c).await?;
        Ok((c, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_rate_comes_from_the_previous_sample() {
        let s = CpuSamples::default();
        assert_eq!(s.rate("a", 1_000_000_000, 0), None);
        // Half a core over 2 s.
        assert_eq!(s.rate("a", 3_000_000_000, 1_000_000_000), Some(500_000_000));
        // A clock that did not move gives no rate, never a division by zero.
        assert_eq!(s.rate("a", 3_000_000_000, 1_000_000_000), None);
        s.forget("a");
        assert_eq!(s.rate("a", 4_000_000_000, 2_000_000_000), None);
    }

    #[test]
    fn disk_usage_counts_files_and_dirs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), vec![1u8; 10_000]).unwrap();
        let (bytes, inodes) = disk_usage(d.path());
        assert_eq!(inodes, 2);
        assert!(bytes >= 10_000, "{bytes}");
        assert_eq!(disk_usage(&d.path().join("none")), (0, 0));
    }
}
