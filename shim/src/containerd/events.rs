//! Task events to containerd: over `$TTRPC_ADDRESS` with the crate's `RemotePublisher`
//! (`containerd.services.events.ttrpc.v1.Events/Forward`), or, when that socket cannot be
//! reached or its queue is full, through the publish binary containerd named
//! (`EXE --address A publish --topic T --namespace NS`, the event as an `Any` on stdin).
//!
//! The task service publishes each event when the thing happened and awaits the publish,
//! so containerd sees create → start → exit → delete and exec-added → exec-started → exit
//! in that order: the remote publisher forwards from one FIFO queue.

use std::process::Stdio;

use containerd_shim::event::Event;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;
use tokio::io::AsyncWriteExt;

/// Where events go.
pub struct Publisher {
    remote: Option<RemotePublisher>,
    namespace: String,
    publish_binary: String,
    containerd_address: String,
}

impl Publisher {
    /// Connects to containerd's ttrpc socket; if that fails, events go through the binary.
    pub async fn connect(
        ttrpc_address: &str,
        namespace: &str,
        publish_binary: &str,
        containerd_address: &str,
    ) -> Publisher {
        let remote = if ttrpc_address.is_empty() {
            None
        } else {
            match RemotePublisher::new(ttrpc_address).await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(
                        "cannot reach containerd's ttrpc socket {ttrpc_address} ({e}); \
                         events go through {publish_binary}"
                    );
                    None
                }
            }
        };
        Publisher {
            remote,
            namespace: namespace.into(),
            publish_binary: publish_binary.into(),
            containerd_address: containerd_address.into(),
        }
    }

    /// A publisher that only uses the binary (tests, and `delete`).
    pub fn binary_only(namespace: &str, publish_binary: &str, containerd_address: &str) -> Self {
        Publisher {
            remote: None,
            namespace: namespace.into(),
            publish_binary: publish_binary.into(),
            containerd_address: containerd_address.into(),
        }
    }

    /// Publishes `event` under its topic. Failures are logged: containerd also learns of
    /// exits from Wait and from `delete`, and a lost event must not fail the task call.
    pub async fn publish<E: Event + Clone + 'static>(&self, event: E) {
        let topic = event.topic();
        if let Some(r) = &self.remote {
            match r
                .publish(
                    Context::default(),
                    &topic,
                    &self.namespace,
                    Box::new(event.clone()),
                )
                .await
            {
                Ok(()) => return,
                Err(e) => tracing::warn!(%topic, "ttrpc publish failed ({e}); using the binary"),
            }
        }
        if let Err(e) = self.publish_with_binary(&topic, &event).await {
            tracing::error!(%topic, "cannot publish event: {e}");
        }
    }

    async fn publish_with_binary<E: Event + Clone + 'static>(
        &self,
        topic: &str,
        event: &E,
    ) -> std::io::Result<()> {
        if self.publish_binary.is_empty() {
            return Err(std::io::Error::other("no publish binary given"));
        }
        let any = containerd_shim::util::convert_to_any(Box::new(event.clone()))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let bytes = any
            .write_to_bytes()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut child = tokio::process::Command::new(&self.publish_binary)
            .args(["--address", &self.containerd_address, "publish"])
            .args(["--topic", topic, "--namespace", &self.namespace])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(&bytes).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "{} publish: {}: {}",
                self.publish_binary,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::events::task::TaskExit;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;

    /// The fallback runs the publish binary with containerd's arguments and the event as
    /// an `Any` on stdin: a script records both.
    #[tokio::test]
    async fn binary_fallback_passes_topic_namespace_and_any() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = dir.path().join("publish");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" > {0}.args\ncat > {0}.stdin\n",
                out.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = Publisher::connect("", "k8s.io", script.to_str().unwrap(), "/c.sock").await;
        let ev = TaskExit {
            container_id: "c1".into(),
            exit_status: 7,
            ..Default::default()
        };
        p.publish(ev).await;
        let args = std::fs::read_to_string(format!("{}.args", out.display())).unwrap();
        assert_eq!(
            args.trim(),
            "--address /c.sock publish --topic /tasks/exit --namespace k8s.io"
        );
        let any =
            Any::parse_from_bytes(&std::fs::read(format!("{}.stdin", out.display())).unwrap())
                .unwrap();
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        let back = TaskExit::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.container_id, "c1");
        assert_eq!(back.exit_status, 7);
    }
}
