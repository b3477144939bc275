//! The sandbox's network, configured by rtnetlink: the interface CNI gave the pod (found by
//! MAC), its addresses, MTU, routes and static neighbours.
//!
//! In the guest this is the agent's own network namespace. In host mode it is the sandbox's
//! namespace: the netlink socket is opened from a thread that entered it, so every request
//! on it acts there and the host's network is never touched.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::AgentError;
use husk_proto::agent as pb;

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// Network configuration failures.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("netlink {op}: {source}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("netlink socket: {0}")]
    Socket(String),
}

impl From<NetError> for AgentError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Invalid(m) => AgentError::InvalidArgument(m),
            NetError::NotFound(m) => AgentError::NotFound(m),
            other => AgentError::Internal(other.to_string()),
        }
    }
}

type Result<T, E = NetError> = std::result::Result<T, E>;

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |source| NetError::Netlink { op, source }
}

/// A netlink connection bound to one network namespace.
pub struct Net {
    handle: Handle,
    /// One dump at a time: the kernel answers a dump request with EBUSY while another dump
    /// runs on the same netlink socket (seen when an RPC's link list met the agent's own
    /// `lo` set-up at boot).
    dumps: tokio::sync::Mutex<()>,
}

impl Net {
    /// Connects in the agent's namespace, or in `netns` (an nsfs file) when given.
    pub async fn connect(netns: Option<&Path>) -> Result<Net> {
        let (conn, handle) = match netns {
            None => {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|e| NetError::Socket(e.to_string()))?;
                (conn, handle)
            }
            Some(path) => {
                let path: PathBuf = path.to_path_buf();
                let rt = tokio::runtime::Handle::current();
                // A throwaway thread enters the namespace, so no tokio worker changes namespace.
                std::thread::spawn(move || {
                    let f = std::fs::File::open(&path)
                        .map_err(|e| NetError::Socket(format!("open {}: {e}", path.display())))?;
                    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| NetError::Socket(format!("setns {}: {e}", path.display())))?;
                    let _guard = rt.enter();
                    let (conn, handle, _) =
                        rtnetlink::new_connection().map_err(|e| NetError::Socket(e.to_string()))?;
                    Ok::<_, NetError>((conn, handle))
                })
                .join()
                .map_err(|_| NetError::Socket("netns thread panicked".into()))??
            }
        };
        tokio::spawn(conn);
        Ok(Net {
            handle,
            dumps: tokio::sync::Mutex::new(()),
        })
    }

    async fn links(&self) -> Result<Vec<LinkMessage>> {
        let _dump = self.dumps.lock().await;
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list links"))
    }

    async fn index_by_name(&self, name: &str) -> Result<u32> {
        let links = self.links().await?;
        links
            .iter()
            .find(|l| link_name(l).as_deref() == Some(name))
            .map(|l| l.header.index)
            .ok_or_else(|| {
                NetError::NotFound(format!("no interface named {name:?} in the sandbox"))
            })
    }

    /// Brings the named interface up (the guest's `lo` at boot: nothing else would).
    pub async fn link_up(&self, name: &str) -> Result<()> {
        let index = self.index_by_name(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {name} up")))
    }

    /// Configures the interface with the request's MAC address; returns what it became.
    pub async fn update_interface(&self, req: &pb::Interface) -> Result<pb::Interface> {
        let mac = parse_mac(&req.hw_addr)?;
        let links = self.links().await?;
        let link = links
            .iter()
            .find(|l| link_mac(l).as_deref() == Some(&mac[..]))
            .ok_or_else(|| {
                NetError::NotFound(format!(
                    "no interface with MAC {} in the sandbox: is the NIC attached to the VM?",
                    req.hw_addr
                ))
            })?;
        let index = link.header.index;
        let mut addrs = Vec::new();
        for a in &req.addresses {
            addrs.push(parse_addr(&a.address, a.prefix_len)?);
        }

        // Renaming needs the link down; set everything while it is, then bring it up.
        let name_change =
            !req.name.is_empty() && link_name(link).as_deref() != Some(req.name.as_str());
        if name_change {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).down().build())
                .execute()
                .await
                .map_err(nl("set link down"))?;
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .name(req.name.clone())
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("rename link to {}", req.name)))?;
        }
        if req.mtu > 0 {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(req.mtu).build())
                .execute()
                .await
                .map_err(nl(format!("set MTU {}", req.mtu)))?;
        }

        // Replace the addresses (keep IPv6 link-local ones: the kernel owns those).
        let dump = self.dumps.lock().await;
        let existing: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list addresses"))?;
        drop(dump);
        for m in existing {
            let keep = addr_of(&m).is_some_and(
                |ip| matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80),
            );
            if !keep {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(nl("delete address"))?;
            }
        }
        for (ip, len) in addrs {
            self.handle
                .address()
                .add(index, ip, len)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("add address {ip}/{len}")))?;
        }

        let b = LinkUnspec::new_with_index(index);
        let b = if req.up { b.up() } else { b.down() };
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(nl("set link state"))?;

        self.list_interfaces()
            .await?
            .into_iter()
            .find(|i| parse_mac(&i.hw_addr).ok() == Some(mac))
            .ok_or_else(|| {
                NetError::NotFound("the interface vanished while being configured".into())
            })
    }

    /// Replaces the routes on the interfaces the request names with the given ones.
    pub async fn update_routes(&self, routes: &[pb::Route]) -> Result<Vec<pb::Route>> {
        let mut built = Vec::new();
        let mut devices = HashMap::new();
        for r in routes {
            if r.device.is_empty() {
                return Err(NetError::Invalid(format!(
                    "route to {:?} has no device",
                    r.dest
                )));
            }
            let idx = match devices.get(&r.device) {
                Some(i) => *i,
                None => {
                    let i = self.index_by_name(&r.device).await?;
                    devices.insert(r.device.clone(), i);
                    i
                }
            };
            built.push(build_route(r, idx)?);
        }
        // Remove what we (or anyone but the kernel) put on those devices before.
        for m in self.route_dump().await? {
            let on_dev = route_oif(&m).is_some_and(|o| devices.values().any(|&i| i == o));
            if on_dev && m.header.protocol != RouteProtocol::Kernel {
                self.handle
                    .route()
                    .del(m)
                    .execute()
                    .await
                    .map_err(nl("delete route"))?;
            }
        }
        for (r, m) in routes.iter().zip(built) {
            self.handle
                .route()
                .add(m)
                .replace()
                .execute()
                .await
                .map_err(nl(format!(
                    "add route {:?} via {:?} dev {}",
                    r.dest, r.gateway, r.device
                )))?;
        }
        self.list_routes().await
    }

    /// Adds or replaces static neighbour entries.
    pub async fn add_neighbors(&self, neighbors: &[pb::ARPNeighbor]) -> Result<()> {
        for n in neighbors {
            let ip: IpAddr = n.ip_address.parse().map_err(|_| {
                NetError::Invalid(format!(
                    "neighbour address {:?} is not an IP address",
                    n.ip_address
                ))
            })?;
            let mac = parse_mac(&n.ll_addr)?;
            let idx = self.index_by_name(&n.device).await?;
            let state =
                if n.state == 0 {
                    NeighbourState::Permanent
                } else {
                    NeighbourState::from(u16::try_from(n.state).map_err(|_| {
                        NetError::Invalid(format!("bad neighbour state {}", n.state))
                    })?)
                };
            self.handle
                .neighbours()
                .add(idx, ip)
                .link_layer_address(&mac)
                .state(state)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("add neighbour {ip} dev {}", n.device)))?;
        }
        Ok(())
    }

    /// All interfaces with their addresses.
    pub async fn list_interfaces(&self) -> Result<Vec<pb::Interface>> {
        let links = self.links().await?;
        let dump = self.dumps.lock().await;
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list addresses"))?;
        drop(dump);
        Ok(links
            .iter()
            .map(|l| {
                let mut i = pb::Interface::new();
                i.name = link_name(l).unwrap_or_default();
                i.hw_addr = link_mac(l).map(|m| format_mac(&m)).unwrap_or_default();
                i.mtu = l
                    .attributes
                    .iter()
                    .find_map(|a| {
                        if let LinkAttribute::Mtu(m) = a {
                            Some(*m)
                        } else {
                            None
                        }
                    })
                    .unwrap_or(0);
                i.up = l.header.flags.contains(LinkFlags::Up);
                for a in addrs.iter().filter(|a| a.header.index == l.header.index) {
                    if let Some(ip) = addr_of(a) {
                        let mut pa = pb::IPAddress::new();
                        pa.address = ip.to_string();
                        pa.prefix_len = a.header.prefix_len.into();
                        i.addresses.push(pa);
                    }
                }
                i
            })
            .collect())
    }

    async fn route_dump(&self) -> Result<Vec<RouteMessage>> {
        let mut all = Vec::new();
        for b in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let _dump = self.dumps.lock().await;
            let v: Vec<RouteMessage> = self
                .handle
                .route()
                .get(b)
                .execute()
                .try_collect()
                .await
                .map_err(nl("list routes"))?;
            all.extend(v.into_iter().filter(|m| route_table(m) == RT_TABLE_MAIN));
        }
        Ok(all)
    }

    /// The main table's routes.
    pub async fn list_routes(&self) -> Result<Vec<pb::Route>> {
        let names: HashMap<u32, String> = self
            .links()
            .await?
            .iter()
            .map(|l| (l.header.index, link_name(l).unwrap_or_default()))
            .collect();
        Ok(self
            .route_dump()
            .await?
            .iter()
            .map(|m| {
                let mut r = pb::Route::new();
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
                        RouteAttribute::Oif(o) => {
                            r.device = names.get(o).cloned().unwrap_or_default()
                        }
                        _ => {}
                    }
                }
                r.scope = u8::from(m.header.scope).into();
                r
            })
            .collect())
    }
}

