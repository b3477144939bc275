//! The network RPCs, configuring the sandbox's network namespace and not the host's.

use husk_proto::agent as pb;

use crate::common::*;

#[tokio::test]
async fn network_rpcs_configure_the_sandbox_namespace() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("net").await;
    a.create_sandbox("pod-host", false).await;
    let netns = a.state_dir().join("sandbox/netns");
    // Stand-in for the VM's virtio-net NIC: a tap device (this host has no veth/dummy).
    ip_in(&netns, &["tuntap", "add", "tap9", "mode", "tap"]);
    ip_in(
        &netns,
        &["link", "set", "tap9", "address", "02:00:0a:58:00:05"],
    );

    let mut iface = pb::Interface::new();
    iface.name = "eth0".into();
    iface.hw_addr = "02:00:0a:58:00:05".into();
    iface.mtu = 1400;
    iface.up = true;
    let mut addr = pb::IPAddress::new();
    addr.address = "10.88.0.5".into();
    addr.prefix_len = 16;
    iface.addresses.push(addr);
    let mut req = pb::UpdateInterfaceRequest::new();
    req.interface = Some(iface.clone()).into();
    let got = a
        .network
        .update_interface(ctx(), &req)
        .await
        .expect("UpdateInterface");
    assert_eq!(got.name, "eth0");
    assert_eq!(got.mtu, 1400);
    assert!(got.up);
    assert!(
        got.addresses
            .iter()
            .any(|a| a.address == "10.88.0.5" && a.prefix_len == 16),
        "{got:?}"
    );
    let shown = ip_in(&netns, &["addr", "show", "eth0"]);
    assert!(
        shown.contains("inet 10.88.0.5/16") && shown.contains("mtu 1400"),
        "{shown}"
    );

    let mut route = pb::Route::new();
    route.gateway = "10.88.0.1".into();
    route.device = "eth0".into();
    let mut rr = pb::UpdateRoutesRequest::new();
    rr.routes.push(route);
    let routes = a
        .network
        .update_routes(ctx(), &rr)
        .await
        .expect("UpdateRoutes");
    assert!(
        routes
            .routes
            .iter()
            .any(|r| r.dest.is_empty() && r.gateway == "10.88.0.1" && r.device == "eth0"),
        "{routes:?}"
    );
    let shown = ip_in(&netns, &["route"]);
    assert!(shown.contains("default via 10.88.0.1 dev eth0"), "{shown}");

    let mut n = pb::ARPNeighbor::new();
    n.ip_address = "10.88.0.1".into();
    n.device = "eth0".into();
    n.ll_addr = "02:00:0a:58:00:01".into();
    let mut nr = pb::AddARPNeighborsRequest::new();
    nr.neighbors.push(n);
    a.network
        .add_arp_neighbors(ctx(), &nr)
        .await
        .expect("AddARPNeighbors");
    let shown = ip_in(&netns, &["neigh"]);
    assert!(
        shown.contains("10.88.0.1 dev eth0 lladdr 02:00:0a:58:00:01 PERMANENT"),
        "{shown}"
    );

    let list = a
        .network
        .list_interfaces(ctx(), &pb::Empty::new())
        .await
        .unwrap();
    assert!(list.interfaces.iter().any(|i| i.name == "lo"));
    assert!(list.interfaces.iter().any(|i| i.name == "eth0"));

    // Errors: unknown MAC, bad address, unknown device.
    iface.hw_addr = "02:00:00:00:00:99".into();
    req.interface = Some(iface.clone()).into();
    assert_eq!(
        code(a.network.update_interface(ctx(), &req).await),
        ttrpc::Code::NOT_FOUND
    );
    iface.hw_addr = "not-a-mac".into();
    req.interface = Some(iface).into();
    assert_eq!(
        code(a.network.update_interface(ctx(), &req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    rr.routes[0].device = "eth9".into();
    assert_eq!(
        code(a.network.update_routes(ctx(), &rr).await),
        ttrpc::Code::NOT_FOUND
    );

    // The host's network is untouched.
    let host = std::process::Command::new("ip")
        .args(["addr"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&host.stdout).contains("10.88.0.5"));
    a.shutdown().await;
}
