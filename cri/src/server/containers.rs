//! The container calls of the RuntimeService: CRI's types to and from the containers
//! layer's. `runtime.rs` delegates here.

use std::time::Duration;

use k8s_cri::v1 as cri;
use tonic::{Code, Status};

use crate::container_spec::{BindMount, ContainerConfig};
use crate::containers::{Container, ContainerError, ContainerState, Containers, Filter, Resources};
use crate::pods::Pods;
use crate::security_context::{self, SecurityContext};

pub(crate) fn container_status_code(e: ContainerError) -> Status {
    let code = match &e {
        ContainerError::PodNotFound(_)
        | ContainerError::NotFound(_)
        | ContainerError::ImageNotFound(_) => Code::NotFound,
        ContainerError::InvalidConfig(_) | ContainerError::Spec(_) => Code::InvalidArgument,
        ContainerError::PodNotReady(_)
        | ContainerError::State { .. }
        | ContainerError::StdinClosed { .. } => Code::FailedPrecondition,
        ContainerError::NameInUse { .. } => Code::AlreadyExists,
        ContainerError::ExecTimeout(_) | ContainerError::StopTimeout { .. } => {
            Code::DeadlineExceeded
        }
        ContainerError::Shim(_) => Code::Unknown,
        ContainerError::Image(_) | ContainerError::Io { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// CRI's ContainerConfig in the layer's terms.
pub(crate) fn container_config(c: cri::ContainerConfig) -> Result<ContainerConfig, Status> {
    let md = c
        .metadata
        .ok_or_else(|| Status::invalid_argument("CreateContainer: config has no metadata"))?;
    let (sc, limits) = c
        .linux
        .map(|l| (l.security_context, l.resources))
        .unwrap_or_default();
    let sc = sc.unwrap_or_default();
    let limits = limits.map(|r| resources(r).to_oci()).unwrap_or_default();
    Ok(ContainerConfig {
        name: md.name,
        attempt: md.attempt,
        image: c.image.map(|i| i.image).unwrap_or_default(),
        command: c.command,
        args: c.args,
        working_dir: c.working_dir,
        envs: c.envs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
        labels: c.labels.into_iter().collect(),
        annotations: c.annotations.into_iter().collect(),
        log_path: c.log_path,
        mounts: c
            .mounts
            .into_iter()
            .map(|m| BindMount {
                host_path: m.host_path,
                container_path: m.container_path,
                readonly: m.readonly,
            })
            .collect(),
        security: security_context(sc)?,
        stdin: c.stdin,
        stdin_once: c.stdin_once,
        tty: c.tty,
        resources: limits,
    })
}

/// CRI's container security context in the layer's terms.
#[allow(deprecated)] // seccomp_profile_path: still sent by older kubelets and crictl
fn security_context(sc: cri::LinuxContainerSecurityContext) -> Result<SecurityContext, Status> {
    let seccomp = security_context::seccomp_from_cri(
        sc.seccomp
            .as_ref()
            .map(|p| (p.profile_type, p.localhost_ref.as_str())),
        &sc.seccomp_profile_path,
    )
    .map_err(|e| Status::invalid_argument(format!("CreateContainer: {e}")))?;
    let caps = sc.capabilities.unwrap_or_default();
    Ok(SecurityContext {
        run_as_user: sc.run_as_user.map(|v| v.value),
        run_as_group: sc.run_as_group.map(|v| v.value),
        run_as_username: sc.run_as_username,
        supplemental_groups: sc.supplemental_groups,
        strict_groups: sc.supplemental_groups_policy
            == cri::SupplementalGroupsPolicy::Strict as i32,
        readonly_rootfs: sc.readonly_rootfs,
        privileged: sc.privileged,
        add_capabilities: caps.add_capabilities,
        drop_capabilities: caps.drop_capabilities,
        no_new_privs: sc.no_new_privs,
        masked_paths: sc.masked_paths,
        readonly_paths: sc.readonly_paths,
        seccomp,
    })
}

fn cri_state(s: ContainerState) -> cri::ContainerState {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
    }
}

fn layer_state(s: i32) -> Option<ContainerState> {
    match cri::ContainerState::try_from(s).ok()? {
        cri::ContainerState::ContainerCreated => Some(ContainerState::Created),
        cri::ContainerState::ContainerRunning => Some(ContainerState::Running),
        cri::ContainerState::ContainerExited => Some(ContainerState::Exited),
        cri::ContainerState::ContainerUnknown => None,
    }
}

fn metadata(c: &Container) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: c.config.name.clone(),
        attempt: c.config.attempt,
    }
}

fn image_spec(c: &Container) -> cri::ImageSpec {
    cri::ImageSpec {
        image: c.image_name.clone(),
        ..Default::default()
    }
}

