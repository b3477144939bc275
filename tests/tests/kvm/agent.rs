//! The agent inside a real husk-vmm microVM, driven over the VMM's hybrid vsock with the
//! same host-side code `husk run` and the shim use.
use std::time::{Duration, Instant};

use husk_proto::agent as pb;
use husk_shim::agent::{ctx, Agent};
use husk_shim::spec::default_spec;
use husk_shim::vm::{NetSpec, Vm, VmSpec};
use husk_tests::leaks::Snapshot;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn pod_spec() -> VmSpec {
    let mut spec = VmSpec::pod_default().expect("guest images (guest-image/build)");
    spec.kernel = husk_tests::guest_dir().join("vmlinux");
    spec.initramfs = husk_tests::guest_dir().join("husk-initramfs.cpio");
    spec
}

/// Boots a pod VM and connects to its agent.
async fn boot(name: &str, spec: &VmSpec) -> (Vm, Agent) {
    let mut vm = Vm::launch(&format!("{name}-{}", std::process::id()), spec)
        .unwrap_or_else(|e| panic!("launch the VM: {e}"));
    let uds = vm.vsock_uds().to_path_buf();
    let agent = Agent::connect(
        &uds,
        husk_proto::AGENT_VSOCK_PORT,
        Instant::now() + Duration::from_secs(120),
        || vm.vmm_exit(),
    )
    .await
    .unwrap_or_else(|e| panic!("reach the agent: {e}"));
    (vm, agent)
}

async fn create_sandbox(agent: &Agent, id: &str) {
    let mut req = pb::CreateSandboxRequest::new();
    req.sandbox_id = id.into();
    req.hostname = id.into();
    agent
        .sandbox
        .create_sandbox(ctx(T), &req)
        .await
        .expect("CreateSandbox");
}

async fn create_and_start(agent: &Agent, id: &str, spec: serde_json::Value) {
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec_json = serde_json::to_vec(&spec).unwrap();
    let mut root = pb::RootfsSource::new();
    root.share_tag = husk_proto::EMBEDDED_SHARE_TAG.into();
    root.path = husk_proto::DEFAULT_EMBEDDED_IMAGE.into();
    req.rootfs = Some(root).into();
    agent
        .containers
        .create_container(ctx(T), &req)
        .await
        .expect("CreateContainer");
    let mut start = pb::ContainerRequest::new();
    start.container_id = id.into();
    agent
        .containers
        .start_container(ctx(T), &start)
        .await
        .expect("StartContainer");
}

async fn read_all(agent: &Agent, id: &str, stderr: bool) -> String {
    let mut out = Vec::new();
    loop {
        let mut req = pb::ReadStreamRequest::new();
        req.container_id = id.into();
        let r = if stderr {
            agent.io.read_stderr(ctx(T), &req).await
        } else {
            agent.io.read_stdout(ctx(T), &req).await
        }
        .expect("read stream");
        out.extend_from_slice(&r.data);
        if r.eof {
            return String::from_utf8_lossy(&out).into_owned();
        }
    }
}

async fn wait(agent: &Agent, id: &str) -> pb::WaitProcessResponse {
    let mut req = pb::ProcessRequest::new();
    req.container_id = id.into();
    agent
        .containers
        .wait_process(ctx(T), &req)
        .await
        .expect("WaitProcess")
}

async fn remove(agent: &Agent, id: &str) {
    let mut req = pb::RemoveContainerRequest::new();
    req.container_id = id.into();
    req.timeout_ms = 5000;
    agent
        .containers
        .remove_container(ctx(T), &req)
        .await
        .expect("RemoveContainer");
}

fn sh(script: &str) -> serde_json::Value {
    default_spec(&["sh".into(), "-c".into(), script.into()], &[], false)
}

#[test]
fn agent_runs_a_container_over_vsock() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    rt().block_on(async {
        let (vm, agent) = boot("agent-core", &pod_spec()).await;
        let v = agent
            .health
            .version(ctx(T), &pb::CheckRequest::new())
            .await
            .expect("Version");
        assert_eq!(v.api_version, husk_proto::AGENT_API_VERSION);
        create_sandbox(&agent, "core-pod").await;
        create_and_start(
            &agent,
            "c1",
            sh("echo out; echo err >&2; hostname; cat /proc/self/cgroup; exit 7"),
        )
        .await;
        let out = read_all(&agent, "c1", false).await;
        let err = read_all(&agent, "c1", true).await;
        let w = wait(&agent, "c1").await;
        assert_eq!(w.exit_status, 7, "stdout {out:?} stderr {err:?}");
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("out"));
        assert_eq!(lines.next(), Some("core-pod"), "the sandbox's hostname");
        assert_eq!(err, "err\n");
        remove(&agent, "c1").await;

        // An unknown container is NotFound, with its id in the message.
        let mut req = pb::ContainerRequest::new();
        req.container_id = "nope".into();
        match agent.containers.start_container(ctx(T), &req).await {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND, "{s:?}");
                assert!(s.message().contains("nope"), "{s:?}");
            }
            other => panic!("start of an unknown container: {other:?}"),
        }
        drop(agent);
        vm.shutdown().unwrap();
    });
    before.assert_nothing_leaked();
}

