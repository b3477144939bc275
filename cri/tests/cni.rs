//! huskd's CNI runner and netns handling on this host, with Debian's plugins in
//! /usr/lib/cni (bridge, host-local, portmap) on a private bridge and subnet of the test's
//! own (10.240.0.0/16; the containerd harness uses 10.250-253).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use husk_cri::cni::{Attachment, Cni, CniError, Network, PortMapping};
use husk_cri::netns::{Netns, NETNS_DIR};

const PLUGINS: &str = "/usr/lib/cni";

/// One test's network: bridge, subnet, IPAM dir, netns; removed on drop whatever happened.
struct TestNet {
    name: String,
    bridge: String,
    subnet_prefix: String,
    dir: tempfile::TempDir,
    netns: Option<Netns>,
}

impl TestNet {
    fn new() -> TestNet {
        for p in ["bridge", "host-local", "portmap"] {
            let path = Path::new(PLUGINS).join(p);
            assert!(
                path.is_file(),
                "{} is missing: run scripts/setup (Debian package containernetworking-plugins)",
                path.display()
            );
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let k = (pid.wrapping_mul(7).wrapping_add(n)) % 250;
        let name = format!("husk-cnitest-{pid}-{n}");
        let netns = Netns::create(Path::new(NETNS_DIR), &name).expect("create the netns");
        TestNet {
            bridge: format!("hkc{}x{n}", pid % 100_000),
            subnet_prefix: format!("10.240.{k}"),
            dir: tempfile::tempdir().expect("temp dir"),
            netns: Some(netns),
            name,
        }
    }

    fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    fn conflist(&self, second: &str) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"{name}","plugins":[
              {{"type":"bridge","bridge":"{br}","isGateway":true,"ipMasq":false,
                "ipam":{{"type":"host-local","ranges":[[{{"subnet":"{sn}.0/24"}}]],
                         "dataDir":"{ipam}"}}}},
              {second}]}}"#,
            name = self.name,
            br = self.bridge,
            sn = self.subnet_prefix,
            ipam = self.ipam_dir().display(),
        )
        .into_bytes()
    }

    fn attachment(&self, ports: Vec<PortMapping>) -> Attachment {
        Attachment {
            container_id: format!("pod-{}", self.name),
            netns: self.netns.as_ref().unwrap().path().to_path_buf(),
            ifname: "eth0".into(),
            args: BTreeMap::from([
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), self.name.clone()),
            ]),
            port_mappings: ports,
        }
    }

    fn cni(&self) -> Cni {
        Cni::new(vec![PLUGINS.into()], self.dir.path().join("cache"))
    }

    /// IPs host-local still has allocated.
    fn allocations(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir().join(&self.name))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Interfaces enslaved to the test bridge (the pods' veths).
    fn bridge_ports(&self) -> String {
        run("ip", &["-o", "link", "show", "master", &self.bridge])
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // A test that failed half-way: DEL from the cache first (portmap's iptables rules
        // live in the host's namespace and would outlive the netns).
        let cni = self.cni();
        let id = format!("pod-{}", self.name);
        if cni.is_attached(&id) {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(cni.del(&id))
            })
            .join();
        }
        if let Some(ns) = self.netns.take() {
            let _ = ns.remove();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("run a command");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn nat_rules() -> String {
    run("iptables-save", &["-t", "nat"])
}

/// Serves one connection with "hello" from inside `netns` on port 80 (a thread of its own:
/// setns acts on the calling thread).
fn serve_in(netns: &Path) -> std::thread::JoinHandle<()> {
    let f = std::fs::File::open(netns).expect("open the netns");
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let l = TcpListener::bind("0.0.0.0:80").expect("listen in the pod netns");
        tx.send(()).unwrap();
        for _ in 0..2 {
            let (mut s, _) = l.accept().expect("accept");
            s.write_all(b"hello").unwrap();
        }
    });
    rx.recv().unwrap();
    h
}

