//! Pod sandboxes: the thinnest real path. RunPodSandbox makes the pod's netns, attaches it
//! with CNI, writes the sandbox bundle (an OCI spec with the CRI annotations containerd
//! sends, and the netns path), starts our shim and has it Create and Start the sandbox
//! task. Any failure undoes every step already taken, newest first, so a failed pod leaves
//! no netns, CNI allocation, shim or bundle. Stop and Remove undo a running pod and are
//! idempotent. Each pod's record is kept on disk ([`crate::records`]): a restarted huskd
//! restores its pods, Ready while their shim still answers, and can stop and remove them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::cni::{Attachment, Cni, CniError, Network, PortMapping};
use crate::config::{CgroupDriver, Config};
use crate::metrics::{self, METRICS};
use crate::netns::{Netns, NetnsError, NETNS_DIR};
use crate::records::{RecordError, Records};
use crate::shim_client::{Shim, ShimError, ShimLauncher};

/// What huskd needs of a pod config (the server maps CRI's PodSandboxConfig to it).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub hostname: String,
    pub log_directory: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub port_mappings: Vec<PortMapping>,
    /// `/etc/resolv.conf` of the pod's containers; None: the host's.
    #[serde(default)]
    pub dns: Option<crate::pod_files::DnsConfig>,
    /// The pod's sysctls: in the sandbox spec, applied by the agent in the pause container's
    /// namespaces, which the pod's containers join (IPC, UTS; the guest's network).
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// kubelet's cgroup parent for the pod, in the configured driver's form: the host-side
    /// processes (shim, VMM, virtiofsd) go into a cgroup of the pod's under it.
    #[serde(default)]
    pub cgroup_parent: String,
    /// Host namespaces asked for (network, pid, ipc): a VM cannot share them. Not
    /// recorded: a pod asking for one never runs.
    #[serde(skip)]
    pub host_namespaces: Vec<&'static str>,
    /// The pod's security context allows privileged containers (inside its VM).
    #[serde(default)]
    pub privileged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("unknown runtime handler {handler:?}; huskd serves {known:?}")]
    UnknownHandler { handler: String, known: Vec<String> },
    #[error(
        "cgroup parent {parent:?} is not a valid parent in the form of huskd's cgroup driver \
         ({driver:?}; no '..' or ':'): kubelet's --cgroup-driver must match [huskd] cgroup_driver"
    )]
    CgroupParent {
        parent: String,
        driver: CgroupDriver,
    },
    #[error(
        "a VM sandbox cannot share the host's {0} namespace: the pod runs in its own \
         microVM (set hostNetwork/hostPID/hostIPC to false, or use another RuntimeClass)"
    )]
    HostNamespace(&'static str),
    #[error("pod network: {0}")]
    Netns(#[from] NetnsError),
    #[error("pod network: {0}")]
    Cni(#[from] CniError),
    #[error("pod sandbox in the shim: {0}")]
    Shim(#[from] ShimError),
    #[error("pod record: {0}")]
    Record(#[from] RecordError),
    #[error("pod bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    Ready,
    NotReady,
}

/// A pod huskd runs (also its record on disk).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    pub id: String,
    pub spec: PodSpec,
    pub handler: String,
    pub state: PodState,
    pub created_at_ns: i64,
    pub ip: Option<String>,
    netns: Netns,
    bundle: PathBuf,
    shim_address: String,
    /// RunPodSandbox has not finished: a huskd that finds this at start died during it,
    /// and undoes the pod.
    #[serde(default)]
    starting: bool,
}

pub struct Pods {
    handlers: Vec<String>,
    cgroup_driver: CgroupDriver,
    cni_conf_dir: PathBuf,
    cni: Cni,
    bundles: PathBuf,
    launcher: ShimLauncher,
    records: Records,
    pods: Mutex<HashMap<String, Pod>>,
}

fn new_id() -> String {
    let mut b = [0u8; 32];
    // SAFETY: b is a valid, writable buffer of the given length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    // getrandom(2) does not return short for 32 bytes once the pool is initialised.
    assert_eq!(n, b.len() as isize, "getrandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

impl Pods {
    pub fn new(config: &Config, launcher: ShimLauncher) -> Pods {
        Pods {
            handlers: config.runtime_handlers.clone(),
            cgroup_driver: config.cgroup_driver,
            cni_conf_dir: config.cni.conf_dir.clone(),
            cni: Cni::new(config.cni.bin_dirs.clone(), config.state_dir.join("cni")),
            bundles: config.state_dir.join("bundles"),
            launcher,
            records: Records::new(config.state_dir.join("pods")),
            pods: Mutex::new(HashMap::new()),
        }
    }

    /// Restores the pods recorded by an earlier huskd. A Ready pod whose shim no longer
    /// answers is NotReady now (kubelet then stops and removes it; Stop cleans up through
    /// the shim's `delete`, the cached CNI result and the recorded netns).
    pub async fn restore(&self) {
        for mut pod in self.records.load::<Pod>() {
            if pod.starting {
                warn!(pod = %pod.id, name = %pod.spec.name, "RunPodSandbox was cut short by huskd's end: undoing it");
                self.tear_down(&pod).await;
                if let Err(e) = self.records.remove(&pod.id) {
                    warn!(pod = %pod.id, error = %e, "remove the pod's record");
                }
                continue;
            }
            if pod.state == PodState::Ready && Shim::connect(&pod.shim_address).await.is_err() {
                warn!(pod = %pod.id, "the pod's shim is gone: NotReady");
                pod.state = PodState::NotReady;
                if let Err(e) = self.records.save(&pod.id, &pod) {
                    warn!(pod = %pod.id, error = %e, "record the pod");
                }
            }
            info!(pod = %pod.id, name = %pod.spec.name, state = ?pod.state, "pod restored");
            self.pods.lock().await.insert(pod.id.clone(), pod);
        }
    }

    /// RunPodSandbox. On error nothing of the pod is left.
    pub async fn run(&self, spec: PodSpec, handler: &str) -> Result<String, PodError> {
        if !self.handlers.iter().any(|h| h == handler) {
            return Err(PodError::UnknownHandler {
                handler: handler.into(),
                known: self.handlers.clone(),
            });
        }
        if let Some(ns) = spec.host_namespaces.first() {
            return Err(PodError::HostNamespace(ns));
        }
        // A parent in the wrong driver's form is refused before anything is made.
        cgroups_path(self.cgroup_driver, &spec.cgroup_parent, "")?;
        let started = std::time::Instant::now();
        let net = Network::load(&self.cni_conf_dir)?;
        let id = new_id();
        let netns_name = format!("husk-{}", &id[..16]);
        let mut pod = Pod {
            id: id.clone(),
            spec,
            handler: handler.into(),
            state: PodState::Ready,
            created_at_ns: now_ns(),
            ip: None,
            netns: Netns::from_path(std::path::Path::new(NETNS_DIR).join(&netns_name)),
            bundle: self.bundles.join(&id),
            shim_address: String::new(),
            starting: true,
        };
        // Recorded before anything is made, so a huskd that dies before the pod is up
        // undoes it at its next start (the CNI cache and the shim's address are recorded
        // as they come).
        self.records.save(&id, &pod)?;
        let up = async {
            pod.netns = Netns::create(std::path::Path::new(NETNS_DIR), &netns_name)?;
            self.bring_up(&mut pod, &net).await?;
            pod.starting = false;
            self.records.save(&id, &pod).map_err(PodError::from)
        }
        .await;
        match up {
            Ok(()) => {
                METRICS.pod_start.observe(started.elapsed());
                info!(pod = %id, name = %pod.spec.name, "pod sandbox running");
                self.pods.lock().await.insert(id.clone(), pod);
                Ok(id)
            }
            Err(e) => {
                metrics::inc(&METRICS.pod_start_failures);
                warn!(pod = %id, error = %e, "RunPodSandbox failed; undoing it");
                self.tear_down(&pod).await;
                if let Err(e) = self.records.remove(&id) {
                    warn!(pod = %id, error = %e, "remove the pod's record");
                }
                Err(e)
            }
        }
    }

    async fn bring_up(&self, pod: &mut Pod, net: &Network) -> Result<(), PodError> {
        let att = self.attachment(pod);
        let t0 = std::time::Instant::now();
        let added = self.cni.add(net, &att).await.inspect_err(|_| {
            metrics::inc(&METRICS.cni_errors);
        })?;
        let cni = t0.elapsed();
        pod.ip = added.ips.first().cloned();
        let bundle_err = |source| PodError::Bundle {
            path: pod.bundle.clone(),
            source,
        };
        std::fs::create_dir_all(pod.bundle.join("rootfs")).map_err(bundle_err)?;
        write_pause(&pod.bundle.join("rootfs")).map_err(bundle_err)?;
        crate::pod_files::write(&pod.bundle, pod.spec.dns.as_ref(), &pod.spec.hostname)
            .map_err(bundle_err)?;
        let spec = serde_json::to_vec_pretty(&sandbox_spec(pod, self.cgroup_driver)?)
            .expect("serialize a spec");
        std::fs::write(pod.bundle.join("config.json"), spec).map_err(bundle_err)?;
        let t1 = std::time::Instant::now();
        pod.shim_address = self.launcher.start(&pod.id, &pod.bundle).await?;
        self.records.save(&pod.id, pod)?;
        let shim_start = t1.elapsed();
        let boot = std::time::Instant::now();
        let shim = Shim::connect(&pod.shim_address).await?;
        shim.create(&pod.id, &pod.bundle, self.launcher.config.as_deref())
            .await?;
        shim.start(&pod.id).await?;
        METRICS.vm_boot.observe(boot.elapsed());
        // Where a pod start's time goes (CNI plugins and the shim's start are processes of
        // their own; the VM's boot is the shim's Create + Start).
        debug!(pod = %pod.id, ?cni, ?shim_start, vm_boot = ?boot.elapsed(), "pod sandbox up");
        Ok(())
    }

    fn attachment(&self, pod: &Pod) -> Attachment {
        Attachment {
            container_id: pod.id.clone(),
            netns: pod.netns.path().to_path_buf(),
            ifname: "eth0".into(),
            // kubelet's CNI_ARGS, as containerd and CRI-O pass them.
            args: BTreeMap::from([
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), pod.spec.namespace.clone()),
                ("K8S_POD_NAME".into(), pod.spec.name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), pod.id.clone()),
                ("K8S_POD_UID".into(), pod.spec.uid.clone()),
            ]),
            port_mappings: pod.spec.port_mappings.clone(),
        }
    }

    /// Undoes a pod, newest step first, trying every step: the shim's task and the shim
    /// (through its socket, then the `delete` action for whatever is left), CNI, the netns,
    /// the bundle. Errors are logged; what failed stays for a later Stop to retry.
    async fn tear_down(&self, pod: &Pod) {
        // A shim whose `start` huskd did not see answer (it died meanwhile) wrote its
        // address into the bundle, as containerd's shims do.
        let address = if pod.shim_address.is_empty() {
            std::fs::read_to_string(pod.bundle.join("address")).unwrap_or_default()
        } else {
            pod.shim_address.clone()
        };
        if !address.is_empty() {
            if let Ok(shim) = Shim::connect(&address).await {
                let _ = shim.kill(&pod.id, libc::SIGKILL as u32).await;
                let _ = shim.delete(&pod.id).await;
                let _ = shim.shutdown(&pod.id).await;
            }
        }
        if pod.bundle.join("config.json").exists() {
            if let Err(e) = self.launcher.delete(&pod.id, &pod.bundle).await {
                warn!(pod = %pod.id, error = %e, "shim delete");
            }
        }
        if let Err(e) = self.cni.del(&pod.id).await {
            metrics::inc(&METRICS.cni_errors);
            warn!(pod = %pod.id, error = %e, "CNI DEL");
        }
        if let Err(e) = pod.netns.remove() {
            warn!(pod = %pod.id, error = %e, "netns");
        }
        if let Err(e) = std::fs::remove_dir_all(&pod.bundle) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(pod = %pod.id, error = %e, "remove the bundle");
            }
        }
    }

    /// StopPodSandbox: the pod's VM, network and shim go; the record stays (NotReady).
    pub async fn stop(&self, id: &str) -> Result<(), PodError> {
        let Some(pod) = self.pods.lock().await.get(id).cloned() else {
            return Ok(()); // stopping what does not exist succeeds
        };
        self.tear_down(&pod).await;
        if let Some(p) = self.pods.lock().await.get_mut(id) {
            p.state = PodState::NotReady;
            self.records.save(id, p)?;
        }
        Ok(())
    }

    /// RemovePodSandbox: stops it if needed and forgets it.
    pub async fn remove(&self, id: &str) -> Result<(), PodError> {
        self.stop(id).await?;
        self.records.remove(id)?;
        self.pods.lock().await.remove(id);
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Option<Pod> {
        self.pods.lock().await.get(id).cloned()
    }

    /// Whether the pod exists and is Ready (its shim and VM running).
    pub async fn ready(&self, id: &str) -> Option<bool> {
        self.pods
            .lock()
            .await
            .get(id)
            .map(|p| p.state == PodState::Ready)
    }

    pub async fn list(&self) -> Vec<Pod> {
        self.pods.lock().await.values().cloned().collect()
    }
}

impl Pod {
    /// The ttrpc address of the pod's shim (every container of the pod is served there).
    pub fn shim_address(&self) -> &str {
        &self.shim_address
    }

    /// The pod's `/etc/resolv.conf` and `/etc/hostname` (see [`crate::pod_files`]).
    pub fn resolv_conf(&self) -> PathBuf {
        crate::pod_files::resolv_conf_path(&self.bundle)
    }

    pub fn hostname_file(&self) -> PathBuf {
        crate::pod_files::hostname_path(&self.bundle)
    }

    /// The sandbox bundle's directory (the shim publishes the VM's vsock address there).
    pub fn bundle(&self) -> &std::path::Path {
        &self.bundle
    }

    /// The pod's network namespace (the host side of the VM's network).
    pub fn netns_path(&self) -> &std::path::Path {
        self.netns.path()
    }
}

/// The sandbox rootfs: `/pause` (see [`crate::pause`]) and the directories a container
/// root is expected to have.
fn write_pause(rootfs: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in ["dev", "etc", "proc", "sys"] {
        // Mount points of the default mounts: the rootfs is read-only.
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    let p = rootfs.join("pause");
    std::fs::write(&p, crate::pause::elf())?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
}

/// The sandbox task's OCI spec: what containerd 1.6's CRI plugin gives a VM runtime (the
/// `io.kubernetes.cri.*` annotations, the pod's netns by path).
/// The sandbox's OCI `cgroupsPath` under kubelet's `parent`, as containerd's CRI plugin
/// forms it for each driver (`<parent>/<id>`; `<parent>:<prefix>:<id>`); None without a
/// parent. A parent in the other driver's form is InvalidArgument: kubelet and huskd must
/// agree on the driver (RuntimeConfig tells kubelet which).
fn cgroups_path(driver: CgroupDriver, parent: &str, id: &str) -> Result<Option<String>, PodError> {
    if parent.is_empty() {
        return Ok(None);
    }
    let systemd_form = parent.ends_with(".slice") && !parent.contains(['/', ':']);
    // What the shim would refuse after CNI ADD is refused here, before anything is made.
    let cgroupfs_ok = !parent.contains(':')
        && !std::path::Path::new(parent)
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    match driver {
        CgroupDriver::Cgroupfs if !systemd_form && cgroupfs_ok => {
            Ok(Some(format!("{parent}/{id}")))
        }
        CgroupDriver::Systemd if systemd_form => Ok(Some(format!("{parent}:husk:{id}"))),
        _ => Err(PodError::CgroupParent {
            parent: parent.into(),
            driver,
        }),
    }
}

fn sandbox_spec(pod: &Pod, driver: CgroupDriver) -> Result<serde_json::Value, PodError> {
    let mut ann: BTreeMap<String, String> = pod.spec.annotations.clone();
    for (k, v) in [
        ("container-type", "sandbox".to_string()),
        ("sandbox-id", pod.id.clone()),
        ("sandbox-name", pod.spec.name.clone()),
        ("sandbox-namespace", pod.spec.namespace.clone()),
        ("sandbox-uid", pod.spec.uid.clone()),
        ("sandbox-log-directory", pod.spec.log_directory.clone()),
    ] {
        ann.insert(format!("io.kubernetes.cri.{k}"), v);
    }
    let mut linux = json!({
        "namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network", "path": pod.netns.path()}
        ]
    });
    if !pod.spec.sysctls.is_empty() {
        linux["sysctl"] = json!(pod.spec.sysctls);
    }
    if let Some(path) = cgroups_path(driver, &pod.spec.cgroup_parent, &pod.id)? {
        linux["cgroupsPath"] = json!(path);
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["/pause"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/"
        },
        "root": {"path": "rootfs", "readonly": true},
        "mounts": crate::container_spec::default_mounts(),
        "hostname": pod.spec.hostname,
        "annotations": ann,
        "linux": linux
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_paths_in_each_drivers_form() {
        use CgroupDriver::*;
        let path = |d, p: &str| cgroups_path(d, p, "abc");
        assert_eq!(path(Cgroupfs, "").unwrap(), None);
        assert_eq!(
            path(Cgroupfs, "/kubepods/burstable/pod1")
                .unwrap()
                .as_deref(),
            Some("/kubepods/burstable/pod1/abc")
        );
        assert_eq!(
            path(Systemd, "kubepods-burstable-pod1.slice")
                .unwrap()
                .as_deref(),
            Some("kubepods-burstable-pod1.slice:husk:abc")
        );
        for (d, p) in [
            (Cgroupfs, "kubepods-burstable-pod1.slice"),
            (Cgroupfs, "/kubepods/../etc"),
            (Cgroupfs, "/kubepods:x"),
            (Systemd, "/kubepods/burstable/pod1"),
            (Systemd, "a:b.slice"),
        ] {
            let e = path(d, p).unwrap_err().to_string();
            assert!(e.contains(p) && e.contains("--cgroup-driver"), "{e}");
        }
    }
}
