//! The pod sandbox: hostname, resolv.conf, shares, network namespace; set up once.

use std::path::{Path, PathBuf};

use crate::config::{Config, Mode};
use crate::error::{AgentError, Result};
use crate::helper::HelperRequest;
use crate::ids;
use crate::runtime::Runtime;
use husk_proto::agent as pb;

/// The sandbox's settings and the namespaces its containers join.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: String,
    pub hostname: String,
    pub resolv_conf: Option<PathBuf>,
    pub shared_pid: bool,
    /// Host mode: the sandbox's network namespace (a bind-mounted nsfs file).
    pub netns: Option<PathBuf>,
    /// Guest mode: shares we mounted (to unmount on destroy).
    pub mounted_shares: Vec<PathBuf>,
    /// The first container (the pause container): its namespaces are the pod's.
    pub first: Option<(String, i32)>,
}

/// Sets the sandbox up per the request.
pub async fn create(
    cfg: &Config,
    runtime: &Runtime,
    req: &pb::CreateSandboxRequest,
) -> Result<Sandbox> {
    ids::validate_id("sandbox", &req.sandbox_id)?;
    let dir = cfg.sandbox_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| AgentError::internal(format!("create {}", dir.display()), e))?;

    let mut sb = Sandbox {
        id: req.sandbox_id.clone(),
        hostname: req.hostname.clone(),
        resolv_conf: None,
        shared_pid: req.shared_pid_namespace,
        netns: None,
        mounted_shares: Vec::new(),
        first: None,
    };
    // Whatever was set up before a step failed is undone: a failed CreateSandbox must not
    // leave shares mounted or a namespace behind for the next attempt to trip over.
    match set_up(cfg, runtime, req, &mut sb).await {
        Ok(()) => Ok(sb),
        Err(e) => {
            destroy(&sb);
            Err(e)
        }
    }
}

async fn set_up(
    cfg: &Config,
    runtime: &Runtime,
    req: &pb::CreateSandboxRequest,
    sb: &mut Sandbox,
) -> Result<()> {
    let dir = cfg.sandbox_dir();
    if req.hostname.len() > 64 || req.hostname.contains('/') {
        return Err(AgentError::InvalidArgument(format!(
            "hostname {:?} is not a valid hostname (at most 64 characters, no '/')",
            req.hostname
        )));
    }

    for share in &req.shares {
        ids::validate_id("share tag", &share.tag)?;
        if share.tag == husk_proto::EMBEDDED_SHARE_TAG {
            return Err(AgentError::InvalidArgument(format!(
                "share tag {:?} is reserved for the images embedded in the guest",
                share.tag
            )));
        }
        let target = cfg.share_root.join(&share.tag);
        match cfg.mode {
            Mode::Host => {
                if !target.is_dir() {
                    return Err(AgentError::NotFound(format!(
                        "share {:?}: {} is not a directory (host mode resolves tags under the share root)",
                        share.tag,
                        target.display()
                    )));
                }
            }
            Mode::Guest => {
                mount_virtiofs(&share.tag, &target, share.readonly)?;
                sb.mounted_shares.push(target);
            }
        }
    }

    if !req.resolv_conf.is_empty() {
        let p = dir.join("resolv.conf");
        std::fs::write(&p, &req.resolv_conf)
            .map_err(|e| AgentError::internal("write resolv.conf", e))?;
        if cfg.mode == Mode::Guest {
            let _ = std::fs::create_dir_all("/etc");
            let _ = std::fs::write("/etc/resolv.conf", &req.resolv_conf);
        }
        sb.resolv_conf = Some(p);
    }

    match cfg.mode {
        Mode::Host => {
            let p = dir.join("netns");
            runtime
                .run(&HelperRequest::Netns { path: p.clone() }, None)
                .await
                .map_err(|e| AgentError::internal("create the sandbox network namespace", e))?;
            sb.netns = Some(p);
        }
        Mode::Guest => {
            if !req.hostname.is_empty() {
                nix::unistd::sethostname(&req.hostname)
                    .map_err(|e| AgentError::internal("sethostname", e))?;
            }
            if req.guest_time_unix_nanos > 0 {
                set_clock(req.guest_time_unix_nanos)?;
            }
        }
    }
    Ok(())
}

/// Undoes [`create`] (containers must be gone already).
pub fn destroy(sb: &Sandbox) {
    if let Some(ns) = &sb.netns {
        unmount(ns);
        let _ = std::fs::remove_file(ns);
    }
    for m in &sb.mounted_shares {
        unmount(m);
    }
    crate::cgroups::remove_sandbox_parent(&sb.id);
}

fn unmount(p: &Path) {
    if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!(path = %p.display(), "unmount: {e}");
    }
}

fn mount_virtiofs(tag: &str, target: &Path, readonly: bool) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    std::fs::create_dir_all(target)
        .map_err(|e| AgentError::internal(format!("create {}", target.display()), e))?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(Some(tag), target, Some("virtiofs"), flags, None::<&str>).map_err(|e| {
        AgentError::NotFound(format!(
            "mount virtio-fs share {tag:?} at {}: {e} (is a virtio-fs device with this tag attached?)",
            target.display()
        ))
    })
}

fn set_clock(nanos: i64) -> Result<()> {
    let ts = nix::sys::time::TimeSpec::new(nanos / 1_000_000_000, nanos % 1_000_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| AgentError::internal("clock_settime", e))
}
