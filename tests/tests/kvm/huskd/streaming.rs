//! Exec and attach through huskd's streaming server into a real pod VM, driven by the
//! independent clients of `cri/tests/streaming.rs` (node's spdy-transport, Python's
//! websockets; installed by scripts/setup-stream-clients, whose absence fails the test):
//! a non-tty exec's exact output, an interactive `sh` on a tty answering commands with its
//! exit code coming back, resizes reaching `stty size`, attach to a container with stdin
//! (stdin_once ends it), clients that hang up leaving no process, exec or FIFO behind, and
//! attach after a huskd restart (output yes, stdin refused with the reason).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::containerd::cri::parse_log;
use husk_tests::huskd::{CriClient, Huskd};
use k8s_cri::v1 as cri;
use serde_json::{json, Value};
use tonic::Code;

use super::{container_config, pod_config, run_container, run_pod, status, wait_exited, Fixture};

/// Generous: every step crosses the nested VM under TCG.
const CLIENT_LIMIT: Duration = Duration::from_secs(150);

fn clients_dir() -> PathBuf {
    let root = std::env::var("HUSK_CACHE").unwrap_or_else(|_| "/var/cache/husk".into());
    PathBuf::from(root).join("stream-clients")
}

fn script(name: &str) -> PathBuf {
    husk_tests::repo_root().join("cri/tests/clients").join(name)
}

