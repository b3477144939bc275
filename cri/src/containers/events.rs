//! What the shim's task events tell huskd about its containers (`crate::events` decodes
//! them): an exit of a container's init process, and an OOM kill in its cgroup.

use tracing::info;

use super::{exit_reason, finish_in, save, ContainerState, Containers, OOM_KILLED};

impl Containers {
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
