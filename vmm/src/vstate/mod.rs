//! KVM objects: the VM (memory slots, irqchip, PIT) and its vCPUs, and the one-shot
//! signal through which any thread ends the VM with a reason.
pub mod memory;
pub mod startup;
pub mod vcpu;
pub mod vm;

use std::sync::Mutex;

use husk_vmm_api::VmmExitStatus;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM ended. Each maps to a distinct process exit status (see `exit_status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted or shut down (with `reboot=k`, the i8042 reset; or a triple fault).
    GuestReset,
    /// The guest kernel panicked (seen on the console before its reset).
    GuestPanic,
    /// A vCPU failed: KVM internal error, failed entry, or an exit we cannot handle.
    VcpuError(String),
    /// The control API asked the VM to stop.
    Api,
}

impl ExitReason {
    /// The VMM process's exit status for this end of the VM.
    pub fn exit_status(&self) -> VmmExitStatus {
        match self {
            ExitReason::GuestReset | ExitReason::Api => VmmExitStatus::GuestEnded,
            ExitReason::GuestPanic => VmmExitStatus::GuestPanic,
            ExitReason::VcpuError(_) => VmmExitStatus::VcpuError,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::GuestReset => "guest_reset",
            ExitReason::GuestPanic => "guest_panic",
            ExitReason::VcpuError(_) => "vcpu_error",
            ExitReason::Api => "api",
        }
    }
}

/// The first reason wins; the event loop waits on `evt`.
pub struct VmExit {
    pub evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExit {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    pub fn signal(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
            let _ = self.evt.write(1);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let e = VmExit::new().unwrap();
        e.signal(ExitReason::GuestPanic);
        e.signal(ExitReason::GuestReset);
        assert_eq!(e.reason(), Some(ExitReason::GuestPanic));
        assert_eq!(e.evt.read().unwrap(), 1);
        assert_eq!(
            ExitReason::VcpuError("x".into()).exit_status(),
            VmmExitStatus::VcpuError
        );
    }
}
