//! The container security context through huskd, taking effect inside the pod's VM: a
//! non-root user named in the image's passwd (with its /etc/group membership and a
//! supplemental group), a read-only rootfs, a dropped capability, no_new_privs, a
//! Localhost seccomp profile (also on a process exec'd into the container) and
//! RuntimeDefault; bad security contexts and a host-network pod are refused with
//! InvalidArgument before anything runs.
use std::path::Path;
use std::time::Duration;

use husk_tests::containerd::cri::{parse_log, wait_log_line};
use husk_tests::huskd::{CriClient, Huskd};
use k8s_cri::v1 as cri;
use tonic::Code;

use super::{container_config, create, pod_config, run_container, run_pod, wait_exited, Fixture};

/// Each container prints what it sees, then `done`.
fn with_context(
    name: &str,
    image: &str,
    script: &str,
    sc: cri::LinuxContainerSecurityContext,
) -> cri::ContainerConfig {
    let mut cfg = container_config(name, image, &["sh", "-c", &format!("{script}; echo done")]);
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(sc),
        ..Default::default()
    });
    cfg
}

/// Runs the container to its exit; its stdout lines.
async fn output_of(
    c: &mut CriClient,
    huskd: &Huskd,
    pod: &str,
    sandbox: &cri::PodSandboxConfig,
    log_dir: &Path,
    cfg: cri::ContainerConfig,
) -> Vec<String> {
    let name = cfg.metadata.as_ref().unwrap().name.clone();
    let id = run_container(c, huskd, pod, cfg, sandbox).await;
    let log = log_dir.join(format!("{name}/0.log"));
    wait_log_line(&log, Duration::from_secs(120), |l| l.text == "done").await;
    let st = wait_exited(c, &id, Duration::from_secs(60)).await;
    let lines: Vec<String> = parse_log(&std::fs::read_to_string(&log).unwrap())
        .into_iter()
        .filter(|l| l.stream == "stdout")
        .map(|l| l.text.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(st.exit_code, 0, "{name}: {lines:?}");
    eprintln!("{name}: {lines:?}");
    lines
}

fn has(lines: &[String], want: &str) -> bool {
    lines.iter().any(|l| l == want)
}

fn profile(p: i32, localhost: &str) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile {
        profile_type: p,
        localhost_ref: localhost.into(),
    })
}