#[test]
fn memory_limit_is_enforced_and_oom_reported() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    rt().block_on(async {
        let (vm, agent) = boot("agent-oom", &pod_spec()).await;
        create_sandbox(&agent, "oom-pod").await;
        let mut spec =
            sh("cat /sys/fs/cgroup/memory.max; dd if=/dev/zero of=/dev/null bs=64M count=1");
        spec["linux"]["resources"]["memory"] = json!({"limit": 16 << 20});
        let events = agent.events.clone();
        let oom = tokio::spawn(async move {
            events
                .get_oom_event(ctx(T), &pb::Empty::new())
                .await
                .expect("GetOOMEvent")
        });
        create_and_start(&agent, "hog", spec).await;
        let out = read_all(&agent, "hog", false).await;
        let w = wait(&agent, "hog").await;
        // The limit is in the container's own cgroup (its namespace root).
        assert_eq!(out.lines().next(), Some("16777216"), "{out}");
        assert_eq!(w.signal, 9, "dd should be OOM-killed: {w:?}");
        assert_eq!(w.exit_status, 137);
        let ev = tokio::time::timeout(Duration::from_secs(30), oom)
            .await
            .expect("no OOM event within 30 s")
            .unwrap();
        assert_eq!(ev.container_id, "hog");
        remove(&agent, "hog").await;
        drop(agent);
        vm.shutdown().unwrap();
    });
    before.assert_nothing_leaked();
}

#[test]
fn interface_and_routes_reach_the_host_tap() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    let tap = husk_tests::leaks::Tap::new("huskag0", "10.215.0.1/24");
    let mut spec = pod_spec();
    let mac = vmm::api::MacAddr::parse("06:00:0a:d7:00:02").unwrap();
    spec.nets.push(NetSpec {
        tap_name: tap.name().into(),
        mac: Some(mac),
    });
    rt().block_on(async {
        let (vm, agent) = boot("agent-net", &spec).await;
        create_sandbox(&agent, "net-pod").await;
        let mut iface = pb::Interface::new();
        iface.name = "eth0".into();
        iface.hw_addr = mac.to_string();
        iface.up = true;
        iface.mtu = 1500;
        let mut addr = pb::IPAddress::new();
        addr.address = "10.215.0.2".into();
        addr.prefix_len = 24;
        iface.addresses.push(addr);
        let mut req = pb::UpdateInterfaceRequest::new();
        req.interface = Some(iface).into();
        let got = agent
            .network
            .update_interface(ctx(T), &req)
            .await
            .expect("UpdateInterface");
        assert_eq!(got.name, "eth0");
        assert!(got.up);
        let mut route = pb::Route::new();
        route.gateway = "10.215.0.1".into();
        route.device = "eth0".into();
        let mut req = pb::UpdateRoutesRequest::new();
        req.routes.push(route);
        let routes = agent
            .network
            .update_routes(ctx(T), &req)
            .await
            .expect("UpdateRoutes");
        assert!(
            routes.routes.iter().any(|r| r.gateway == "10.215.0.1"),
            "{routes:?}"
        );
        // A container in the sandbox's network namespace reaches the host's end of the tap
        // and sees the default route the agent installed.
        create_and_start(
            &agent,
            "pinger",
            sh("ping -c 1 -W 10 10.215.0.1 && ip route show default"),
        )
        .await;
        let out = read_all(&agent, "pinger", false).await;
        let err = read_all(&agent, "pinger", true).await;
        let w = wait(&agent, "pinger").await;
        assert_eq!(w.exit_status, 0, "ping failed: {out} {err}");
        assert!(out.contains("1 packets received"), "{out}");
        assert!(out.contains("default via 10.215.0.1 dev eth0"), "{out}");
        remove(&agent, "pinger").await;
        drop(agent);
        vm.shutdown().unwrap();
    });
    drop(tap);
    before.assert_nothing_leaked();
}
