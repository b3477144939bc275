//! Container and exec'd processes: output, exit codes, environment, signals, stdin, ttys.

use husk_proto::agent as pb;

use crate::common::*;

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
