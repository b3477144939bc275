//! A container's resources over its life: cgroup limits and updates, pause and resume, OOM
//! kills, and what removal cleans up.

use husk_proto::agent as pb;

use crate::common::*;

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
