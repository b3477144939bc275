//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPICs), the PIT.
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_ADDR;
use crate::devices::virtio::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set up {what}: {err}")]
    Setup {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("cannot register guest memory with KVM: {0}")]
    MemorySlot(kvm_ioctls::Error),
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let setup =
            |what, r: Result<(), kvm_ioctls::Error>| r.map_err(|err| VmError::Setup { what, err });
        setup("the TSS address", fd.set_tss_address(KVM_TSS_ADDR))?;
        setup("the in-kernel irqchip", fd.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        setup("the PIT", fd.create_pit2(pit))?;
        Ok(Vm { kvm, fd })
    }

    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::MemorySlot(kvm_ioctls::Error::new(libc::EINVAL)))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the VMM keeps
            // for the whole life of the VM.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(VmError::MemorySlot)?;
        }
        Ok(())
    }
}
