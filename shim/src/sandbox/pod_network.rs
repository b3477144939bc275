//! The pod's CNI network carried into its VM, the way Kata's "tcfilter" model does it.
//!
//! CNI configured the pod's network namespace for a container on the host: a veth (`eth0`)
//! with the pod's IP, MAC, MTU, routes. The VM cannot use the veth itself, so per CNI
//! interface:
//! - [`discover`] reads it (MAC, MTU, addresses), the routes through it and its permanent
//!   neighbours, in the netns;
//! - the sandbox opens a tap ([`PodInterface::tap`]) beside it in the same netns and gives the
//!   VMM its fd, with the veth's MAC for the guest NIC ([`nets`]);
//! - [`connect`] gives the tap the veth's MTU and an ingress qdisc on both, with a tc `u32`
//!   match-all filter and `mirred` egress redirect each way: what arrives on the veth goes out
//!   the tap (to the guest), what the guest sends goes out the veth. The veth's IP stack in
//!   the netns never sees the pod's traffic;
//! - [`replay`] configures the guest NIC (found by that MAC) with the same name, addresses
//!   and MTU, then the routes and neighbours, through the agent.
//!
//! Nothing here needs undoing: the tap goes when the VMM (its only holder) exits, the veth's
//! qdisc and filter go with the veth when CNI deletes it.
//!
//! All of it runs on a dedicated thread inside the netns ([`network::in_netns`]), with a
//! current-thread tokio runtime for the netlink socket opened there.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use husk_agent_client::{ctx, Agent};
use husk_proto::agent as pb;
use husk_vmm_api::MacAddr;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::network;
use super::vm::NetSpec;
use super::{Result, SandboxError};

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;
/// tc's parent handle of an ingress qdisc (`ffff:`).
const TC_INGRESS_PARENT: u32 = 0xffff_0000;

/// One interface CNI made in the pod's netns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name in the netns, and the guest NIC's.
    pub name: String,
    pub mac: MacAddr,
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
    /// The tap made beside it for the VM.
    pub tap: String,
}

/// What the guest must be given to match the pod's netns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub interfaces: Vec<PodInterface>,
    /// Routes through those interfaces that the addresses do not imply, in dump order.
    pub routes: Vec<pb::Route>,
    /// Permanent neighbour entries on those interfaces.
    pub neighbours: Vec<pb::ARPNeighbor>,
}

impl PodNetwork {
    /// The VM's NICs: one per interface, on its tap, with the interface's MAC.
    pub fn nets(&self) -> Vec<NetSpec> {
        self.interfaces
            .iter()
            .map(|i| NetSpec {
                tap_name: i.tap.clone(),
                netns: Some(self.netns.clone()),
                mac: Some(i.mac),
            })
            .collect()
    }
}

/// The tap for the `n`th interface: a name CNI never gives (and ≤ 15 bytes).
pub fn tap_name(n: usize) -> String {
    format!("tap{n}_husk")
}

fn is_our_tap(name: &str) -> bool {
    name.starts_with("tap") && name.ends_with("_husk")
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> SandboxError {
    let op = op.into();
    move |e| SandboxError::Network {
        op,
        message: e.to_string(),
    }
}

/// Runs `f` with a netlink handle bound to `netns`, on a thread of its own in it.
fn with_netlink<T: Send>(
    netns: &Path,
    f: impl AsyncFnOnce(&Handle) -> Result<T> + Send,
) -> Result<T> {
    network::in_netns(Some(netns), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| SandboxError::io("start a netlink runtime", e))?;
        rt.block_on(async {
            // The socket belongs to the namespace of the thread that opens it: this one.
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| SandboxError::io("open a netlink socket", e))?;
            let task = tokio::spawn(conn);
            let r = f(&handle).await;
            task.abort();
            r
        })
    })
}

