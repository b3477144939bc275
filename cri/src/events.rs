//! huskd's events socket: the ttrpc `containerd.services.events.ttrpc.v1.Events` service
//! that containerd serves at `<its socket>.ttrpc`, served here at `<huskd's socket>.ttrpc`,
//! where each shim's publisher (`TTRPC_ADDRESS`) forwards its task events. huskd acts on
//! `/tasks/exit` of a container's init process (the container's exit, as Wait also reports
//! it: whichever comes first is recorded) and `/tasks/oom` (the container's reason becomes
//! `OOMKilled`, as containerd's CRI plugin does); other topics are counted and dropped. The
//! shim's publisher reconnects and requeues, so events sent while huskd restarts arrive once
//! it serves again. Protocol types stop here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::ForwardRequest;
use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::MessageFull;
use containerd_shim_protos::shim_async::{create_events, Events};
use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext};
use containerd_shim_protos::ttrpc::{self, Code};
use tracing::{debug, info};

use crate::containers::Containers;
use crate::metrics;

pub const TOPIC_EXIT: &str = "/tasks/exit";
pub const TOPIC_OOM: &str = "/tasks/oom";

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("events socket {path}: {message}")]
    Serve { path: PathBuf, message: String },
}

/// The events socket's path for a CRI socket: `<socket>.ttrpc`, as containerd's.
pub fn socket_path(cri_socket: &Path) -> PathBuf {
    let mut s = cri_socket.as_os_str().to_owned();
    s.push(".ttrpc");
    PathBuf::from(s)
}

struct EventsService {
    containers: Arc<Containers>,
}

fn invalid(message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INVALID_ARGUMENT, message))
}

/// Decodes the envelope's event as `M`, whose type the topic names.
fn decode<M: MessageFull>(req: &ForwardRequest, topic: &str) -> ttrpc::Result<M> {
    let any = req
        .envelope
        .event
        .as_ref()
        .ok_or_else(|| invalid(format!("{topic} event without a body")))?;
    let want = M::descriptor().full_name().to_string();
    if any.type_url.rsplit('/').next() != Some(want.as_str()) {
        return Err(invalid(format!(
            "{topic} event is a {:?}, not a {want}",
            any.type_url
        )));
    }
    M::parse_from_bytes(&any.value).map_err(|e| invalid(format!("{topic} event: {e}")))
}

#[async_trait]
impl Events for EventsService {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        let topic = req.envelope.topic.clone();
        metrics::inc(&metrics::METRICS.shim_events);
        match topic.as_str() {
            TOPIC_EXIT => {
                let e: TaskExit = decode(&req, &topic)?;
                let recorded =
                    self.containers
                        .task_exited(&e.container_id, &e.id, e.exit_status as i32);
                debug!(container = %e.container_id, process = %e.id, code = e.exit_status, recorded, "task exit event");
            }
            TOPIC_OOM => {
                let e: TaskOOM = decode(&req, &topic)?;
                let known = self.containers.task_oom(&e.container_id);
                info!(container = %e.container_id, known, "OOM event");
            }
            _ => debug!(%topic, "event not acted on"),
        }
        Ok(Empty::new())
    }
}

/// The running events server; shut it down with [`EventsServer::stop`].
pub struct EventsServer {
    server: Server,
    path: PathBuf,
}

impl EventsServer {
    /// Binds `path` (a stale socket there is replaced) and serves events into `containers`.
    pub async fn start(path: &Path, containers: Arc<Containers>) -> Result<Self, EventsError> {
        let fail = |message: String| EventsError::Serve {
            path: path.to_path_buf(),
            message,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        let service = create_events(Arc::new(EventsService { containers }));
        let mut server = Server::new()
            .bind(&format!("unix://{}", path.display()))
            .map_err(|e| fail(e.to_string()))?
            .register_service(service);
        server.start().await.map_err(|e| fail(e.to_string()))?;
        info!(socket = %path.display(), "huskd serving shim events");
        Ok(EventsServer {
            server,
            path: path.to_path_buf(),
        })
    }

    pub async fn stop(mut self) {
        let _ = self.server.shutdown().await;
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::Message;

    #[test]
    fn the_events_socket_is_the_cri_socket_with_ttrpc_appended() {
        assert_eq!(
            socket_path(Path::new("/run/husk/huskd.sock")),
            PathBuf::from("/run/husk/huskd.sock.ttrpc")
        );
    }

    fn request(topic: &str, type_url: &str, value: Vec<u8>) -> ForwardRequest {
        let mut req = ForwardRequest::new();
        req.envelope.mut_or_insert_default().topic = topic.into();
        let any = req
            .envelope
            .mut_or_insert_default()
            .event
            .mut_or_insert_default();
        any.type_url = type_url.into();
        any.value = value;
        req
    }

    #[test]
    fn an_event_decodes_only_as_the_type_it_says_it_is() {
        let exit = TaskExit {
            container_id: "c1".into(),
            id: "c1".into(),
            exit_status: 137,
            ..Default::default()
        };
        let bytes = exit.write_to_bytes().unwrap();
        let ok = request(TOPIC_EXIT, "containerd.events.TaskExit", bytes.clone());
        let got: TaskExit = decode(&ok, TOPIC_EXIT).unwrap();
        assert_eq!((got.container_id.as_str(), got.exit_status), ("c1", 137));
        // containerd's typeurl form with a prefix.
        let prefixed = request(
            TOPIC_EXIT,
            "types.containerd.io/containerd.events.TaskExit",
            bytes.clone(),
        );
        assert!(decode::<TaskExit>(&prefixed, TOPIC_EXIT).is_ok());
        let wrong = request(TOPIC_EXIT, "containerd.events.TaskOOM", bytes);
        let e = decode::<TaskExit>(&wrong, TOPIC_EXIT).unwrap_err();
        assert!(
            e.to_string().contains("not a containerd.events.TaskExit"),
            "{e}"
        );
        let garbage = request(TOPIC_EXIT, "containerd.events.TaskExit", vec![0xff; 7]);
        assert!(decode::<TaskExit>(&garbage, TOPIC_EXIT).is_err());
        let mut empty = ForwardRequest::new();
        empty.envelope.mut_or_insert_default().topic = TOPIC_OOM.into();
        let e = decode::<TaskOOM>(&empty, TOPIC_OOM).unwrap_err();
        assert!(e.to_string().contains("without a body"), "{e}");
    }
}
