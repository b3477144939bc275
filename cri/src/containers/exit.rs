//! How huskd learns that a container exited: the shim's Wait (a task per started
//! container), the shim's `/tasks/exit` event (`crate::events` decodes it) and its
//! `/tasks/oom` event. The first report of an exit is recorded; an OOM kill is the reason.

use std::time::Duration;

use tracing::info;

use super::{now_ns, save, ContainerState, Containers, Table};
use crate::records::Records;
use crate::shim_client::Shim;

impl Containers {
    /// Waits (in a task) for the container's exit through the shim and records it. A shim
    /// that is gone counts as an exit (255) with the reason in the message.
    pub(super) fn spawn_waiter(&self, id: &str, address: &str) {
        let (table, records) = (self.table.clone(), self.records.clone());
        let (address, id) = (address.to_string(), id.to_string());
        tokio::spawn(async move {
            let waited = match Shim::connect(&address).await {
                Ok(shim) => shim.wait(&id, "").await,
                Err(e) => Err(e),
            };
            let (code, message) = match waited {
                Ok(code) => (code as i32, String::new()),
                Err(e) => (255, format!("lost the container's shim: {e}")),
            };
            if finish_in(&table, &records, &id, code, exit_reason(code), &message) {
                info!(container = %id, code, "container exited");
            }
        });
    }

    pub(super) fn finish(&self, id: &str, code: i32, reason: &str, message: &str) -> bool {
        finish_in(&self.table, &self.records, id, code, reason, message)
    }

    /// Waits until the container is recorded exited, up to `d`; true if it is.
    pub(super) async fn wait_exited(&self, id: &str, d: Duration) -> bool {
        let rx = self
            .table
            .lock()
            .expect("containers lock")
            .get(id)
            .map(|s| s.exited.subscribe());
        let Some(mut rx) = rx else { return true };
        let exited = tokio::time::timeout(d, rx.wait_for(|exited| *exited))
            .await
            .is_ok_and(|r| r.is_ok());
        exited
    }

    /// A `/tasks/exit` event. Only the init process's exit (`process` is the container's
    /// own id) is the container's; an exec's exit is its caller's business. True if it was
    /// recorded (false: unknown container, an exec, or already recorded through Wait).
    pub fn task_exited(&self, container: &str, process: &str, code: i32) -> bool {
        if process != container {
            return false;
        }
        let recorded = finish_in(
            &self.table,
            &self.records,
            container,
            code,
            exit_reason(code),
            "",
        );
        if recorded {
            info!(container, code, "container exited (shim event)");
        }
        recorded
    }

    /// A `/tasks/oom` event: the container's reason becomes `OOMKilled` when it exits, or at
    /// once if its exit is already recorded (the exit can overtake the event), as containerd
    /// does. False for an unknown container (e.g. the pod's sandbox task).
    pub fn task_oom(&self, container: &str) -> bool {
        let mut t = self.table.lock().expect("containers lock");
        let Some(s) = t.get_mut(container) else {
            return false;
        };
        s.c.oom_killed = true;
        if s.c.state == ContainerState::Exited {
            s.c.reason = OOM_KILLED.into();
        }
        save(&self.records, &s.c);
        true
    }
}

/// Records an exit (a created container whose Start failed counts as exited too) and wakes
/// whoever waits for it. The first report wins: the shim's exit event and its Wait answer
/// tell of the same exit. An OOM kill the shim reported is the reason, as in containerd.
/// False if there is no such container or its exit was already recorded.
pub(super) fn finish_in(
    table: &Table,
    records: &Records,
    id: &str,
    code: i32,
    reason: &str,
    message: &str,
) -> bool {
    let mut t = table.lock().expect("containers lock");
    let Some(s) = t.get_mut(id) else {
        return false;
    };
    if s.c.state == ContainerState::Exited {
        return false;
    }
    s.c.state = ContainerState::Exited;
    s.c.finished_at_ns = now_ns();
    s.c.exit_code = code;
    s.c.reason = if s.c.oom_killed { OOM_KILLED } else { reason }.into();
    s.c.message = message.into();
    save(records, &s.c);
    s.exited.send_replace(true);
    true
}

/// The reason of an exit with `code`, unless the OOM killer was its cause.
fn exit_reason(code: i32) -> &'static str {
    if code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// The reason of a container the OOM killer hit (containerd's and kubelet's word).
pub(crate) const OOM_KILLED: &str = "OOMKilled";
