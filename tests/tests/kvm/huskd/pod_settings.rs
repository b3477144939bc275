//! The pod's settings seen from inside its container: the DNS config as
//! `/etc/resolv.conf`, the pod's hostname (UTS and `/etc/hostname`) and the pod's sysctls,
//! applied in the container's namespaces in the guest.
use husk_tests::huskd::{CriClient, Huskd};
use k8s_cri::v1 as cri;

use super::{container_config, pod_config, run_container, run_pod, Fixture};

async fn exec(c: &mut CriClient, huskd: &Huskd, id: &str, cmd: &str) -> String {
    let r =
        c.rt.exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), cmd.into()],
            timeout: 30,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd}: {e}\nhuskd log:\n{}", huskd.log()))
        .into_inner();
    assert_eq!(
        r.exit_code,
        0,
        "{cmd}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

#[test]
fn dns_hostname_and_sysctls_reach_the_container() {
    let f = Fixture::start();
    let (huskd, image) = (&f.huskd, &f.image);
    let rt = husk_tests::pod::runtime();
    rt.block_on(async {
        let (mut c, _) = f.client().await;
        let mut sandbox = pod_config("spod", &f.log_dir());
        sandbox.hostname = "web-0.husk".into();
        sandbox.dns_config = Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into(), "192.0.2.53".into()],
            searches: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
            options: vec!["ndots:5".into()],
        });
        sandbox.linux = Some(cri::LinuxPodSandboxConfig {
            sysctls: [
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
                ("net.ipv4.ip_forward".to_string(), "1".to_string()),
            ]
            .into(),
            ..Default::default()
        });
        let pod = run_pod(&mut c, huskd, &sandbox).await;
        let id = run_container(
            &mut c,
            huskd,
            &pod,
            container_config("main", image, &["sleep", "600"]),
            &sandbox,
        )
        .await;
        f.lap("container running");

        assert_eq!(
            exec(&mut c, huskd, &id, "cat /etc/resolv.conf").await,
            "search default.svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\nnameserver 192.0.2.53\noptions ndots:5\n"
        );
        assert_eq!(exec(&mut c, huskd, &id, "hostname").await, "web-0.husk\n");
        assert_eq!(
            exec(&mut c, huskd, &id, "cat /etc/hostname").await,
            "web-0.husk\n"
        );
        assert_eq!(
            exec(
                &mut c,
                huskd,
                &id,
                "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ip_forward"
            )
            .await,
            "1\n1\n"
        );
        f.remove_pod_and_assert_nothing_left(&mut c, &pod).await;
    });
    f.finish();
}
