//! The agent inside a real husk-vmm microVM, driven over the VMM's hybrid vsock with the
//! same host-side code `husk run` and the shim use.
use std::time::Duration;

use husk_agent_client::{ctx, Agent, Rootfs};
use husk_proto::agent as pb;
use husk_shim::sandbox::vm::NetSpec;
use husk_shim::spec::default_spec;
use husk_tests::leaks::Snapshot;
use husk_tests::pod;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn busybox() -> Rootfs {
    Rootfs::embedded(husk_proto::DEFAULT_EMBEDDED_IMAGE)
}

fn sh(script: &str) -> serde_json::Value {
    default_spec(&["sh".into(), "-c".into(), script.into()], &[], false)
}

async fn run(agent: &Agent, id: &str, spec: serde_json::Value) {
    agent
        .create_container(id, &spec, &busybox(), false)
        .await
        .expect("CreateContainer");
    agent.start_container(id).await.expect("StartContainer");
}

async fn output(agent: &Agent, id: &str, stderr: bool) -> String {
    pod::output(agent, id, "", stderr).await
}

fn vm_name(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

#[test]
fn agent_runs_a_container_over_vsock() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    pod::runtime().block_on(async {
        let (sandbox, _) = pod::boot(&vm_name("agent-core"), "core-pod", &pod::spec()).await;
        let agent = sandbox.agent().clone();
        let v = agent
            .health
            .version(ctx(T), &pb::CheckRequest::new())
            .await
            .expect("Version");
        assert_eq!(v.api_version, husk_proto::AGENT_API_VERSION);
        run(
            &agent,
            "c1",
            sh("echo out; echo err >&2; hostname; cat /proc/self/cgroup; exit 7"),
        )
        .await;
        let out = output(&agent, "c1", false).await;
        let err = output(&agent, "c1", true).await;
        let w = pod::wait_process(&agent, "c1", "").await;
        assert_eq!(w.exit_status, 7, "stdout {out:?} stderr {err:?}");
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("out"));
        assert_eq!(lines.next(), Some("core-pod"), "the sandbox's hostname");
        assert_eq!(err, "err\n");
        agent.remove_container("c1", 5000).await.expect("Remove");

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
        sandbox.shutdown().await.unwrap();
    });
    before.assert_nothing_leaked();
}

#[test]
fn memory_limit_is_enforced_and_oom_reported() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    pod::runtime().block_on(async {
        let (sandbox, _) = pod::boot(&vm_name("agent-oom"), "oom-pod", &pod::spec()).await;
        let agent = sandbox.agent().clone();
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
        run(&agent, "hog", spec).await;
        let out = output(&agent, "hog", false).await;
        let w = pod::wait_process(&agent, "hog", "").await;
        // The limit is in the container's own cgroup (its namespace root).
        assert_eq!(out.lines().next(), Some("16777216"), "{out}");
        assert_eq!(w.signal, 9, "dd should be OOM-killed: {w:?}");
        assert_eq!(w.exit_status, 137);
        let ev = tokio::time::timeout(Duration::from_secs(30), oom)
            .await
            .expect("no OOM event within 30 s")
            .unwrap();
        assert_eq!(ev.container_id, "hog");
        agent.remove_container("hog", 5000).await.expect("Remove");
        drop(agent);
        sandbox.shutdown().await.unwrap();
    });
    before.assert_nothing_leaked();
}

#[test]
fn interface_and_routes_reach_the_host_tap() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    let tap = husk_tests::leaks::Tap::new("huskag0", "10.215.0.1/24");
    let mut spec = pod::spec();
    let mac = husk_vmm_api::MacAddr::parse("06:00:0a:d7:00:02").unwrap();
    spec.nets.push(NetSpec {
        tap_name: tap.name().into(),
        netns: None,
        mac: Some(mac),
    });
    pod::runtime().block_on(async {
        let (sandbox, _) = pod::boot(&vm_name("agent-net"), "net-pod", &spec).await;
        let agent = sandbox.agent().clone();
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
        let mut spec = sh("ping -c 1 -W 10 10.215.0.1 && ip route show default");
        // busybox ping opens a raw socket.
        for set in ["bounding", "effective", "permitted"] {
            spec["process"]["capabilities"][set] = json!(["CAP_NET_RAW"]);
        }
        run(&agent, "pinger", spec).await;
        let out = output(&agent, "pinger", false).await;
        let err = output(&agent, "pinger", true).await;
        let w = pod::wait_process(&agent, "pinger", "").await;
        assert_eq!(w.exit_status, 0, "ping failed: {out} {err}");
        assert!(out.contains("1 packets received"), "{out}");
        assert!(out.contains("default via 10.215.0.1 dev eth0"), "{out}");
        agent
            .remove_container("pinger", 5000)
            .await
            .expect("Remove");
        drop(agent);
        sandbox.shutdown().await.unwrap();
    });
    drop(tap);
    before.assert_nothing_leaked();
}