/// Runs a client and parses the JSON it prints; a missing or failing client fails the test.
async fn run_client(h: &Huskd, program: &Path, args: Vec<String>, env: &[(&str, String)]) -> Value {
    assert!(
        program.exists(),
        "{} is missing: run scripts/setup-stream-clients (scripts/setup does)",
        program.display()
    );
    let mut c = tokio::process::Command::new(program);
    c.args(&args).kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(CLIENT_LIMIT + Duration::from_secs(10), c.output())
        .await
        .expect("the client finishes")
        .expect("run the client");
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}\nhuskd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        h.log()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the client printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn node(h: &Huskd, args: &[&str]) -> Value {
    let module = clients_dir().join("node/node_modules/spdy-transport");
    assert!(
        module.join("package.json").exists(),
        "spdy-transport is missing from {}: run scripts/setup-stream-clients",
        module.display()
    );
    let mut a = vec![script("spdy_client.js").display().to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    run_client(
        h,
        Path::new("/usr/bin/node"),
        a,
        &[
            ("SPDY_TRANSPORT", module.display().to_string()),
            (
                "SPDY_CLIENT_TIMEOUT_MS",
                CLIENT_LIMIT.as_millis().to_string(),
            ),
        ],
    )
    .await
}

async fn python(h: &Huskd, args: &[&str]) -> Value {
    let mut a = vec![script("ws_client.py").display().to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    run_client(
        h,
        &clients_dir().join("venv/bin/python"),
        a,
        &[("WS_CLIENT_TIMEOUT_S", CLIENT_LIMIT.as_secs().to_string())],
    )
    .await
}

/// An interactive session (node's `session` mode): `flags` are the streams opened.
async fn session(h: &Huskd, url: &str, flags: &str, steps: Value) -> Value {
    node(
        h,
        &[
            "session",
            url,
            "v4.channel.k8s.io",
            flags,
            &steps.to_string(),
        ],
    )
    .await
}

/// The exit code a v4 error stream reports (0 for Success).
fn exit_code(v: &Value) -> i64 {
    let text = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no status: {v}"));
    let st: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not a Status ({e}): {text}"));
    if st["status"] == "Success" {
        return 0;
    }
    assert_eq!(st["reason"], "NonZeroExitCode", "{st}");
    st["details"]["causes"][0]["message"]
        .as_str()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no exit code in {st}"))
}

async fn exec_url(c: &mut CriClient, id: &str, cmd: &[&str], stdin: bool, tty: bool) -> String {
    c.rt.exec(cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    })
    .await
    .unwrap_or_else(|e| panic!("Exec: {e}"))
    .into_inner()
    .url
}

async fn attach(
    c: &mut CriClient,
    id: &str,
    stdin: bool,
    stderr: bool,
) -> Result<String, tonic::Status> {
    c.rt.attach(cri::AttachRequest {
        container_id: id.into(),
        stdin,
        tty: false,
        stdout: true,
        stderr,
    })
    .await
    .map(|r| r.into_inner().url)
}

/// ExecSync's stdout, trimmed.
async fn sh(c: &mut CriClient, id: &str, cmd: &str) -> String {
    let r =
        c.rt.exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: ["sh", "-c", cmd].map(String::from).to_vec(),
            timeout: 60,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd}: {e}"))
        .into_inner();
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

/// Waits until no process in the container has `tag` in its command line, and no exec
/// FIFO is left in its bundle: the hung-up exec is gone and cleaned up.
async fn wait_exec_gone(c: &mut CriClient, huskd: &Huskd, id: &str, tag: &str) {
    // `[x]` in the pattern keeps grep from matching its own command line.
    let (head, last) = tag.split_at(tag.len() - 1);
    let count = format!("grep -l '{head}[{last}]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l");
    let bundle = huskd.dir.join("state/bundles").join(id);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let procs = sh(c, id, &count).await;
        let fifos: Vec<String> = super::entries(&bundle)
            .into_iter()
            .filter(|n| n.starts_with("exec-"))
            .collect();
        if procs == "0" && fifos.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after the hang-up: {procs} processes with {tag}, FIFOs {fifos:?}\nhuskd log:\n{}",
            huskd.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn with_stdin(mut cfg: cri::ContainerConfig, once: bool) -> cri::ContainerConfig {
    cfg.stdin = true;
    cfg.stdin_once = once;
    cfg
}

#[test]
fn exec_and_attach_stream_through_huskd_into_the_pod() {
    let mut f = Fixture::start();
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let image = f.image.clone();
        let log_dir = f.log_dir();
        let sandbox = pod_config("spod", &log_dir);
        let pod = run_pod(&mut c, &f.huskd, &sandbox).await;
        // A long-lived container to exec in (with a stdin nobody reads, for the restart).
        let idle = run_container(
            &mut c,
            &f.huskd,
            &pod,
            with_stdin(
                container_config(
                    "idle",
                    &image,
                    &["sh", "-c", "while true; do echo tick; sleep 1; done"],
                ),
                false,
            ),
            &sandbox,
        )
        .await;
        // One that answers its stdin until EOF, then exits 4.
        let echo = run_container(
            &mut c,
            &f.huskd,
            &pod,
            with_stdin(
                container_config(
                    "echo",
                    &image,
                    &[
                        "sh",
                        "-c",
                        "while read l; do echo \"got:$l\"; done; echo stdin-closed >&2; exit 4",
                    ],
                ),
                true,
            ),
            &sandbox,
        )
        .await;
        f.lap("pod and containers running");

        // Exec without a tty (Python websockets, v5): output exact, stderr apart, exit code.
        let url = exec_url(
            &mut c,
            &idle,
            &["sh", "-c", "printf 'a\\nb c\\n'; printf err >&2; exit 2"],
            false,
            false,
        )
        .await;
        let v = python(&f.huskd, &[&url, "v5.channel.k8s.io", "-"]).await;
        assert_eq!(v["stdout"], "a\nb c\n", "{v}");
        assert_eq!(v["stderr"], "err", "{v}");
        assert_eq!(exit_code(&v), 2, "{v}");
        // With stdin, no tty (node SPDY): the client's input back, exact, at its EOF.
        let url = exec_url(&mut c, &idle, &["cat"], true, false).await;
        let v = node(
            &f.huskd,
            &["exec", &url, "v4.channel.k8s.io", "hello from node"],
        )
        .await;
        assert_eq!(v["stdout"], "hello from node", "{v}");
        assert_eq!(exit_code(&v), 0, "{v}");
        f.lap("exec without a tty");

        // An interactive sh on a tty: commands answered one by one, resizes reach the
        // terminal, its exit code comes back.
        let url = exec_url(&mut c, &idle, &["sh"], true, true).await;
        let v = session(
            &f.huskd,
            &url,
            "stdin,stdout,tty",
            json!([
                {"resize": {"Width": 101, "Height": 33}},
                {"send": "echo hi-$((40+2))\n"}, {"expect": "hi-42"},
                {"send": "tty\n"}, {"expect": "/dev/pts/"},
                {"sleep": 1000},
                {"send": "stty size\n"}, {"expect": "33 101"},
                {"resize": {"Width": 120, "Height": 40}},
                {"sleep": 3000},
                {"send": "stty size\n"}, {"expect": "40 120"},
                {"send": "exit 7\n"}
            ]),
        )
        .await;
        assert_eq!(exit_code(&v), 7, "{v}");
        assert_eq!(v["stderr"], "", "no stderr with a tty: {v}");
        f.lap("interactive sh on a tty, resized");

        // Attach to the container with stdin: input reaches it, its output comes back (and
        // goes to the CRI log too); stdin_once closes its stdin when this client ends
        // stdin, so it exits and the attach reports its exit code.
        let e = attach(&mut c, &idle, false, true).await;
        assert!(e.is_ok(), "{e:?}");
        let url = attach(&mut c, &echo, true, true).await.unwrap();
        let v = session(
            &f.huskd,
            &url,
            "stdin,stdout,stderr",
            json!([
                {"send": "ping\n"}, {"expect": "got:ping"},
                {"send": "pong\n"}, {"expect": "got:pong"},
                {"end": true}
            ]),
        )
        .await;
        assert_eq!(v["stdout"], "got:ping\ngot:pong\n", "{v}");
        assert_eq!(v["stderr"], "stdin-closed\n", "{v}");
        assert_eq!(exit_code(&v), 4, "{v}");
        let st = wait_exited(&mut c, &echo, Duration::from_secs(60)).await;
        assert_eq!(st.exit_code, 4, "{st:?}");
        let log = parse_log(&std::fs::read_to_string(log_dir.join("echo/0.log")).unwrap());
        assert!(
            log.iter()
                .any(|l| l.stream == "stdout" && l.text == "got:ping"),
            "{log:?}"
        );
        let e = attach(&mut c, &echo, true, true).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "exited: {e:?}");
        f.lap("attach with stdin_once");

        // Clients that hang up (the connection dropped, no FIN): a tty exec gets SIGHUP, one
        // that ignores it SIGKILL, a non-tty one EOF on stdin, and one without stdin (it
        // would never learn of the client otherwise) SIGKILL. Nothing of them stays: no
        // process in the guest, no exec FIFO in the bundle.
        for (cmd, stdin, tty, tag) in [
            ("echo ready-$((1+1)); exec sleep 3601", true, true, "3601"),
            (
                "trap '' HUP; echo ready-$((1+1)); exec sleep 3602",
                true,
                true,
                "3602",
            ),
            ("echo ready-$((1+1)); cat; : 3603", true, false, "3603"),
            ("echo ready-$((1+1)); exec sleep 3604", false, false, "3604"),
        ] {
            let url = exec_url(&mut c, &idle, &["sh", "-c", cmd], stdin, tty).await;
            let (flags, mut steps) = match (stdin, tty) {
                (_, true) => (
                    "stdin,stdout,tty",
                    vec![json!({"resize": {"Width": 80, "Height": 24}})],
                ),
                (true, false) => ("stdin,stdout,stderr", vec![]),
                (false, false) => ("stdout,stderr", vec![]),
            };
            steps.extend([json!({"expect": "ready-2"}), json!({"hangup": true})]);
            let v = session(&f.huskd, &url, flags, Value::Array(steps)).await;
            assert!(v["stdout"].as_str().unwrap().contains("ready-2"), "{v}");
            wait_exec_gone(&mut c, &f.huskd, &idle, tag).await;
        }
        f.lap("hung-up clients left nothing");

        // A restarted huskd: attaching for output works again (its new log writer fans
        // it out); the stdin went with the old huskd, and asking for it says so.
        f.huskd.kill_and_restart();
        let mut c = f.huskd.connect();
        let e = attach(&mut c, &idle, true, true).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("restarted"), "{e:?}");
        let url = attach(&mut c, &idle, false, false).await.unwrap();
        let v = session(
            &f.huskd,
            &url,
            "stdout",
            json!([{"expect": "tick"}, {"expect": "tick"}, {"hangup": true}]),
        )
        .await;
        assert!(v["stdout"].as_str().unwrap().contains("tick"), "{v}");
        let st = status(&mut c, &idle).await.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
        f.lap("attach after a huskd restart");

        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
    });
    f.finish();
}