pub(crate) fn to_status(c: &Container) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(metadata(c)),
        state: cri_state(c.state) as i32,
        created_at: c.created_at_ns,
        started_at: c.started_at_ns,
        finished_at: c.finished_at_ns,
        exit_code: c.exit_code,
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        image_id: c.image_id.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: c.config.labels.clone().into_iter().collect(),
        annotations: c.config.annotations.clone().into_iter().collect(),
        mounts: c
            .config
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                ..Default::default()
            })
            .collect(),
        log_path: c
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        ..Default::default()
    }
}

fn to_container(c: &Container) -> cri::Container {
    cri::Container {
        id: c.id.clone(),
        pod_sandbox_id: c.pod_id.clone(),
        metadata: Some(metadata(c)),
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        image_id: c.image_id.clone(),
        state: cri_state(c.state) as i32,
        created_at: c.created_at_ns,
        labels: c.config.labels.clone().into_iter().collect(),
        annotations: c.config.annotations.clone().into_iter().collect(),
    }
}

/// CRI's filter in the layer's terms; None when it asks for a state no container has.
pub(crate) fn filter(f: Option<cri::ContainerFilter>) -> Option<Filter> {
    let f = f.unwrap_or_default();
    let state = match f.state {
        Some(s) => Some(layer_state(s.state)?),
        None => None,
    };
    Some(Filter {
        id: f.id,
        pod_id: f.pod_sandbox_id,
        state,
        labels: f.label_selector.into_iter().collect(),
    })
}

pub(crate) async fn create(
    pods: &Pods,
    containers: &Containers,
    req: cri::CreateContainerRequest,
) -> Result<String, Status> {
    let pod = pods
        .get(&req.pod_sandbox_id)
        .await
        .ok_or_else(|| container_status_code(ContainerError::PodNotFound(req.pod_sandbox_id)))?;
    let config = req
        .config
        .ok_or_else(|| Status::invalid_argument("CreateContainer: no config"))?;
    containers
        .create(&pod, container_config(config)?)
        .await
        .map_err(container_status_code)
}

pub(crate) fn list(
    containers: &Containers,
    f: Option<cri::ContainerFilter>,
) -> Vec<cri::Container> {
    match filter(f) {
        Some(f) => containers.list(&f).iter().map(to_container).collect(),
        None => Vec::new(),
    }
}

pub(crate) fn status(containers: &Containers, id: &str) -> Result<cri::ContainerStatus, Status> {
    containers
        .get(id)
        .map(|c| to_status(&c))
        .ok_or_else(|| container_status_code(ContainerError::NotFound(id.into())))
}

/// CRI's LinuxContainerResources in the layer's terms.
fn resources(r: cri::LinuxContainerResources) -> Resources {
    Resources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit_bytes: r.memory_limit_in_bytes,
        memory_swap_limit_bytes: r.memory_swap_limit_in_bytes,
        cpuset_cpus: r.cpuset_cpus,
        cpuset_mems: r.cpuset_mems,
        hugepage_limits: r
            .hugepage_limits
            .into_iter()
            .map(|h| (h.page_size, h.limit))
            .collect(),
        unified: r.unified.into_iter().collect(),
    }
}

pub(crate) async fn update_resources(
    containers: &Containers,
    req: cri::UpdateContainerResourcesRequest,
) -> Result<(), Status> {
    let linux = req
        .linux
        .ok_or_else(|| Status::invalid_argument("UpdateContainerResources: no linux resources"))?;
    containers
        .update_resources(&req.container_id, &resources(linux))
        .await
        .map_err(container_status_code)
}

pub(crate) async fn exec_sync(
    containers: &Containers,
    req: cri::ExecSyncRequest,
) -> Result<cri::ExecSyncResponse, Status> {
    let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout as u64));
    let out = containers
        .exec_sync(&req.container_id, req.cmd, timeout)
        .await
        .map_err(container_status_code)?;
    Ok(cri::ExecSyncResponse {
        stdout: out.stdout,
        stderr: out.stderr,
        exit_code: out.exit_code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_filters_map_to_the_layer() {
        let f = filter(Some(cri::ContainerFilter {
            id: "a".into(),
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            pod_sandbox_id: "p".into(),
            label_selector: [("k".to_string(), "v".to_string())].into(),
        }))
        .unwrap();
        assert_eq!(f.id, "a");
        assert_eq!(f.pod_id, "p");
        assert_eq!(f.state, Some(ContainerState::Running));
        assert_eq!(f.labels.get("k").map(String::as_str), Some("v"));
        // UNKNOWN matches nothing huskd has.
        let unknown = filter(Some(cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerUnknown as i32,
            }),
            ..Default::default()
        }));
        assert!(unknown.is_none());
    }

    #[test]
    fn a_config_without_metadata_is_invalid() {
        let e = container_config(cri::ContainerConfig::default()).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
}
