//! The sandbox layer with a pod network namespace: the tap lives in the pod's netns while
//! husk-vmm stays in ours, holding the tap through the fd the sandbox passed it.
use std::process::Command;

use husk_proto::agent as pb;
use husk_shim::sandbox::network;
use husk_shim::sandbox::vm::NetSpec;
use husk_shim::spec::default_spec;
use husk_tests::leaks::Snapshot;
use husk_tests::pod;
use serde_json::json;

fn ip_in(ns: &std::path::Path, args: &[&str]) {
    let st = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("ip")
        .args(args)
        .status()
        .expect("nsenter ip");
    assert!(st.success(), "ip {args:?} in {}", ns.display());
}

#[test]
fn guest_reaches_its_tap_in_the_pod_netns() {
    husk_tests::require_kvm();
    let before = Snapshot::take();
    let dir = std::env::temp_dir().join(format!("husk-kvm-podns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ns = dir.join("pod-ns");
    network::create_netns(&ns).unwrap();
    ip_in(&ns, &["tuntap", "add", "dev", "huskpod0", "mode", "tap"]);
    ip_in(&ns, &["addr", "add", "10.216.0.1/24", "dev", "huskpod0"]);
    ip_in(&ns, &["link", "set", "huskpod0", "up"]);
    let mac = husk_vmm_api::MacAddr::parse("06:00:0a:d8:00:02").unwrap();
    let mut spec = pod::spec();
    spec.nets.push(NetSpec {
        tap_name: "huskpod0".into(),
        netns: Some(ns.clone()),
        mac: Some(mac),
    });
    pod::runtime().block_on(async {
        let name = format!("podns-{}", std::process::id());
        let (sandbox, _) = pod::boot(&name, "podns", &spec).await;
        let vmm = sandbox.vm().vmm_pid().unwrap();
        assert_eq!(
            std::fs::read_link(format!("/proc/{vmm}/ns/net")).unwrap(),
            std::fs::read_link("/proc/self/ns/net").unwrap(),
            "the VMM stays in our netns"
        );
        assert!(
            !std::path::Path::new("/sys/class/net/huskpod0").exists(),
            "the tap is not in our netns"
        );
        let agent = sandbox.agent().clone();
        let mut iface = pb::Interface::new();
        iface.name = "eth0".into();
        iface.hw_addr = mac.to_string();
        iface.up = true;
        iface.mtu = 1500;
        let mut addr = pb::IPAddress::new();
        addr.address = "10.216.0.2".into();
        addr.prefix_len = 24;
        iface.addresses.push(addr);
        let mut req = pb::UpdateInterfaceRequest::new();
        req.interface = Some(iface).into();
        agent
            .network
            .update_interface(
                husk_agent_client::ctx(husk_agent_client::CALL_TIMEOUT),
                &req,
            )
            .await
            .expect("UpdateInterface");
        let mut spec = default_spec(
            &[
                "ping".into(),
                "-c".into(),
                "1".into(),
                "-W".into(),
                "10".into(),
                "10.216.0.1".into(),
            ],
            &[],
            false,
        );
        // busybox ping opens a raw socket.
        for set in ["bounding", "effective", "permitted"] {
            spec["process"]["capabilities"][set] = json!(["CAP_NET_RAW"]);
        }
        let rootfs = husk_agent_client::Rootfs::embedded(husk_proto::DEFAULT_EMBEDDED_IMAGE);
        agent
            .create_container("pinger", &spec, &rootfs, false)
            .await
            .expect("CreateContainer");
        agent
            .start_container("pinger")
            .await
            .expect("StartContainer");
        let out = agent.read_to_end("pinger", "", false).await.unwrap();
        let w = agent.wait_process("pinger", "").await.expect("WaitProcess");
        let out = String::from_utf8_lossy(&out);
        assert_eq!(w.exit_status, 0, "ping failed: {out}");
        assert!(out.contains("1 packets received"), "{out}");
        drop(agent);
        sandbox.shutdown().await.unwrap();
    });
    network::remove_netns(&ns).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    before.assert_nothing_leaked();
}