fn fetch(addr: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test]
async fn add_check_and_del_after_a_restart_leave_nothing() {
    let t = TestNet::new();
    let conf = t.dir.path().join("net.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("10-test.conflist"),
        t.conflist(r#"{"type":"portmap","capabilities":{"portMappings":true},"snat":true}"#),
    )
    .unwrap();
    std::fs::write(conf.join("20-ignored.conflist"), b"{not even json").unwrap();
    let net = Network::load(&conf).expect("load the first conflist");
    assert_eq!(net.name(), t.name);

    let host_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let att = t.attachment(vec![PortMapping {
        host_port,
        container_port: 80,
        protocol: "tcp".into(),
        host_ip: String::new(),
    }]);
    let cni = t.cni();
    let r = cni.add(&net, &att).await.expect("CNI ADD");
    let ip = r.ips.first().expect("an IP in the result").clone();
    assert!(ip.starts_with(&format!("{}.", t.subnet_prefix)), "{ip}");
    let ns = &t.name;
    assert!(run("ip", &["-n", ns, "-o", "addr", "show", "eth0"]).contains(&ip));
    assert_eq!(t.allocations(), std::slice::from_ref(&ip));
    assert!(nat_rules().contains(&format!("--dport {host_port}")));

    // The pod answers on its IP, and on the host port from 127.0.0.1 (portmap).
    let server = serve_in(t.netns.as_ref().unwrap().path());
    assert_eq!(fetch(&format!("{ip}:80")), "hello");
    assert_eq!(fetch(&format!("127.0.0.1:{host_port}")), "hello");
    server.join().unwrap();

    // A new runner on the same cache (huskd restarted) deletes from the cache alone.
    drop(cni);
    let cni = t.cni();
    assert!(cni.is_attached(&att.container_id));
    cni.del(&att.container_id).await.expect("CNI DEL");
    assert!(!cni.is_attached(&att.container_id));
    assert_eq!(t.allocations(), Vec::<String>::new());
    assert_eq!(t.bridge_ports().trim(), "", "a veth is left on the bridge");
    assert!(!nat_rules().contains(&format!("--dport {host_port}")));
    cni.del(&att.container_id).await.expect("a second DEL");
}

#[tokio::test]
async fn a_failing_add_is_undone() {
    let t = TestNet::new();
    let net = Network::parse(
        &t.conflist(r#"{"type":"husk-no-such-plugin"}"#),
        Path::new("bad.conflist"),
    )
    .unwrap();
    let att = t.attachment(vec![]);
    let cni = t.cni();
    let e = cni.add(&net, &att).await.unwrap_err();
    assert!(
        matches!(&e, CniError::PluginNotFound { plugin, .. } if plugin == "husk-no-such-plugin"),
        "{e}"
    );
    assert!(e.to_string().contains(PLUGINS), "{e}");
    // The bridge plugin's work is undone: no IP, no veth, nothing in the netns but lo.
    assert_eq!(t.allocations(), Vec::<String>::new());
    assert_eq!(t.bridge_ports().trim(), "");
    let links = run("ip", &["-n", &t.name, "-o", "link"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(!cni.is_attached(&att.container_id));

    // A bad plugin config fails inside the plugin: its message comes back.
    let net = Network::parse(
        br#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge","ipam":{"type":"host-local"}}]}"#,
        Path::new("bad.conflist"),
    )
    .unwrap();
    let e = cni.add(&net, &att).await.unwrap_err();
    assert!(matches!(e, CniError::Plugin { command: "ADD", .. }), "{e}");
    assert!(!cni.is_attached(&att.container_id));

    let ns = t.netns.as_ref().unwrap().clone();
    ns.remove().unwrap();
    assert!(!ns.path().exists());
}

#[tokio::test]
async fn check_runs_every_plugin_against_the_cached_result() {
    // (portmap 1.1.1's CHECK fails on IPv4-only pods looking for its IPv6 chain, so the
    // list here is bridge + tuning, both of which implement CHECK.)
    let t = TestNet::new();
    let net = Network::parse(
        &t.conflist(r#"{"type":"tuning","mtu":1400}"#),
        Path::new("t"),
    )
    .unwrap();
    let att = t.attachment(vec![]);
    let cni = t.cni();
    let r = cni.add(&net, &att).await.expect("CNI ADD");
    assert!(run("ip", &["-n", &t.name, "-o", "link", "show", "eth0"]).contains("mtu 1400"));
    cni.check(&att.container_id).await.expect("CNI CHECK");
    // Take the pod's address away: CHECK (bridge) must notice.
    run("ip", &["-n", &t.name, "addr", "flush", "dev", "eth0"]);
    let e = cni.check(&att.container_id).await.unwrap_err();
    assert!(
        matches!(
            e,
            CniError::Plugin {
                command: "CHECK",
                ..
            }
        ),
        "{e}"
    );
    cni.del(&att.container_id).await.expect("CNI DEL");
    assert_eq!(t.allocations(), Vec::<String>::new(), "{:?}", r.ips);
    assert!(
        cni.check(&att.container_id).await.is_err(),
        "CHECK without an ADD"
    );
}
