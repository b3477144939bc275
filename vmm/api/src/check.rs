//! Can this host run husk microVMs? Used by `husk check`, `husk run` and the KVM tests.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a host cannot run microVMs at native speed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostProblem {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization for this VM)")]
    NoKvmDevice,
    #[error("/dev/kvm exists but cannot be opened read-write ({0}): run as root or add this user to the kvm group")]
    NoPermission(String),
    #[error("this is a PVM host (kvm_pvm is loaded and the CPU shows neither vmx nor svm): it runs only PVM-enabled guest kernels at native speed and would emulate ours instruction by instruction; run husk inside the lab instead (tests/lab/run -- CMD), or on a host with hardware virtualization")]
    PvmHost,
    #[error("the CPU shows neither vmx nor svm, so KVM here cannot run a guest kernel at native speed; enable hardware virtualization (or nested virtualization for this VM)")]
    NoHardwareVirt,
    #[error("KVM does not answer as expected: {0}")]
    KvmUnusable(String),
}

/// Facts about the host, gathered separately from the verdict so tests can feed their own.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub kvm_device: bool,
    pub kvm_open_error: Option<String>,
    pub pvm_module: bool,
    pub hw_virt_flag: bool,
}

impl HostFacts {
    pub fn gather() -> Self {
        let kvm_device = Path::new("/dev/kvm").exists();
        let kvm_open_error = if kvm_device {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .err()
                .map(|e| e.to_string())
        } else {
            None
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostFacts {
            kvm_device,
            kvm_open_error,
            pvm_module: Path::new("/sys/module/kvm_pvm").exists(),
            hw_virt_flag: cpu_has_hw_virt(&cpuinfo),
        }
    }

    /// The verdict: `Ok` when a husk guest kernel will run at hardware speed.
    pub fn verdict(&self) -> Result<(), HostProblem> {
        if !self.kvm_device {
            return Err(HostProblem::NoKvmDevice);
        }
        if let Some(e) = &self.kvm_open_error {
            return Err(HostProblem::NoPermission(e.clone()));
        }
        if !self.hw_virt_flag {
            if self.pvm_module {
                return Err(HostProblem::PvmHost);
            }
            return Err(HostProblem::NoHardwareVirt);
        }
        Ok(())
    }
}

fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// `_IO(KVMIO, 0x00)` and `_IO(KVMIO, 0x01)` from `<linux/kvm.h>`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
const KVM_CREATE_VM: libc::c_ulong = 0xae01;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: libc::c_int = 12;

/// Checks this host, including that KVM answers with the stable API version and can
/// create a VM.
pub fn check_host() -> Result<(), HostProblem> {
    HostFacts::gather().verdict()?;
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(|e| HostProblem::KvmUnusable(format!("open /dev/kvm: {e}")))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory of ours.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(HostProblem::KvmUnusable(format!(
            "KVM API version {version} (expected {KVM_API_VERSION})"
        )));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0: default) by value; the result is
    // checked and owned at once.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Err(HostProblem::KvmUnusable(format!(
            "KVM_CREATE_VM failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `vm` is a fresh fd nobody else owns; closing it destroys the empty VM.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            kvm_device: true,
            kvm_open_error: None,
            pvm_module: false,
            hw_virt_flag: true,
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(facts().verdict(), Ok(()));
        let f = HostFacts {
            kvm_device: false,
            ..facts()
        };
        assert_eq!(f.verdict(), Err(HostProblem::NoKvmDevice));
        let f = HostFacts {
            kvm_open_error: Some("Permission denied".into()),
            ..facts()
        };
        assert!(matches!(f.verdict(), Err(HostProblem::NoPermission(_))));
        let f = HostFacts {
            hw_virt_flag: false,
            pvm_module: true,
            ..facts()
        };
        assert_eq!(f.verdict(), Err(HostProblem::PvmHost));
        let f = HostFacts {
            hw_virt_flag: false,
            ..facts()
        };
        assert_eq!(f.verdict(), Err(HostProblem::NoHardwareVirt));
    }

    #[test]
    fn cpuinfo_flags() {
        assert!(cpu_has_hw_virt("processor: 0\nflags\t\t: fpu svm npt\n"));
        assert!(cpu_has_hw_virt("flags\t\t: fpu vmx\n"));
        assert!(!cpu_has_hw_virt("flags\t\t: fpu svmx\nvmx_flags: vmx\n"));
    }
}
