//! Pod networking through containerd's CRI and CNI (bridge, host-local, portmap): the
//! shim carries the CNI interface of each pod's netns into its VM (a tap with tc mirred both
//! ways, the veth's MAC, IPs and routes replayed to the agent). Two pods in two VMs ping
//! each other by their CNI IPs, a container sees its CNI IP on eth0, and a hostPort answers
//! from the host. Each test ends with the leak snapshot (no netns, veth, VMM, ... left).
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_tests::containerd::{images, Cri, HANDLER_HUSK, HANDLER_KATA};
use k8s_cri::v1 as cri;

use super::failure::{ok, with_containerd};

/// The shim's tap for a pod's first CNI interface (`husk_shim::sandbox::pod_network`).
const TAP: &str = "tap0_husk";

/// `ip -o link show TAP` in each CNI netns on the host: how many have our tap.
fn netns_with_tap() -> usize {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cni-"))
        .filter(|e| {
            Command::new("nsenter")
                .arg(format!("--net={}", e.path().display()))
                .args(["ip", "-o", "link", "show", TAP])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .count()
}

/// The IPv4 addresses (`a.b.c.d/len`) on eth0 inside the container, as busybox `ip` shows.
async fn eth0_addresses(cri: &mut Cri, container: &str) -> Vec<String> {
    let r = ok(cri
        .exec_sync(
            container,
            &["ip", "-o", "-4", "addr", "show", "dev", "eth0"],
            60,
        )
        .await);
    assert_eq!(
        r.exit_code,
        0,
        "ip addr show eth0 in the container: {}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .into_iter()
        .map(String::from)
        .collect()
}

/// `ping` from `container` to `ip`; returns its output, asserting that it succeeded.
async fn ping(cri: &mut Cri, container: &str, ip: &str) -> String {
    // Generous: the first packets wait for ARP across two nested guests under TCG.
    let r = ok(cri
        .exec_sync(container, &["ping", "-c", "3", "-w", "60", ip], 90)
        .await);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.exit_code, 0, "ping {ip} failed: {out}");
    out
}

#[test]
fn two_pods_ping_each_other_by_cni_ip_and_see_it_on_eth0() {
    with_containerd(async |c, cri| {
        let a = ok(c.run_pod(cri, "net-a", HANDLER_KATA).await);
        let b = ok(c.run_pod(cri, "net-b", HANDLER_HUSK).await);
        assert_eq!(super::vmm_count(), 2, "one VM per pod");
        let ip_a = ok(cri.pod_ip(&a.id).await);
        let ip_b = ok(cri.pod_ip(&b.id).await);
        let prefix = c.subnet().trim_end_matches("0/24");
        for ip in [&ip_a, &ip_b] {
            assert!(
                ip.starts_with(prefix),
                "CNI gave the pods addresses on the test subnet {}: {ip_a}, {ip_b}",
                c.subnet()
            );
        }
        assert_ne!(ip_a, ip_b);
        assert_eq!(netns_with_tap(), 2, "each pod's netns has the shim's tap");

        let ca = ok(cri
            .run_container(&a, "sleeper", images::BUSYBOX, &["sleep", "600"])
            .await);
        let cb = ok(cri
            .run_container(&b, "sleeper", images::BUSYBOX, &["sleep", "600"])
            .await);
        // The container sees the pod's CNI IP on eth0 (with the subnet's prefix).
        assert_eq!(eth0_addresses(cri, &ca).await, vec![format!("{ip_a}/24")]);
        assert_eq!(eth0_addresses(cri, &cb).await, vec![format!("{ip_b}/24")]);
        // The default route CNI set in the netns reached the guest too.
        let r = ok(cri.exec_sync(&ca, &["ip", "route"], 60).await);
        let routes = String::from_utf8_lossy(&r.stdout).into_owned();
        assert!(
            routes.contains(&format!("default via {}", c.gateway())),
            "the guest's routes: {routes}"
        );

        let out = ping(cri, &ca, &ip_b).await;
        assert!(out.contains("3 packets received"), "{out}");
        let out = ping(cri, &cb, &ip_a).await;
        assert!(out.contains("3 packets received"), "{out}");
        // And the host reaches a pod through the bridge.
        let host = Command::new("/bin/busybox")
            .args(["ping", "-c", "2", "-w", "60", &ip_a])
            .output()
            .expect("run ping on the host");
        assert!(
            host.status.success(),
            "the host cannot ping pod A at {ip_a}: {}",
            String::from_utf8_lossy(&host.stdout)
        );

        ok(cri.stop_remove_pod(&a.id).await);
        ok(cri.stop_remove_pod(&b.id).await);
        assert_eq!(netns_with_tap(), 0, "no pod netns (nor tap) is left");
    });
}

/// An HTTP GET of `/` at `addr`, retried until `timeout` (the server starts in the guest
/// meanwhile); returns the response.
fn http_get(addr: SocketAddr, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        let last = match attempt {
            Ok(r) if !r.is_empty() => return r,
            Ok(_) => "an empty answer".to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "nothing answered at {addr} within {timeout:?}: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_host_port_through_portmap_answers_from_the_host() {
    // A port no other test process on this host maps at the same time.
    let host_port = 20000 + (std::process::id() % 10000) as i32;
    with_containerd(async |c, cri| {
        let ports = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 8080,
            host_port,
            host_ip: String::new(),
        }];
        let pod = ok(c
            .run_pod_with_ports(cri, "net-hostport", HANDLER_KATA, ports)
            .await);
        ok(cri
            .run_container(
                &pod,
                "httpd",
                images::BUSYBOX,
                &[
                    "sh",
                    "-c",
                    "mkdir -p /tmp/www && echo hello-from-husk > /tmp/www/index.html && \
                     exec httpd -f -p 8080 -h /tmp/www",
                ],
            )
            .await);
        let gateway = IpAddr::V4(c.gateway());
        for ip in [gateway, IpAddr::from([127, 0, 0, 1])] {
            let addr = SocketAddr::new(ip, host_port as u16);
            let answer =
                tokio::task::spawn_blocking(move || http_get(addr, Duration::from_secs(120)))
                    .await
                    .expect("the HTTP client thread");
            assert!(
                answer.starts_with("HTTP/1.") && answer.contains("hello-from-husk"),
                "GET http://{addr}/ answered: {answer}"
            );
        }
        ok(cri.stop_remove_pod(&pod.id).await);
    });
}