/// Reads the CNI interfaces of `netns` (every Ethernet link but our taps), their routes and
/// permanent neighbours. Blocks.
pub fn discover(netns: &Path) -> Result<PodNetwork> {
    with_netlink(netns, async |h: &Handle| {
        let links: Vec<LinkMessage> = h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list links"))?;
        let addrs: Vec<AddressMessage> = h
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list addresses"))?;
        let mut interfaces = Vec::new();
        let mut names = HashMap::new();
        for l in &links {
            let Some(name) = link_name(l) else { continue };
            if l.header.link_layer_type != LinkLayerType::Ether || is_our_tap(&name) {
                continue;
            }
            let Some(mac) = link_mac(l) else { continue };
            let mtu = l
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
                .unwrap_or(0);
            let addresses = addrs
                .iter()
                .filter(|a| a.header.index == l.header.index)
                .filter_map(|a| addr_of(a).map(|ip| (ip, a.header.prefix_len)))
                // IPv6 link-local addresses are the guest kernel's own to make.
                .filter(|(ip, _)| !is_link_local(ip))
                .collect();
            names.insert(l.header.index, name.clone());
            interfaces.push(PodInterface {
                tap: tap_name(interfaces.len()),
                name,
                mac,
                mtu,
                addresses,
            });
        }
        let routes = routes_on(h, &names).await?;
        let neighbours = neighbours_on(h, &names).await?;
        Ok(PodNetwork {
            netns: netns.to_path_buf(),
            interfaces,
            routes,
            neighbours,
        })
    })
}

/// The main table's unicast routes on `names`' links, without those the kernel derives from
/// addresses (the guest's kernel derives them too).
async fn routes_on(h: &Handle, names: &HashMap<u32, String>) -> Result<Vec<pb::Route>> {
    let mut out = Vec::new();
    for query in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let dump: Vec<RouteMessage> = h
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list routes"))?;
        for m in dump {
            if m.header.protocol == RouteProtocol::Kernel
                || m.header.kind != RouteType::Unicast
                || route_table(&m) != RT_TABLE_MAIN
            {
                continue;
            }
            let mut r = pb::Route::new();
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => {
                        if let Some(ip) = route_ip(d) {
                            r.dest = format!("{ip}/{}", m.header.destination_prefix_length);
                        }
                    }
                    RouteAttribute::Gateway(g) => {
                        r.gateway = route_ip(g).map(|i| i.to_string()).unwrap_or_default()
                    }
                    RouteAttribute::PrefSource(s) => {
                        r.source = route_ip(s).map(|i| i.to_string()).unwrap_or_default()
                    }
                    RouteAttribute::Oif(o) => oif = names.get(o).cloned(),
                    _ => {}
                }
            }
            // A route on another link (none in a CNI netns) or a multipath one: not ours.
            let Some(device) = oif else { continue };
            r.device = device;
            r.scope = u8::from(m.header.scope).into();
            out.push(r);
        }
    }
    Ok(out)
}

/// Permanent neighbour entries on `names`' links (CNI plugins may pin a gateway's MAC).
async fn neighbours_on(h: &Handle, names: &HashMap<u32, String>) -> Result<Vec<pb::ARPNeighbor>> {
    let dump: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list neighbours"))?;
    Ok(dump
        .iter()
        .filter(|n| n.header.state == NeighbourState::Permanent)
        .filter_map(|n| {
            let device = names.get(&n.header.ifindex)?.clone();
            let ip = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    Some(IpAddr::V6(*v6))
                }
                _ => None,
            })?;
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => Some(m.clone()),
                _ => None,
            })?;
            let mut p = pb::ARPNeighbor::new();
            p.ip_address = ip.to_string();
            p.device = device;
            p.ll_addr = format_mac(&mac);
            p.state = 0;
            Some(p)
        })
        .collect())
}

