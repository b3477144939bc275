//! What confines containers: the sandbox's shared namespaces, the spec's security settings,
//! and the no-pivot_root set-up.

use crate::common::*;

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
