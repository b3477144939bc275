//! The generated agent API encodes and decodes, and names its services as documented.

use husk_proto::agent as pb;
use husk_proto::protobuf::Message;

#[test]
fn create_container_request_roundtrips() {
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = "c1".into();
    req.oci_spec_json = br#"{"ociVersion":"1.0.2"}"#.to_vec();
    let mut root = pb::RootfsSource::new();
    root.share_tag = "share0".into();
    root.path = "rootfs".into();
    req.rootfs = Some(root).into();
    let mut m = pb::Mount::new();
    m.destination = "/data".into();
    m.type_ = "bind".into();
    m.options = vec!["rbind".into(), "ro".into()];
    req.mounts.push(m);

    let bytes = req.write_to_bytes().unwrap();
    let back = pb::CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
    assert_eq!(back, req);
    assert_eq!(back.rootfs.path, "rootfs");
}

#[test]
fn wait_response_and_enums() {
    let mut r = pb::WaitProcessResponse::new();
    r.exit_status = 137;
    r.signal = 9;
    let back = pb::WaitProcessResponse::parse_from_bytes(&r.write_to_bytes().unwrap()).unwrap();
    assert_eq!((back.exit_status, back.signal), (137, 9));

    let mut c = pb::CheckResponse::new();
    c.status = pb::check_response::ServingStatus::SERVING.into();
    let back = pb::CheckResponse::parse_from_bytes(&c.write_to_bytes().unwrap()).unwrap();
    assert_eq!(
        back.status.enum_value(),
        Ok(pb::check_response::ServingStatus::SERVING)
    );
}

#[test]
fn constants() {
    assert_eq!(husk_proto::AGENT_VSOCK_PORT, 1024);
    assert_eq!(husk_proto::AGENT_API_VERSION, "husk.agent.v1");
}