fn build_route(r: &pb::Route, idx: u32) -> Result<RouteMessage> {
    let gw: Option<IpAddr> = if r.gateway.is_empty() {
        None
    } else {
        Some(r.gateway.parse().map_err(|_| {
            NetError::Invalid(format!(
                "route gateway {:?} is not an IP address",
                r.gateway
            ))
        })?)
    };
    let (dest, len) = if r.dest.is_empty() || r.dest == "default" {
        match gw {
            Some(IpAddr::V6(_)) => (IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
            _ => (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
        }
    } else {
        let (a, l) = r.dest.split_once('/').unwrap_or((r.dest.as_str(), ""));
        let ip: IpAddr = a.parse().map_err(|_| {
            NetError::Invalid(format!("route destination {:?} is not a CIDR", r.dest))
        })?;
        let len = if l.is_empty() {
            if ip.is_ipv4() {
                32
            } else {
                128
            }
        } else {
            l.parse::<u8>().map_err(|_| {
                NetError::Invalid(format!(
                    "route destination {:?} has a bad prefix length",
                    r.dest
                ))
            })?
        };
        (ip, len)
    };
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest, len)
        .map_err(|e| invalid_route(r, e))?;
    if let Some(g) = gw {
        b = b.gateway(g).map_err(|e| invalid_route(r, e))?;
    }
    if !r.source.is_empty() {
        let s: IpAddr = r.source.parse().map_err(|_| {
            NetError::Invalid(format!("route source {:?} is not an IP address", r.source))
        })?;
        b = b.pref_source(s).map_err(|e| invalid_route(r, e))?;
    }
    let scope = u8::try_from(r.scope)
        .map_err(|_| NetError::Invalid(format!("bad route scope {}", r.scope)))?;
    Ok(b.output_interface(idx)
        .scope(RouteScope::from(scope))
        .build())
}

fn invalid_route(r: &pb::Route, e: impl std::fmt::Display) -> NetError {
    NetError::Invalid(format!("route {:?}: {e}", r.dest))
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| {
            if let RouteAttribute::Table(t) = a {
                Some(*t)
            } else {
                None
            }
        })
        .unwrap_or(m.header.table.into())
}

fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| {
        if let RouteAttribute::Oif(o) = a {
            Some(*o)
        } else {
            None
        }
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| {
        if let LinkAttribute::IfName(n) = a {
            Some(n.clone())
        } else {
            None
        }
    })
}

fn link_mac(l: &LinkMessage) -> Option<Vec<u8>> {
    l.attributes.iter().find_map(|a| {
        if let LinkAttribute::Address(m) = a {
            Some(m.clone())
        } else {
            None
        }
    })
}

fn addr_of(m: &AddressMessage) -> Option<IpAddr> {
    // IPv4 reports the interface's own address as Local (Address is the peer on p2p links).
    m.attributes
        .iter()
        .find_map(|a| {
            if let AddressAttribute::Local(ip) = a {
                Some(*ip)
            } else {
                None
            }
        })
        .or_else(|| {
            m.attributes.iter().find_map(|a| {
                if let AddressAttribute::Address(ip) = a {
                    Some(*ip)
                } else {
                    None
                }
            })
        })
}

fn parse_addr(addr: &str, len: u32) -> Result<(IpAddr, u8)> {
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| NetError::Invalid(format!("address {addr:?} is not an IP address")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(NetError::Invalid(format!(
            "prefix length {len} is too long for {addr}"
        )));
    }
    Ok((ip, len as u8))
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || {
        NetError::Invalid(format!(
            "MAC address {s:?} is not of the form aa:bb:cc:dd:ee:ff"
        ))
    };
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

fn format_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:0a:58:00:05").unwrap(),
            [2, 0, 10, 0x58, 0, 5]
        );
        assert!(parse_mac("02:00:0a:58:00").is_err());
        assert!(parse_mac("zz:00:0a:58:00:05").is_err());
        assert_eq!(format_mac(&[2, 0, 10, 0x58, 0, 5]), "02:00:0a:58:00:05");
    }

    #[test]
    fn routes_parse() {
        let mut r = pb::Route::new();
        r.dest = "10.0.0.0/8".into();
        r.device = "eth0".into();
        assert!(build_route(&r, 2).is_ok());
        r.dest = "10.0.0.0/99".into();
        assert!(build_route(&r, 2).is_err());
        r.dest = String::new();
        r.gateway = "10.88.0.1".into();
        assert!(build_route(&r, 2).is_ok());
        r.gateway = "nope".into();
        assert!(matches!(build_route(&r, 2), Err(NetError::Invalid(_))));
    }
}
