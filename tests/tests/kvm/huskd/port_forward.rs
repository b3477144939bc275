//! Port-forward through huskd into a pod's VM, driven by an independent client (node's
//! spdy-transport, `cri/tests/clients/spdy_client.js`): busybox httpd in the pod, bound to
//! the pod's loopback only, answers 20 connections at once over one SPDY session with the
//! right bytes; a port nothing listens on gives an error on the error stream, not a hang;
//! once the session is over huskd and the VMM hold no more descriptors than before, and
//! the pod leaves nothing behind.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_tests::huskd::CriClient;
use k8s_cri::v1 as cri;
use tonic::Code;

use super::fixture::Fixture;
use super::{container_config, pod_config, run_container, run_pod};

/// Connections at once over one session.
const PARALLEL: usize = 20;
const HTTP_PORT: u16 = 8080;

fn clients_dir() -> PathBuf {
    let root = std::env::var("HUSK_CACHE").unwrap_or_else(|_| "/var/cache/husk".into());
    PathBuf::from(root).join("stream-clients")
}

/// Runs the node SPDY client; its JSON answer. Generous bounds: node starts slowly under
/// the lab's emulated CPU.
async fn node(args: &[&str]) -> serde_json::Value {
    let module = clients_dir().join("node/node_modules/spdy-transport");
    assert!(
        module.join("package.json").exists(),
        "spdy-transport is missing from {}: run scripts/setup-stream-clients",
        module.display()
    );
    let script = husk_tests::repo_root().join("cri/tests/clients/spdy_client.js");
    let out = tokio::time::timeout(
        Duration::from_secs(200),
        tokio::process::Command::new("/usr/bin/node")
            .arg(&script)
            .args(args)
            .env("SPDY_TRANSPORT", &module)
            .env("SPDY_CLIENT_TIMEOUT_MS", "180000")
            .output(),
    )
    .await
    .expect("the node client finishes")
    .expect("run node");
    assert!(
        out.status.success(),
        "spdy_client.js {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON from the client ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The file the pod serves as `/f<i>`: `seq i*1000 i*1000+20000` (~120 KB).
fn body(i: usize) -> String {
    (i * 1000..=i * 1000 + 20000)
        .map(|n| format!("{n}\n"))
        .collect()
}

async fn port_forward_url(c: &mut CriClient, pod: &str) -> Result<String, tonic::Status> {
    c.rt.port_forward(cri::PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: vec![i32::from(HTTP_PORT)],
    })
    .await
    .map(|r| r.into_inner().url)
}

/// Open descriptors of a process, and how many of them are sockets.
fn fds(pid: u32) -> (usize, usize) {
    let mut all = 0;
    let mut sockets = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        all += 1;
        if std::fs::read_link(e.path())
            .map(|l| l.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false)
        {
            sockets += 1;
        }
    }
    (all, sockets)
}

/// The pod VM's husk-vmm processes (the VMM and its helper).
fn vmm_pids() -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "husk-vmm" {
            if let Ok(pid) = e.file_name().to_string_lossy().parse() {
                found.push(pid);
            }
        }
    }
    assert!(!found.is_empty(), "the pod VM runs");
    found
}

/// Waits (a little: closes are asynchronous) for the processes to hold what they held.
async fn assert_fds_back(before: &[(u32, &str, (usize, usize))]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: Vec<_> = before.iter().map(|(pid, _, _)| fds(*pid)).collect();
        if before.iter().zip(&now).all(|((_, _, b), n)| n <= b) {
            return;
        }
        if Instant::now() > deadline {
            panic!("descriptors leaked (all, sockets): before {before:?}, now {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn port_forward_reaches_the_pods_loopback_in_parallel_and_leaks_nothing() {
    let f = Fixture::start();
    let (huskd, image) = (&f.huskd, &f.image);
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let sandbox = pod_config("pfpod", &f.log_dir());
        let pod = run_pod(&mut c, huskd, &sandbox).await;
        f.lap("pod running");
        // Bound to 127.0.0.1: only a connection made inside the pod reaches it.
        let script = format!(
            "mkdir -p /www && for i in $(seq 0 {}); do seq $((i*1000)) $((i*1000+20000)) \
             > /www/f$i; done && exec httpd -f -p 127.0.0.1:{HTTP_PORT} -h /www",
            PARALLEL - 1
        );
        let web = run_container(
            &mut c,
            huskd,
            &pod,
            container_config("web", image, &["sh", "-c", &script]),
            &sandbox,
        )
        .await;
        // Ready once it answers inside the pod.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r =
                c.rt.exec_sync(cri::ExecSyncRequest {
                    container_id: web.clone(),
                    cmd: [
                        "wget",
                        "-q",
                        "-O",
                        "/dev/null",
                        &format!("http://127.0.0.1:{HTTP_PORT}/f0"),
                    ]
                    .map(String::from)
                    .to_vec(),
                    timeout: 30,
                })
                .await
                .unwrap_or_else(|e| panic!("ExecSync: {e}\nhuskd log:\n{}", huskd.log()))
                .into_inner();
            if r.exit_code == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "httpd never answered: {r:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        f.lap("httpd serves in the pod");

        // The CRI call: a URL for a known, ready pod only.
        let e = port_forward_url(&mut c, "no-such-pod").await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let huskd_pid = huskd.pid().expect("huskd runs");
        let mut before = vec![(huskd_pid, "huskd", fds(huskd_pid))];
        before.extend(vmm_pids().into_iter().map(|p| (p, "husk-vmm", fds(p))));

        let url = port_forward_url(&mut c, &pod).await.unwrap();
        let v = node(&[
            "http",
            &url,
            &HTTP_PORT.to_string(),
            "/f",
            &PARALLEL.to_string(),
        ])
        .await;
        f.lap("20 connections over one session answered");
        let responses = v["responses"].as_array().unwrap();
        assert_eq!(responses.len(), PARALLEL);
        for (i, r) in responses.iter().enumerate() {
            let r = r.as_str().unwrap();
            let (head, got) = r
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("connection {i}: no HTTP response: {r:.200}"));
            assert!(
                head.starts_with("HTTP/1.") && head.contains(" 200 "),
                "{i}: {head}"
            );
            let want = body(i);
            assert!(
                got == want,
                "connection {i}: {} bytes, want {}",
                got.len(),
                want.len()
            );
            assert_eq!(v["errors"][i], "", "connection {i}");
        }

        // Nothing listens on 8081: the refusal is on the error stream, promptly.
        let url = port_forward_url(&mut c, &pod).await.unwrap();
        let t = Instant::now();
        let v = node(&["portforward", &url, "8081", "x", "1"]).await;
        let err = v["errors"][0].as_str().unwrap();
        assert!(
            err.contains("8081") && err.to_lowercase().contains("refused"),
            "{v}"
        );
        assert_eq!(v["echoes"][0], "", "{v}");
        assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
        f.lap("a closed port is reported on the error stream");

        assert_fds_back(&before).await;
        f.lap("no descriptors left in huskd or the VMM");

        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
    });
    f.finish();
}
