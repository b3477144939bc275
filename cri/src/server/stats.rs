//! The stats calls of the RuntimeService: ContainerStats, ListContainerStats,
//! PodSandboxStats, ListPodSandboxStats. A pod's CPU and memory are the sums of its
//! running containers' (what its VM runs for the pod). In a list, a container whose shim
//! does not answer is left out (logged), as containerd does, rather than failing the list.

use k8s_cri::v1 as cri;
use tonic::Status;
use tracing::warn;

use super::containers::container_status_code;
use crate::containers::{Container, ContainerStats, Containers, Filter};
use crate::pods::{Pod, Pods};

fn u64v(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn cpu(ts: i64, usage_ns: u64, nano_cores: Option<u64>) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: ts,
        usage_core_nano_seconds: u64v(usage_ns),
        usage_nano_cores: nano_cores.and_then(u64v),
    }
}

fn memory(ts: i64, usage: u64, available: Option<u64>) -> cri::MemoryUsage {
    cri::MemoryUsage {
        timestamp: ts,
        // No inactive-file figure from the guest: the working set is the usage.
        working_set_bytes: u64v(usage),
        usage_bytes: u64v(usage),
        available_bytes: available.and_then(u64v),
        ..Default::default()
    }
}

fn to_cri(c: &Container, s: &ContainerStats) -> cri::ContainerStats {
    let running = c.state == crate::containers::ContainerState::Running;
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: c.id.clone(),
            metadata: Some(cri::ContainerMetadata {
                name: c.config.name.clone(),
                attempt: c.config.attempt,
            }),
            labels: c.config.labels.clone().into_iter().collect(),
            annotations: c.config.annotations.clone().into_iter().collect(),
        }),
        cpu: running.then(|| cpu(s.timestamp_ns, s.cpu_usage_ns, s.cpu_nano_cores)),
        memory: running.then(|| {
            memory(
                s.timestamp_ns,
                s.memory_usage_bytes,
                s.memory_available_bytes,
            )
        }),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: s.timestamp_ns,
            fs_id: None,
            used_bytes: u64v(s.writable_layer_bytes),
            inodes_used: u64v(s.writable_layer_inodes),
        }),
        swap: None,
    }
}

pub(crate) async fn container_stats(
    containers: &Containers,
    id: &str,
) -> Result<cri::ContainerStats, Status> {
    let (c, s) = containers
        .stats_of(id)
        .await
        .map_err(container_status_code)?;
    Ok(to_cri(&c, &s))
}

async fn stats_of_list(containers: &Containers, list: Vec<Container>) -> Vec<cri::ContainerStats> {
    let mut out = Vec::new();
    for c in list {
        match containers.stats(&c).await {
            Ok(s) => out.push(to_cri(&c, &s)),
            Err(e) => warn!(container = %c.id, error = %e, "no stats"),
        }
    }
    out
}

pub(crate) async fn list_container_stats(
    containers: &Containers,
    f: Option<cri::ContainerStatsFilter>,
) -> Vec<cri::ContainerStats> {
    let f = f.unwrap_or_default();
    let filter = Filter {
        id: f.id,
        pod_id: f.pod_sandbox_id,
        state: None,
        labels: f.label_selector.into_iter().collect(),
    };
    stats_of_list(containers, containers.list(&filter)).await
}

async fn pod_stats(pod: &Pod, containers: &Containers) -> cri::PodSandboxStats {
    let list = containers.list(&Filter {
        pod_id: pod.id.clone(),
        ..Default::default()
    });
    let cs = stats_of_list(containers, list).await;
    let ts = crate::containers::now_ns();
    let sum =
        |f: &dyn Fn(&cri::ContainerStats) -> Option<u64>| -> u64 { cs.iter().filter_map(f).sum() };
    let usage_ns = sum(&|c| {
        c.cpu
            .as_ref()?
            .usage_core_nano_seconds
            .as_ref()
            .map(|v| v.value)
    });
    let cores = cs
        .iter()
        .filter_map(|c| c.cpu.as_ref())
        .map(|c| c.usage_nano_cores.as_ref().map(|v| v.value))
        .sum::<Option<u64>>();
    let mem = sum(&|c| c.memory.as_ref()?.usage_bytes.as_ref().map(|v| v.value));
    let any_running = cs.iter().any(|c| c.cpu.is_some());
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: pod.id.clone(),
            metadata: Some(cri::PodSandboxMetadata {
                name: pod.spec.name.clone(),
                uid: pod.spec.uid.clone(),
                namespace: pod.spec.namespace.clone(),
                attempt: pod.spec.attempt,
            }),
            labels: pod.spec.labels.clone().into_iter().collect(),
            annotations: pod.spec.annotations.clone().into_iter().collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: any_running.then(|| cpu(ts, usage_ns, cores)),
            memory: any_running.then(|| memory(ts, mem, None)),
            containers: cs,
            ..Default::default()
        }),
        windows: None,
    }
}

pub(crate) async fn pod_sandbox_stats(
    pods: &Pods,
    containers: &Containers,
    id: &str,
) -> Result<cri::PodSandboxStats, Status> {
    let pod = pods
        .get(id)
        .await
        .ok_or_else(|| Status::not_found(format!("pod sandbox {id:?} not found")))?;
    Ok(pod_stats(&pod, containers).await)
}

pub(crate) async fn list_pod_sandbox_stats(
    pods: &Pods,
    containers: &Containers,
    f: Option<cri::PodSandboxStatsFilter>,
) -> Vec<cri::PodSandboxStats> {
    let f = f.unwrap_or_default();
    let mut out = Vec::new();
    for p in pods.list().await {
        let selected = (f.id.is_empty() || p.id == f.id)
            && f.label_selector
                .iter()
                .all(|(k, v)| p.spec.labels.get(k) == Some(v));
        if selected {
            out.push(pod_stats(&p, containers).await);
        }
    }
    out
}