#[test]
fn the_security_context_takes_effect_in_the_guest() {
    let f = Fixture::start();
    let (huskd, image) = (&f.huskd, f.image.clone());
    let lap = |what: &str| f.lap(what);
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let log_dir = f.log_dir();

        // A host-network pod: refused at once, with the reason.
        let mut host_net = pod_config("hostnet", &log_dir);
        host_net.linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e =
            c.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(host_net),
                runtime_handler: "kata".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message()
                .contains("a VM sandbox cannot share the host's network namespace"),
            "{e:?}"
        );
        lap("host-network pod refused");

        let sandbox = pod_config("secpod", &log_dir);
        let pod = run_pod(&mut c, huskd, &sandbox).await;
        lap("pod running");

        // Refused before anything runs: a profile that is not there, a privileged
        // container in a pod that is not, an unknown capability.
        for sc in [
            cri::LinuxContainerSecurityContext {
                seccomp: profile(2, "/no/such/profile.json"),
                ..Default::default()
            },
            cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            },
            cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: vec!["NO_SUCH_CAP".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ] {
            let e = create(
                &mut c,
                &pod,
                with_context("bad", &image, "true", sc),
                &sandbox,
            )
            .await
            .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        }

        // A Localhost profile from a host path, for a non-root user without no_new_privs
        // (the filter goes in before the capabilities go).
        let profile_path = huskd.dir.join("deny-mkdir.json");
        std::fs::write(
            &profile_path,
            serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                              "errnoRet": 1}]
            })
            .to_string(),
        )
        .unwrap();
        let cases = [
            (
                // A user by name from the image's passwd; its groups from /etc/group plus
                // one. The kernel sorts the groups; a gid without a name prints bare.
                "user",
                "id",
                cri::LinuxContainerSecurityContext {
                    run_as_username: "user".into(),
                    supplemental_groups: vec![4242],
                    ..Default::default()
                },
                &["uid=1000(user) gid=1000(user) groups=10(wheel),1000(user),4242"][..],
            ),
            (
                "rofs",
                "touch /x 2>/dev/null && echo rw || echo ro",
                cri::LinuxContainerSecurityContext {
                    readonly_rootfs: true,
                    ..Default::default()
                },
                &["ro"],
            ),
            (
                // containerd's default set (CapEff a80425fb) without CAP_CHOWN (bit 0).
                "nochown",
                "chown 1 /tmp 2>/dev/null && echo chown-ok || echo chown-denied; \
                 grep -E '^(CapEff|CapBnd):' /proc/self/status",
                cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        drop_capabilities: vec!["CHOWN".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &[
                    "chown-denied",
                    "CapEff: 00000000a80425fa",
                    "CapBnd: 00000000a80425fa",
                ],
            ),
            (
                "nnp",
                "grep -E '^NoNewPrivs:' /proc/self/status",
                cri::LinuxContainerSecurityContext {
                    no_new_privs: true,
                    ..Default::default()
                },
                &["NoNewPrivs: 1"],
            ),
            (
                "seccomp-local",
                "mkdir /tmp/d 2>&1; grep -E '^Seccomp:' /proc/self/status",
                cri::LinuxContainerSecurityContext {
                    run_as_user: Some(cri::Int64Value { value: 1000 }),
                    seccomp: profile(2, &profile_path.display().to_string()),
                    ..Default::default()
                },
                &[
                    "mkdir: can't create directory '/tmp/d': Operation not permitted",
                    "Seccomp: 2",
                ],
            ),
            (
                // RuntimeDefault: filtered, and ordinary work still runs: forks (moby's
                // masked `clone` rule read as runc reads it) and files.
                "seccomp-default",
                "grep -E '^Seccomp:' /proc/self/status; mkdir /tmp/d && ls -d /tmp/d",
                cri::LinuxContainerSecurityContext {
                    seccomp: profile(0, ""),
                    ..Default::default()
                },
                &["Seccomp: 2", "/tmp/d"],
            ),
        ];
        for (name, script, sc, want) in cases {
            let cfg = with_context(name, &image, script, sc);
            let lines = output_of(&mut c, huskd, &pod, &sandbox, &log_dir, cfg).await;
            for w in want {
                assert!(has(&lines, w), "{name}: want {w:?} in {lines:?}");
            }
            lap(name);
        }

        // A process exec'd into a running container runs under the container's filter,
        // as with runc; without no_new_privs in the spec it gets it (agent's
        // exec_seccomp.rs): the kernel's condition for loading a filter without
        // capabilities.
        let mut cfg = container_config("seccomp-exec", &image, &["sleep", "600"]);
        cfg.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                seccomp: profile(2, &profile_path.display().to_string()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = run_container(&mut c, huskd, &pod, cfg, &sandbox).await;
        let r =
            c.rt.exec_sync(cri::ExecSyncRequest {
                container_id: id,
                cmd: [
                    "sh",
                    "-c",
                    "mkdir /tmp/e 2>&1; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status",
                ]
                .map(String::from)
                .to_vec(),
                timeout: 60,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync: {e}\nhuskd log:\n{}", huskd.log()))
            .into_inner();
        let lines: Vec<String> = String::from_utf8_lossy(&r.stdout)
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        for w in [
            "mkdir: can't create directory '/tmp/e': Operation not permitted",
            "Seccomp: 2",
            "NoNewPrivs: 1",
        ] {
            assert!(has(&lines, w), "seccomp-exec: want {w:?} in {lines:?}");
        }
        lap("seccomp-exec");

        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
        lap("pod removed");
    });
    f.finish();
}
