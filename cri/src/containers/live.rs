//! Calls on a live container that change it in place: UpdateContainerResources (the new
//! limits go to the shim's Update as OCI LinuxResources, which the agent writes into the
//! container's cgroup in the guest) and ReopenContainerLog (kubelet's log rotation).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use tracing::info;

use super::{io_err, ContainerError, ContainerState, Containers};
use crate::logs;
use crate::shim_client::Shim;

/// New resource limits for a container (CRI's LinuxContainerResources; 0 or empty: unset).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub cpu_period: i64,
    pub cpu_quota: i64,
    pub cpu_shares: i64,
    pub memory_limit_bytes: i64,
    pub memory_swap_limit_bytes: i64,
    pub cpuset_cpus: String,
    pub cpuset_mems: String,
    /// (page size, e.g. "2MB", limit in bytes)
    pub hugepage_limits: Vec<(String, u64)>,
    pub unified: BTreeMap<String, String>,
}

impl Resources {
    /// As OCI LinuxResources JSON for the container's cgroup in the guest, with only what is
    /// set (an unset field keeps its value). Not passed, as Kata does not: cpusets (kubelet's
    /// CPU manager numbers the host's CPUs and NUMA nodes; the guest's vCPUs are its own),
    /// and hugepage limits of 0 (kubelet sends one for every page size of the node; the
    /// guest kernel has no hugetlbfs, so nothing in it can use huge pages anyway).
    pub fn to_oci(&self) -> Value {
        let mut r = Map::new();
        let mut cpu = Map::new();
        for (k, v) in [
            ("period", self.cpu_period),
            ("quota", self.cpu_quota),
            ("shares", self.cpu_shares),
        ] {
            if v > 0 {
                cpu.insert(k.into(), v.into());
            }
        }
        if !cpu.is_empty() {
            r.insert("cpu".into(), cpu.into());
        }
        let mut mem = Map::new();
        if self.memory_limit_bytes > 0 {
            mem.insert("limit".into(), self.memory_limit_bytes.into());
        }
        if self.memory_swap_limit_bytes > 0 {
            mem.insert("swap".into(), self.memory_swap_limit_bytes.into());
        }
        if !mem.is_empty() {
            r.insert("memory".into(), mem.into());
        }
        let l: Vec<Value> = self
            .hugepage_limits
            .iter()
            .filter(|(_, limit)| *limit > 0)
            .map(|(size, limit)| json!({"pageSize": size, "limit": limit}))
            .collect();
        if !l.is_empty() {
            r.insert("hugepageLimits".into(), l.into());
        }
        if !self.unified.is_empty() {
            r.insert("unified".into(), json!(self.unified));
        }
        Value::Object(r)
    }
}

impl Containers {
    /// UpdateContainerResources: for a created or running container.
    pub async fn update_resources(&self, id: &str, r: &Resources) -> Result<(), ContainerError> {
        let c = self
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if c.state == ContainerState::Exited {
            return Err(ContainerError::State {
                id: id.into(),
                state: c.state,
                call: "UpdateContainerResources",
                want: "created or running",
            });
        }
        if r.memory_limit_bytes < 0 || r.cpu_quota < -1 || r.cpu_shares < 0 || r.cpu_period < 0 {
            return Err(ContainerError::InvalidConfig(format!(
                "negative resource limits: {r:?}"
            )));
        }
        let shim = Shim::connect(&c.shim_address).await?;
        shim.update(id, &r.to_oci()).await?;
        info!(container = %id, "resources updated");
        Ok(())
    }

    /// ReopenContainerLog: once this returns, the container's output goes to a new file at
    /// its log path and the old file gets no more writes.
    pub fn reopen_log(&self, id: &str) -> Result<(), ContainerError> {
        let t = self.table.lock().expect("containers lock");
        let s = t
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if s.c.state != ContainerState::Running {
            return Err(ContainerError::State {
                id: id.into(),
                state: s.c.state,
                call: "ReopenContainerLog",
                want: "running",
            });
        }
        let (Some(path), Some(file)) = (&s.c.log_path, &s.log_file) else {
            // No log file (no log directory or path): nothing to reopen.
            return Ok(());
        };
        logs::reopen(file, path).map_err(io_err(format!("reopen the log {}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_set_resources_reach_the_oci_json() {
        assert_eq!(Resources::default().to_oci(), json!({}));
        let r = Resources {
            cpu_quota: 50_000,
            cpu_period: 100_000,
            memory_limit_bytes: 64 << 20,
            unified: [("pids.max".to_string(), "100".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            r.to_oci(),
            json!({
                "cpu": {"quota": 50000, "period": 100000},
                "memory": {"limit": 67108864},
                "unified": {"pids.max": "100"}
            })
        );
    }

    #[test]
    fn host_cpusets_and_zero_hugepage_limits_stay_out_of_the_guest() {
        // What kubelet sends with its static CPU manager on a node with two page sizes.
        let r = Resources {
            cpu_shares: 512,
            cpuset_cpus: "2-3".into(),
            cpuset_mems: "0".into(),
            hugepage_limits: vec![("2MB".into(), 0), ("1GB".into(), 0)],
            ..Default::default()
        };
        assert_eq!(r.to_oci(), json!({"cpu": {"shares": 512}}));
        let asked = Resources {
            hugepage_limits: vec![("2MB".into(), 0), ("1GB".into(), 1 << 30)],
            ..Default::default()
        };
        assert_eq!(
            asked.to_oci(),
            json!({"hugepageLimits": [{"pageSize": "1GB", "limit": 1073741824}]})
        );
    }
}
