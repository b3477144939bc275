//! huskd's events socket (`<socket>.ttrpc`), spoken to with containerd's generated ttrpc
//! Events client as a shim's publisher does: events are accepted and counted, an event
//! whose body is not what its topic says is InvalidArgument, the socket is served again
//! after a restart and removed when huskd stops. (That a real shim's exit and OOM events
//! reach a container is the lab's `huskd::oom` test.)

mod support;

use std::net::{SocketAddr, TcpListener};

use containerd_shim_protos::api::ForwardRequest;
use containerd_shim_protos::events::task::TaskExit;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::ttrpc::context;
use containerd_shim_protos::ttrpc::{Code, Error as TtrpcError};
use support::Huskd;

fn events_total(addr: SocketAddr) -> f64 {
    support::sample(
        &support::http_get(addr, "/metrics").1,
        "huskd_shim_events_total",
    )
}

async fn events_client(huskd: &Huskd) -> EventsClient {
    let path = format!("unix://{}.ttrpc", huskd.socket.display());
    EventsClient::new(
        Client::connect(&path)
            .await
            .expect("connect to huskd's events socket"),
    )
}

fn forward(topic: &str, type_url: &str, value: Vec<u8>) -> ForwardRequest {
    let mut req = ForwardRequest::new();
    let env = req.envelope.mut_or_insert_default();
    env.namespace = "k8s.io".into();
    env.topic = topic.into();
    let any = env.event.mut_or_insert_default();
    any.type_url = type_url.into();
    any.value = value;
    req
}

fn exit_event(container: &str) -> ForwardRequest {
    let e = TaskExit {
        container_id: container.into(),
        id: container.into(),
        pid: 42,
        exit_status: 3,
        ..Default::default()
    };
    forward(
        "/tasks/exit",
        "containerd.events.TaskExit",
        e.write_to_bytes().unwrap(),
    )
}

fn ctx() -> context::Context {
    context::with_timeout(10_000_000_000)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_events_socket_takes_shim_events_and_refuses_malformed_ones() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = free.local_addr().unwrap();
    drop(free);
    let mut huskd = Huskd::start(&format!("metrics_address = \"{metrics}\"\n"));
    let events_socket = huskd.dir.join("huskd.sock.ttrpc");
    assert!(
        events_socket.exists(),
        "no events socket beside the CRI socket"
    );
    assert_eq!(events_total(metrics), 0.0);

    let c = events_client(&huskd).await;
    // An exit of a container huskd does not know (e.g. another runtime's): accepted, dropped.
    c.forward(ctx(), &exit_event("nosuch"))
        .await
        .expect("Forward");
    // A topic huskd does not act on.
    c.forward(
        ctx(),
        &forward("/tasks/start", "containerd.events.TaskStart", vec![]),
    )
    .await
    .expect("Forward of /tasks/start");
    assert_eq!(events_total(metrics), 2.0);

    for (req, want) in [
        (
            forward("/tasks/exit", "containerd.events.TaskOOM", vec![]),
            "not a containerd.events.TaskExit",
        ),
        (
            forward("/tasks/oom", "containerd.events.TaskOOM", vec![0xff; 9]),
            "/tasks/oom event",
        ),
    ] {
        match c.forward(ctx(), &req).await {
            Err(TtrpcError::RpcStatus(s)) => {
                assert_eq!(s.code(), Code::INVALID_ARGUMENT, "{s:?}");
                assert!(s.message.contains(want), "{s:?}");
            }
            other => panic!("a malformed event got {other:?}"),
        }
    }
    let mut no_body = ForwardRequest::new();
    no_body.envelope.mut_or_insert_default().topic = "/tasks/exit".into();
    assert!(c.forward(ctx(), &no_body).await.is_err());

    // A restarted huskd serves the same socket again (a shim's publisher reconnects there).
    drop(c);
    huskd.restart();
    events_client(&huskd)
        .await
        .forward(ctx(), &exit_event("nosuch"))
        .await
        .expect("Forward after a restart");
    drop(huskd);
    assert!(
        !events_socket.exists(),
        "huskd left its events socket behind"
    );
}