/// Joins each interface to its tap (which must exist: the VMM holds it): the tap gets the
/// interface's MTU, both an ingress qdisc, and a tc filter on each redirects everything that
/// arrives to the other's egress. Blocks.
pub fn connect(net: &PodNetwork) -> Result<()> {
    if net.interfaces.is_empty() {
        return Ok(());
    }
    with_netlink(&net.netns, async |h: &Handle| {
        for i in &net.interfaces {
            let veth = index_of(h, &i.name).await?;
            let tap = index_of(h, &i.tap).await?;
            if i.mtu > 0 {
                h.link()
                    .set(LinkUnspec::new_with_index(tap).mtu(i.mtu).build())
                    .execute()
                    .await
                    .map_err(nl(format!("set the MTU of {} to {}", i.tap, i.mtu)))?;
            }
            for (from, from_name, to, to_name) in
                [(veth, &i.name, tap, &i.tap), (tap, &i.tap, veth, &i.name)]
            {
                // `replace`: a veth that already has an ingress qdisc (a retried Create)
                // keeps one.
                h.qdisc()
                    .replace(from as i32)
                    .ingress()
                    .execute()
                    .await
                    .map_err(nl(format!("add an ingress qdisc to {from_name}")))?;
                h.traffic_filter(from as i32)
                    .add()
                    .parent(TC_INGRESS_PARENT)
                    // The kernel compares the filter's protocol with skb->protocol, which
                    // is in network byte order.
                    .protocol((libc::ETH_P_ALL as u16).to_be())
                    .redirect(to)
                    .map_err(nl("build a mirred filter"))?
                    .execute()
                    .await
                    .map_err(nl(format!(
                        "add a tc mirred redirect from {from_name} to {to_name}"
                    )))?;
            }
            tracing::debug!(veth = %i.name, tap = %i.tap, mtu = i.mtu, "tc mirred both ways");
        }
        Ok(())
    })
}

async fn index_of(h: &Handle, name: &str) -> Result<u32> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        Ok(None) => Err(SandboxError::Network {
            op: format!("find {name}"),
            message: "no such interface in the pod's netns".into(),
        }),
        Err(e) => Err(nl(format!("find {name}"))(e)),
    }
}

/// Configures the guest like the pod's netns: each NIC (by MAC) renamed, addressed, sized and
/// up; then the routes and neighbours.
pub async fn replay(agent: &Agent, net: &PodNetwork, timeout: std::time::Duration) -> Result<()> {
    let call = |name: &'static str| {
        move |e| SandboxError::Agent(husk_agent_client::AgentError::call(name, e))
    };
    for i in &net.interfaces {
        let mut iface = pb::Interface::new();
        iface.name = i.name.clone();
        iface.hw_addr = i.mac.to_string();
        iface.mtu = i.mtu;
        iface.up = true;
        for (ip, len) in &i.addresses {
            let mut a = pb::IPAddress::new();
            a.address = ip.to_string();
            a.prefix_len = (*len).into();
            iface.addresses.push(a);
        }
        let mut req = pb::UpdateInterfaceRequest::new();
        req.interface = Some(iface).into();
        agent
            .network
            .update_interface(ctx(timeout), &req)
            .await
            .map_err(call("UpdateInterface"))?;
    }
    if !net.routes.is_empty() {
        let mut req = pb::UpdateRoutesRequest::new();
        req.routes = net.routes.clone();
        agent
            .network
            .update_routes(ctx(timeout), &req)
            .await
            .map_err(call("UpdateRoutes"))?;
    }
    if !net.neighbours.is_empty() {
        let mut req = pb::AddARPNeighborsRequest::new();
        req.neighbors = net.neighbours.clone();
        agent
            .network
            .add_arp_neighbors(ctx(timeout), &req)
            .await
            .map_err(call("AddARPNeighbors"))?;
    }
    Ok(())
}

fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table.into())
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn link_mac(l: &LinkMessage) -> Option<MacAddr> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok().map(MacAddr),
        _ => None,
    })
}

