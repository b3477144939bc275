//! Host-mode tests: the real agent binary on a Unix socket, driven by the real ttrpc clients,
//! creating busybox containers with libcontainer. They need root and fail, with the reason, without it.

mod common;

use common::*;
use husk_proto::agent as pb;

#[tokio::test]
async fn health_and_version() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("health").await;
    let r = a
        .health
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(r.status, pb::check_response::ServingStatus::SERVING.into());
    let v = a
        .health
        .version(ctx(), &pb::CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(v.api_version, husk_proto::AGENT_API_VERSION);
    a.shutdown().await;
}

#[tokio::test]
async fn run_reads_output_and_exit_code() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("run").await;
    a.create_sandbox("pod-host", false).await;
    a.run(
        "c1",
        &spec(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]),
    )
    .await;
    assert_eq!(a.read_all("c1", "", false).await, "hello\n");
    assert_eq!(a.read_all("c1", "", true).await, "oops\n");
    let w = a.wait("c1", "").await;
    assert_eq!((w.exit_status, w.signal), (3, 0));
    assert!(w.exited_at_unix_nanos > 0);
    a.remove("c1").await;
    a.shutdown().await;
}

#[tokio::test]
async fn env_cwd_user_hostname_applied() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("env").await;
    a.create_sandbox("pod-host", false).await;
    let mut s = spec(&[
        "sh",
        "-c",
        "echo $FOO; pwd; id -u; id -g; id -G; hostname; cat /etc/resolv.conf",
    ]);
    s["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push("FOO=bar baz".into());
    s["process"]["cwd"] = "/tmp".into();
    s["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [10]});
    s.as_object_mut().unwrap().remove("hostname");
    a.run("c1", &s).await;
    let out = a.read_all("c1", "", false).await;
    assert_eq!(
        out,
        "bar baz\n/tmp\n1000\n1000\n1000 10\npod-host\nnameserver 10.0.0.53\n",
        "stderr: {}",
        a.read_all("c1", "", true).await
    );
    assert_eq!(a.wait("c1", "").await.exit_status, 0);
    a.shutdown().await;
}

#[tokio::test]
async fn exec_signal_and_many_waiters() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("exec").await;
    a.create_sandbox("pod-host", false).await;
    a.run("c1", &spec(&["sleep", "1000"])).await;

    a.exec(
        "c1",
        "e1",
        process(&["sh", "-c", "echo from-exec; cat /proc/1/cmdline; exit 7"]),
    )
    .await
    .expect("ExecProcess");
    assert_eq!(
        a.read_all("c1", "e1", false).await,
        "from-exec\nsleep\x001000\x00"
    );
    assert_eq!(a.wait("c1", "e1").await.exit_status, 7);

    // A program that is not in the image is refused up front.
    let missing = a.exec("c1", "e2", process(&["/no/such/program"])).await;
    assert_eq!(code(missing), ttrpc::Code::INVALID_ARGUMENT);

    // A duplicate exec id is refused.
    let dup = a.exec("c1", "e1", process(&["true"])).await;
    assert_eq!(code(dup), ttrpc::Code::ALREADY_EXISTS);

    // stdin reaches an exec'd process; closing it gives EOF.
    a.exec("c1", "cat", process(&["cat"])).await.unwrap();
    let mut w = pb::WriteStdinRequest::new();
    w.container_id = "c1".into();
    w.exec_id = "cat".into();
    w.data = b"ping\n".to_vec();
    a.io.write_stdin(ctx(), &w).await.unwrap();
    let mut cl = pb::ProcessRequest::new();
    cl.container_id = "c1".into();
    cl.exec_id = "cat".into();
    a.io.close_stdin(ctx(), &cl).await.unwrap();
    assert_eq!(a.read_all("c1", "cat", false).await, "ping\n");
    assert_eq!(a.wait("c1", "cat").await.exit_status, 0);

    // Several waiters on the init process all see the kill.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = a.containers.clone();
            tokio::spawn(async move {
                let mut req = pb::ProcessRequest::new();
                req.container_id = "c1".into();
                c.wait_process(ctx(), &req).await.unwrap()
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    a.signal("c1", "", 9).await.expect("SignalProcess");
    for w in waiters {
        let r = w.await.unwrap();
        assert_eq!((r.exit_status, r.signal), (137, 9));
    }
    // Signalling an exited process is NotFound.
    assert_eq!(code(a.signal("c1", "", 15).await), ttrpc::Code::NOT_FOUND);
    a.remove("c1").await;
    a.shutdown().await;
}

#[tokio::test]
async fn remove_cleans_mounts_cgroup_and_state() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("remove").await;
    a.create_sandbox("pod-host", false).await;
    let mut s = spec(&["sleep", "1000"]);
    s["linux"]["resources"]["memory"] = serde_json::json!({"limit": 33554432});
    a.run("c1", &s).await;

    // The memory limit shows in the container's cgroup.
    let mem = husk_agent::cgroups::memory_dir(&husk_agent::spec::cgroup_path(&a.sandbox_id, "c1"));
    let limit_file = if mem.join("memory.max").exists() {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    assert_eq!(
        std::fs::read_to_string(mem.join(limit_file))
            .unwrap()
            .trim(),
        "33554432"
    );

    // Update changes it; stats see the process.
    let mut up = pb::UpdateContainerRequest::new();
    up.container_id = "c1".into();
    up.resources_json = br#"{"memory": {"limit": 67108864}}"#.to_vec();
    a.containers
        .update_container(ctx(), &up)
        .await
        .expect("UpdateContainer");
    assert_eq!(
        std::fs::read_to_string(mem.join(limit_file))
            .unwrap()
            .trim(),
        "67108864"
    );
    let mut cr = pb::ContainerRequest::new();
    cr.container_id = "c1".into();
    let st = a
        .containers
        .stats_container(ctx(), &cr)
        .await
        .expect("StatsContainer");
    assert_eq!(st.memory.limit_bytes, 67108864);
    assert!(st.pids.current >= 1, "{st:?}");
    let ps = a.containers.list_processes(ctx(), &cr).await.unwrap();
    assert_eq!(ps.pids.len(), 1);

    a.remove("c1").await;
    assert!(!mem.exists(), "cgroup {} left behind", mem.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rootfs = a.share_dir().join("rootfs");
    assert!(
        !mounts.contains(rootfs.to_str().unwrap()),
        "mount of the rootfs left behind"
    );
    assert!(!a.state_dir().join("containers/c1").exists());
    assert!(!a.state_dir().join("bundles/c1").exists());
    // Gone means gone.
    assert_eq!(code(a.start_container("c1").await), ttrpc::Code::NOT_FOUND);

    let state = a.state_dir();
    let sb = a.sandbox_id.clone();
    a.shutdown().await;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(state.to_str().unwrap()),
        "sandbox netns mount left behind"
    );
    assert!(
        !husk_agent::cgroups::memory_dir(std::path::Path::new(&format!("/husk/{sb}"))).exists()
    );
}

#[tokio::test]
async fn errors_have_the_right_codes() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("errors").await;
    // Containers need a sandbox first.
    assert_eq!(
        code(a.create("c1", &spec(&["true"])).await),
        ttrpc::Code::FAILED_PRECONDITION
    );
    a.create_sandbox("pod-host", false).await;

    // Bad specs.
    let mut req = a.create_req("c1", &spec(&["true"]));
    req.oci_spec_json = b"{not json".to_vec();
    assert_eq!(
        code(a.containers.create_container(ctx(), &req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let mut no_process = spec(&["true"]);
    no_process.as_object_mut().unwrap().remove("process");
    assert_eq!(
        code(a.create("c1", &no_process).await),
        ttrpc::Code::INVALID_ARGUMENT
    );

    // A program that is not in the image.
    let e = a.create("c1", &spec(&["no-such-program"])).await;
    assert_eq!(code(e), ttrpc::Code::INVALID_ARGUMENT);

    // Bad ids.
    assert_eq!(
        code(a.create("a/b", &spec(&["true"])).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(a.create("..", &spec(&["true"])).await),
        ttrpc::Code::INVALID_ARGUMENT
    );

    // Path escapes: rootfs outside the share, a symlink leading out, a bind from the host.
    let mut req = a.create_req("c1", &spec(&["true"]));
    req.rootfs.as_mut().unwrap().path = "../../..".into();
    assert_eq!(
        code(a.containers.create_container(ctx(), &req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    std::os::unix::fs::symlink("/", a.share_dir().join("escape")).unwrap();
    req.rootfs.as_mut().unwrap().path = "escape".into();
    assert_eq!(
        code(a.containers.create_container(ctx(), &req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let mut host_bind = spec(&["true"]);
    host_bind["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
        {"destination": "/host", "type": "bind", "source": "/etc", "options": ["rbind"]}));
    assert_eq!(
        code(a.create("c1", &host_bind).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let mut req = a.create_req("c1", &spec(&["true"]));
    let mut m = pb::Mount::new();
    m.destination = "/data".into();
    m.type_ = "bind".into();
    m.source = "../..".into();
    m.share_tag = SHARE.into();
    req.mounts.push(m);
    assert_eq!(
        code(a.containers.create_container(ctx(), &req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );

    // Unknown ids.
    assert_eq!(
        code(a.start_container("nope").await),
        ttrpc::Code::NOT_FOUND
    );
    let mut w = pb::ProcessRequest::new();
    w.container_id = "nope".into();
    assert_eq!(
        code(a.containers.wait_process(ctx(), &w).await),
        ttrpc::Code::NOT_FOUND
    );

    // Duplicates, and a second sandbox.
    a.create("c1", &spec(&["true"]))
        .await
        .expect("good create after bad ones");
    assert_eq!(
        code(a.create("c1", &spec(&["true"])).await),
        ttrpc::Code::ALREADY_EXISTS
    );
    let mut w = pb::ProcessRequest::new();
    w.container_id = "c1".into();
    w.exec_id = "nope".into();
    assert_eq!(
        code(a.containers.wait_process(ctx(), &w).await),
        ttrpc::Code::NOT_FOUND
    );
    let mut sreq = pb::CreateSandboxRequest::new();
    sreq.sandbox_id = "other".into();
    assert_eq!(
        code(a.sandbox.create_sandbox(ctx(), &sreq).await),
        ttrpc::Code::ALREADY_EXISTS
    );
    a.shutdown().await;
}

#[tokio::test]
async fn tty_process_gets_a_pty_and_resizes() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("tty").await;
    a.create_sandbox("pod-host", false).await;
    let mut s = spec(&["sh", "-c", "stty size; tty"]);
    s["process"]["terminal"] = true.into();
    a.create("c1", &s)
        .await
        .expect("CreateContainer with a terminal");
    let mut rs = pb::TtyWinResizeRequest::new();
    rs.container_id = "c1".into();
    rs.rows = 30;
    rs.columns = 100;
    a.io.tty_win_resize(ctx(), &rs).await.expect("TtyWinResize");
    a.start_container("c1").await.unwrap();
    let out = a.read_all("c1", "", false).await;
    assert!(out.contains("30 100"), "stty size said {out:?}");
    assert!(out.contains("/dev/pts/"), "tty said {out:?}");
    assert_eq!(
        a.read_all("c1", "", true).await,
        "",
        "a terminal process has no separate stderr"
    );
    assert_eq!(a.wait("c1", "").await.exit_status, 0);

    // A process without a terminal cannot be resized.
    a.run("c2", &spec(&["true"])).await;
    rs.container_id = "c2".into();
    assert_eq!(
        code(a.io.tty_win_resize(ctx(), &rs).await),
        ttrpc::Code::FAILED_PRECONDITION
    );
    a.shutdown().await;
}

#[tokio::test]
async fn containers_share_the_sandbox_network_and_pid_namespaces() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("shared").await;
    a.create_sandbox("pod-host", true).await;
    a.run("pause", &spec(&["sleep", "1000"])).await;
    a.run(
        "app",
        &spec(&["sh", "-c", "readlink /proc/self/ns/net; ps -o args"]),
    )
    .await;
    let out = a.read_all("app", "", false).await;
    assert_eq!(a.wait("app", "").await.exit_status, 0, "{out}");
    let mut lines = out.lines();
    let app_net = lines.next().unwrap().to_string();
    assert!(
        out.contains("sleep 1000"),
        "the pause container is not visible: {out}"
    );

    a.exec("pause", "ns", process(&["readlink", "/proc/self/ns/net"]))
        .await
        .unwrap();
    let pause_net = a.read_all("pause", "ns", false).await;
    assert_eq!(
        pause_net.trim(),
        app_net,
        "containers are in different network namespaces"
    );
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(
        host_net.to_str().unwrap(),
        app_net,
        "containers must not use the host's network"
    );
    a.shutdown().await;
}

#[tokio::test]
async fn oom_kill_is_reported() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("oom").await;
    a.create_sandbox("pod-host", false).await;
    let mut s = spec(&["sh", "-c", "dd if=/dev/zero of=/dev/null bs=64M count=1"]);
    s["linux"]["resources"]["memory"] = serde_json::json!({"limit": 16777216, "swap": 16777216});
    let events = a.events.clone();
    let oom = tokio::spawn(async move { events.get_oom_event(ctx(), &pb::Empty::new()).await });
    a.run("hog", &s).await;
    let w = a.wait("hog", "").await;
    assert_eq!(w.signal, 9, "the hog was not OOM-killed: {w:?}");
    let ev = tokio::time::timeout(std::time::Duration::from_secs(5), oom)
        .await
        .expect("no OOM event within 5 s")
        .unwrap()
        .expect("GetOOMEvent");
    assert_eq!(ev.container_id, "hog");
    a.shutdown().await;
}

/// Runs `ip ARGS` inside the sandbox's network namespace.
fn ip_in(netns: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args)
        .output()
        .expect("nsenter ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

#[tokio::test]
async fn security_settings_of_the_spec_are_applied() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("security").await;
    a.create_sandbox("pod-host", false).await;
    let script = "touch /x 2>/dev/null && echo rw || echo ro; \
                  grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; \
                  ulimit -n; \
                  wc -c < /proc/version; \
                  mkdir /tmp/d 2>/dev/null && echo mkdir-ok || echo mkdir-denied; \
                  cat /proc/sys/net/ipv4/ip_forward";
    let mut s = spec(&["sh", "-c", script]);
    s["root"]["readonly"] = true.into();
    s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}));
    s["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
    s["linux"]["maskedPaths"]
        .as_array_mut()
        .unwrap()
        .push("/proc/version".into());
    s["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    a.run("c1", &s).await;
    let out = a.read_all("c1", "", false).await;
    let err = a.read_all("c1", "", true).await;
    assert_eq!(a.wait("c1", "").await.exit_status, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    // CAP_CHOWN, CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_NET_BIND_SERVICE, CAP_AUDIT_WRITE only.
    assert_eq!(
        lines,
        [
            "ro",
            "CapEff:\t00000000200004e1",
            "NoNewPrivs:\t1",
            "1024",
            "0",
            "mkdir-denied",
            "1"
        ],
        "stderr: {err}"
    );
    a.shutdown().await;
}

#[tokio::test]
async fn stdin_is_dev_null_unless_asked_for() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("stdin").await;
    a.create_sandbox("pod-host", false).await;
    // A shell without stdin reads EOF and exits instead of waiting forever.
    a.run("c1", &spec(&["sh"])).await;
    assert_eq!(a.wait("c1", "").await.exit_status, 0);
    let mut w = pb::WriteStdinRequest::new();
    w.container_id = "c1".into();
    w.data = b"x".to_vec();
    assert_eq!(
        code(a.io.write_stdin(ctx(), &w).await),
        ttrpc::Code::FAILED_PRECONDITION
    );

    // With stdin, a shell runs what it is fed.
    let mut req = a.create_req("c2", &spec(&["sh"]));
    req.stdin = true;
    a.containers.create_container(ctx(), &req).await.unwrap();
    a.start_container("c2").await.unwrap();
    w.container_id = "c2".into();
    w.data = b"echo fed; exit 4\n".to_vec();
    a.io.write_stdin(ctx(), &w).await.unwrap();
    assert_eq!(a.read_all("c2", "", false).await, "fed\n");
    assert_eq!(a.wait("c2", "").await.exit_status, 4);
    a.shutdown().await;
}

#[tokio::test]
async fn pause_resume_and_list_processes() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("pause").await;
    a.create_sandbox("pod-host", false).await;
    a.run("c1", &spec(&["sh", "-c", "sleep 1000 & sleep 1000; true"]))
        .await;
    let mut cr = pb::ContainerRequest::new();
    cr.container_id = "c1".into();
    // Both sleeps and the shell, once the shell forked.
    let mut pids = Vec::new();
    for _ in 0..50 {
        pids = a.containers.list_processes(ctx(), &cr).await.unwrap().pids;
        if pids.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(pids.len(), 3, "{pids:?}");

    let rel = husk_agent::spec::cgroup_path(&a.sandbox_id, "c1");
    let rel = rel.strip_prefix("/").unwrap();
    let v1 = std::path::Path::new("/sys/fs/cgroup/freezer")
        .join(rel)
        .join("freezer.state");
    let v2 = std::path::Path::new("/sys/fs/cgroup")
        .join(rel)
        .join("cgroup.freeze");
    let frozen = || {
        std::fs::read_to_string(&v1)
            .map(|s| s.trim() == "FROZEN")
            .or_else(|_| std::fs::read_to_string(&v2).map(|s| s.trim() == "1"))
            .unwrap()
    };
    a.containers
        .pause_container(ctx(), &cr)
        .await
        .expect("PauseContainer");
    assert!(frozen());
    a.containers
        .resume_container(ctx(), &cr)
        .await
        .expect("ResumeContainer");
    assert!(!frozen());

    // SignalProcess with all = true reaches every process of the container.
    let mut sig = pb::SignalProcessRequest::new();
    sig.container_id = "c1".into();
    sig.signal = 9;
    sig.all = true;
    a.containers.signal_process(ctx(), &sig).await.unwrap();
    assert_eq!(a.wait("c1", "").await.signal, 9);
    a.shutdown().await;
}

/// The recipe the proto documents for hybrid vsock works: CONNECT handshake on a stream, then
/// ttrpc over the same stream. A tiny stand-in for the VMM's vsock device forwards to the
/// agent's socket.
#[tokio::test]
async fn ttrpc_over_a_hybrid_vsock_style_stream() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};
    if !can_run() {
        return;
    }
    let a = TestAgent::start("hybrid").await;
    let agent_sock = a.dir.path().join("agent.sock");
    let vsock = a.dir.path().join("vm.vsock");
    let listener = UnixListener::bind(&vsock).unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut s = BufReader::new(s);
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        assert_eq!(line, format!("CONNECT {}\n", husk_proto::AGENT_VSOCK_PORT));
        s.get_mut().write_all(b"OK 1073741824\n").await.unwrap();
        let mut up = UnixStream::connect(&agent_sock).await.unwrap();
        let mut down = s.into_inner();
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    });

    let s = UnixStream::connect(&vsock).await.unwrap();
    let mut s = BufReader::new(s);
    s.get_mut()
        .write_all(format!("CONNECT {}\n", husk_proto::AGENT_VSOCK_PORT).as_bytes())
        .await
        .unwrap();
    let mut ok = String::new();
    s.read_line(&mut ok).await.unwrap();
    assert!(ok.starts_with("OK "), "{ok}");
    // Nothing follows OK before we speak, so the buffered reader holds no ttrpc bytes.
    let stream = s.into_inner();
    let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(stream));
    let health = husk_proto::agent_ttrpc::HealthClient::new(client);
    let r = health
        .check(ctx(), &pb::CheckRequest::new())
        .await
        .expect("Check over hybrid vsock");
    assert_eq!(r.status, pb::check_response::ServingStatus::SERVING.into());
    a.shutdown().await;
}

/// The set-up used when `/` is the initramfs (no pivot_root) still confines the container to
/// its rootfs.
#[tokio::test]
async fn no_pivot_mode_runs_containers() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start_with_flags("nopivot", &["--no-pivot"]).await;
    a.create_sandbox("pod-host", false).await;
    a.run(
        "c1",
        &spec(&["sh", "-c", "ls /; cat /etc/passwd | head -1"]),
    )
    .await;
    let out = a.read_all("c1", "", false).await;
    assert_eq!(a.wait("c1", "").await.exit_status, 0, "{out}");
    assert!(
        out.contains("bin\n") && !out.contains("usr\n"),
        "not the busybox rootfs: {out}"
    );
    assert!(out.ends_with("root:x:0:0:root:/root:/bin/sh\n"), "{out}");
    a.shutdown().await;
}
