//! Guest-mode tests without a VM: the agent runs as PID 1 of fresh namespaces (unshare), so
//! the code paths of the pod VM run: PID-1 set-up and reaping, the sandbox in the agent's own
//! network namespace, network RPCs on it. Needs root and util-linux's unshare/nsenter.

mod common;

use common::*;
use husk_proto::agent as pb;

/// `ip ARGS` in the network namespace of process `pid`.
fn ip_in_pid(pid: i32, args: &[&str]) -> String {
    ip_in(std::path::Path::new(&format!("/proc/{pid}/ns/net")), args)
}

#[tokio::test]
async fn guest_mode_runs_containers_in_the_agents_namespaces() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start_guest("guest").await;
    let agent = a.agent_pid();
    a.create_sandbox("guest-pod", false).await;
    // The agent set the hostname of its (the VM's) UTS namespace.
    let out = std::process::Command::new("nsenter")
        .args([&format!("--uts=/proc/{agent}/ns/uts"), "hostname"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "guest-pod");

    // Containers share the agent's network namespace (the VM's, with its NIC).
    a.run(
        "c1",
        &spec(&["sh", "-c", "readlink /proc/self/ns/net; echo $$"]),
    )
    .await;
    let out = a.read_all("c1", "", false).await;
    assert_eq!(a.wait("c1", "").await.exit_status, 0);
    let agent_net = std::fs::read_link(format!("/proc/{agent}/ns/net")).unwrap();
    assert_eq!(out.lines().next().unwrap(), agent_net.to_str().unwrap());
    assert_eq!(
        out.lines().nth(1).unwrap(),
        "1",
        "the container has its own PID namespace"
    );

    // The agent brought the guest's loopback up at start.
    let lo = ip_in_pid(agent, &["link", "show", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");

    // Network RPCs act on the agent's own namespace.
    ip_in_pid(agent, &["tuntap", "add", "tap7", "mode", "tap"]);
    ip_in_pid(
        agent,
        &["link", "set", "tap7", "address", "02:00:0a:58:00:07"],
    );
    let mut iface = pb::Interface::new();
    iface.name = "eth0".into();
    iface.hw_addr = "02:00:0a:58:00:07".into();
    iface.up = true;
    let mut addr = pb::IPAddress::new();
    addr.address = "10.89.0.7".into();
    addr.prefix_len = 24;
    iface.addresses.push(addr);
    let mut req = pb::UpdateInterfaceRequest::new();
    req.interface = Some(iface).into();
    a.network
        .update_interface(ctx(), &req)
        .await
        .expect("UpdateInterface");
    let shown = ip_in_pid(agent, &["addr", "show", "eth0"]);
    assert!(shown.contains("inet 10.89.0.7/24"), "{shown}");

    // Orphans are reaped: what a container leaves behind when its init exits is re-parented
    // to the agent (PID 1), which must not leave it a zombie.
    a.run("c2", &spec(&["sh", "-c", "sleep 0.3 & exit 0"]))
        .await;
    assert_eq!(a.wait("c2", "").await.exit_status, 0);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let kids =
        std::fs::read_to_string(format!("/proc/{agent}/task/{agent}/children")).unwrap_or_default();
    for k in kids.split_whitespace() {
        let stat = std::fs::read_to_string(format!("/proc/{k}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().unwrap_or("").chars().next();
        assert_ne!(state, Some('Z'), "zombie child {k} of the agent: {stat}");
    }
    a.shutdown().await;
}