fn addr_of(m: &AddressMessage) -> Option<IpAddr> {
    // IPv4 reports the interface's own address as Local (Address is the peer on p2p links).
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn format_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Once the VM runs (the VMM holding the taps): joins the taps to the interfaces and
/// configures the guest to match.
pub async fn attach(agent: &Agent, net: &PodNetwork, timeout: std::time::Duration) -> Result<()> {
    let n = net.clone();
    tokio::task::spawn_blocking(move || connect(&n))
        .await
        .map_err(|e| SandboxError::Invalid(format!("the tc set-up task failed: {e}")))??;
    replay(agent, net, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn ip_in(ns: &Path, args: &[&str]) -> String {
        let o = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(args)
            .output()
            .expect("nsenter (util-linux)");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A netns set up as CNI's bridge plugin leaves it (a veth `eth0` with an address, MTU,
    /// a default route and a permanent neighbour): discovered as such, and once a tap is
    /// beside it, joined to it by ingress qdiscs and mirred redirects both ways.
    #[test]
    fn discovers_a_cni_netns_and_joins_the_tap_to_the_veth() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "needs root (netns, veth, tap, tc)"
        );
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("pod-ns");
        network::create_netns(&ns).unwrap();
        ip_in(
            &ns,
            &[
                "ip", "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "peer0",
            ],
        );
        ip_in(
            &ns,
            &["ip", "link", "set", "eth0", "address", "0a:58:0a:00:00:05"],
        );
        ip_in(&ns, &["ip", "link", "set", "eth0", "up"]);
        ip_in(&ns, &["ip", "link", "set", "peer0", "up"]);
        ip_in(&ns, &["ip", "addr", "add", "10.9.0.5/24", "dev", "eth0"]);
        ip_in(
            &ns,
            &[
                "ip", "route", "add", "default", "via", "10.9.0.1", "dev", "eth0",
            ],
        );
        ip_in(
            &ns,
            &[
                "ip",
                "neigh",
                "add",
                "10.9.0.1",
                "lladdr",
                "0a:58:0a:00:00:01",
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );

        let net = discover(&ns).unwrap();
        // Both veth ends are in this netns here; CNI leaves only eth0 in a pod's.
        let eth0 = net
            .interfaces
            .iter()
            .find(|i| i.name == "eth0")
            .expect("eth0 found");
        assert_eq!(eth0.mac.to_string(), "0a:58:0a:00:00:05");
        assert_eq!(eth0.mtu, 1400);
        assert_eq!(eth0.addresses, vec![("10.9.0.5".parse().unwrap(), 24)]);
        let default: Vec<_> = net
            .routes
            .iter()
            .filter(|r| r.device == "eth0")
            .map(|r| (r.dest.as_str(), r.gateway.as_str()))
            .collect();
        assert_eq!(
            default,
            vec![("", "10.9.0.1")],
            "the subnet route is the kernel's: {:?}",
            net.routes
        );
        assert_eq!(net.neighbours.len(), 1, "{:?}", net.neighbours);
        assert_eq!(net.neighbours[0].ip_address, "10.9.0.1");
        assert_eq!(net.neighbours[0].ll_addr, "0a:58:0a:00:00:01");
        assert_eq!(net.neighbours[0].device, "eth0");

        // Only eth0: the test's second veth end stands for the bridge side.
        let mut net = net;
        net.interfaces.retain(|i| i.name == "eth0");
        net.interfaces[0].tap = tap_name(0);
        let tap = network::open_tap(Some(&ns), &tap_name(0)).unwrap();
        connect(&net).unwrap();
        let link = ip_in(&ns, &["ip", "-o", "link", "show", "tap0_husk"]);
        assert!(link.contains("mtu 1400"), "{link}");
        for (from, to) in [("eth0", "tap0_husk"), ("tap0_husk", "eth0")] {
            let f = ip_in(&ns, &["tc", "filter", "show", "dev", from, "ingress"]);
            assert!(
                f.contains("mirred") && f.contains(&format!("Redirect to device {to}")),
                "{from}'s ingress filters: {f}"
            );
            assert!(f.contains("protocol all"), "{from}'s ingress filters: {f}");
        }
        drop(tap);
        network::remove_netns(&ns).unwrap();
    }
}
