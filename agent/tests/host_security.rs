//! Host-mode tests of the security fields as huskd sends them (see `src/security.rs`): a
//! seccomp filter with `noNewPrivileges: false` for a non-root user, and moby's
//! `SCMP_CMP_MASKED_EQ` operand order. They need root, as `host_mode.rs`.

mod common;

use common::*;
use serde_json::json;

/// `Name:\tvalue` lines of the process's status, whitespace collapsed.
fn status_lines(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[tokio::test]
async fn seccomp_without_no_new_privs_for_a_user_and_masked_eq_as_runc() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("secctx").await;
    a.create_sandbox("pod-secctx", false).await;
    // Shell builtins only until the fork: the filter denies every plain fork.
    let script = "while read -r k v; do case $k in \
                  Uid:|Gid:|Groups:|NoNewPrivs:|Seccomp:|CapEff:|CapBnd:) echo \"$k $v\";; esac; \
                  done < /proc/self/status; (true) && echo forked";
    let mut s = spec(&["sh", "-c", script]);
    s["process"]["noNewPrivileges"] = false.into();
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [1000, 10]});
    // moby's rule, inverted to deny: `clone` with none of the namespace flags (mask
    // 0x7E020000 in `value`, datum 0 in `valueTwo`) fails with EPERM. Read the other way
    // round (mask 0), it would never match and the fork would succeed.
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ERRNO",
                      "errnoRet": 1,
                      "args": [{"index": 0, "value": 0x7E02_0000u64, "valueTwo": 0,
                                "op": "SCMP_CMP_MASKED_EQ"}]}]
    });
    a.run("c1", &s).await;
    let out = a.read_all("c1", "", false).await;
    let err = a.read_all("c1", "", true).await;
    let status = a.wait("c1", "").await.exit_status;
    let lines = status_lines(&out);
    for want in [
        "Uid: 1000 1000 1000 1000",
        "Gid: 1000 1000 1000 1000",
        "Groups: 10 1000",
        "NoNewPrivs: 0",
        "Seccomp: 2",
        // As with runc: the bounding set is the spec's, and a non-root user's execve
        // clears the effective set (no ambient capabilities asked for).
        "CapBnd: 00000000200004e1",
        "CapEff: 0000000000000000",
    ] {
        assert!(
            lines.iter().any(|l| l == want),
            "{want} in {lines:?}; stderr: {err}"
        );
    }
    assert!(
        !lines.iter().any(|l| l == "forked") && status != 0,
        "the fork was denied: {lines:?} {status}; stderr: {err}"
    );
    a.shutdown().await;
}

/// An exec'd process runs under its container's seccomp filter, as with runc (libcontainer
/// 0.7 alone leaves it out: see `src/exec_seccomp.rs`). Three containers, whose exec'd
/// process reports its seccomp mode and no_new_privs and then tries to fork:
/// - no_new_privs set in the spec;
/// - no_new_privs unset, a user without capabilities: the process gets no_new_privs, the
///   only way the kernel lets it load the filter once its capabilities are gone;
/// - no_new_privs unset, root with CAP_SYS_ADMIN: loaded without no_new_privs, as runc.
#[tokio::test]
async fn an_exec_runs_under_its_container_seccomp_filter() {
    if !can_run() {
        return;
    }
    let a = TestAgent::start("execsec").await;
    a.create_sandbox("pod-execsec", false).await;
    let script = "while read -r k v; do case $k in \
                  NoNewPrivs:|Seccomp:) echo \"$k $v\";; esac; \
                  done < /proc/self/status; (true) && echo forked";
    let admin = json!(["CAP_SYS_ADMIN", "CAP_KILL"]);
    for (id, nnp, user, caps, want_nnp) in [
        ("nnp", Some(true), json!({"uid": 0, "gid": 0}), None, "1"),
        (
            "user",
            Some(false),
            json!({"uid": 1000, "gid": 1000}),
            None,
            "1",
        ),
        (
            "admin",
            None,
            json!({"uid": 0, "gid": 0}),
            Some(&admin),
            "0",
        ),
    ] {
        let mut s = spec(&["sleep", "60"]);
        match nnp {
            Some(n) => s["process"]["noNewPrivileges"] = n.into(),
            None => {
                s["process"]
                    .as_object_mut()
                    .unwrap()
                    .remove("noNewPrivileges");
            }
        }
        s["process"]["user"] = user;
        if let Some(c) = caps {
            s["process"]["capabilities"] = json!({"bounding": c, "effective": c, "permitted": c});
        }
        // Every plain fork (clone without namespace flags) fails with EPERM.
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                          "args": [{"index": 0, "value": 0x7E02_0000u64, "valueTwo": 0,
                                    "op": "SCMP_CMP_MASKED_EQ"}]}]
        });
        a.run(id, &s).await;
        // As containerd and huskd do: the container's process with other args.
        let mut p = s["process"].clone();
        p["args"] = json!(["sh", "-c", script]);
        a.exec(id, "e1", p).await.expect("ExecProcess");
        let out = a.read_all(id, "e1", false).await;
        let err = a.read_all(id, "e1", true).await;
        let status = a.wait(id, "e1").await.exit_status;
        let lines = status_lines(&out);
        for want in ["Seccomp: 2".to_string(), format!("NoNewPrivs: {want_nnp}")] {
            assert!(
                lines.contains(&want),
                "{id}: {want} in {lines:?}; stderr: {err}"
            );
        }
        assert!(
            !lines.iter().any(|l| l == "forked") && status != 0,
            "{id}: the exec'd process's fork was denied: {lines:?} {status}; stderr: {err}"
        );
        a.signal(id, "", 9).await.expect("kill the container");
        a.wait(id, "").await;
        a.remove(id).await;
    }
    a.shutdown().await;
}
