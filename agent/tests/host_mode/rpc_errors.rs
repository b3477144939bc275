//! Refused requests and the ttrpc codes they get: bad specs, ids, path escapes, duplicates.

use husk_proto::agent as pb;

use crate::common::*;

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
