//! A vCPU: CPUID/MSR/FPU/LAPIC set-up, PVH entry registers, and the run loop that
//! dispatches port I/O and MMIO exits to the buses. One thread per vCPU.
//!
//! Pausing: the VMM sets `paused` and kicks each vCPU thread with a signal (KVM_RUN then
//! returns EINTR); the thread parks until resumed. The kick repeats until every vCPU has
//! parked, which covers a signal that lands just before KVM_RUN is entered.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::{ExitReason, VmExit};
use crate::arch::layout::{GDT_ADDR, IDT_ADDR, PVH_INFO_ADDR};
use crate::devices::bus::Bus;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {err}")]
    Create { id: u8, err: kvm_ioctls::Error },
    #[error("cannot configure vCPU {id} ({what}): {err}")]
    Configure {
        id: u8,
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("cannot start the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
}

pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal; without one the signal would kill us.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop).map_err(VcpuError::Signal)
}

/// Shared run state of all vCPUs of a VM.
#[derive(Default)]
pub struct RunControl {
    paused: Mutex<bool>,
    cv: Condvar,
    parked: AtomicUsize,
}

impl RunControl {
    fn park_if_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if *paused {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *paused {
                paused = self.cv.wait(paused).unwrap_or_else(|e| e.into_inner());
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Everything a vCPU thread touches besides its own fd.
#[derive(Clone)]
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<VmExit>,
    pub control: Arc<RunControl>,
    /// Runs on the vCPU thread before its first KVM_RUN (installs the seccomp filter).
    pub on_start: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

fn segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// CPUID as KVM supports it, with the per-CPU fields a guest uses to tell CPUs apart
/// and the hypervisor bit set (so the kernel looks for kvm-clock).
///
/// `tsc_deadline`: KVM emulates the LAPIC's TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`)
/// but `KVM_GET_SUPPORTED_CPUID` does not say so; announcing it spares the guest its LAPIC
/// timer calibration, which under nested virtualization takes long and can fail ("APIC timer
/// disabled due to verification failure"), leaving the guest on the PIT.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, num_cpus: u8, tsc_deadline: bool) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(num_cpus) << 16);
                e.ecx |= 1 << 31;
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                if num_cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical-processor count above is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|err| VcpuError::Create { id, err })?;
        Ok(Vcpu { id, fd })
    }

    fn cfg<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|err| VcpuError::Configure {
            id: self.id,
            what,
            err,
        })
    }

    /// Configures the vCPU (CPUID, MSRs, FPU, LAPIC); the boot processor then needs
    /// `set_boot_entry`.
    pub fn configure(&self, kvm: &Kvm, num_cpus: u8) -> Result<(), VcpuError> {
        let mut cpuid = self.cfg("CPUID", kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES))?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        filter_cpuid(&mut cpuid, self.id, num_cpus, tsc_deadline);
        self.cfg("CPUID", self.fd.set_cpuid2(&cpuid))?;

        let msrs = [
            (0x174, 0),             // SYSENTER_CS
            (0x175, 0),             // SYSENTER_ESP
            (0x176, 0),             // SYSENTER_EIP
            (0xc000_0081, 0),       // STAR
            (0xc000_0082, 0),       // LSTAR
            (0xc000_0083, 0),       // CSTAR
            (0xc000_0084, 0),       // SYSCALL_MASK
            (0xc000_0102, 0),       // KERNEL_GS_BASE
            (0x1a0, 1),             // MISC_ENABLE: fast strings
            (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
        ];
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Configure {
            id: self.id,
            what: "MSRs",
            err: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let set = self.cfg("MSRs", self.fd.set_msrs(&msrs))?;
        if set != entries.len() {
            tracing::debug!(
                vcpu = self.id,
                "KVM accepted {set} of {} boot MSRs",
                entries.len()
            );
        }

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.cfg("FPU", self.fd.set_fpu(&fpu))?;

        // LINT0 delivers the PIC's interrupts (ExtINT), LINT1 is NMI.
        let mut lapic = self.cfg("LAPIC", self.fd.get_lapic())?;
        for (reg, mode) in [(0x350usize, 7u32), (0x360, 4)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        self.cfg("LAPIC", self.fd.set_lapic(&lapic))?;
        Ok(())
    }

    /// The PVH entry state of the boot processor: 32-bit protected mode at `entry`, with the
    /// start info's address in rbx.
    pub fn set_boot_entry(&self, entry: u64) -> Result<(), VcpuError> {
        let mut sregs = self.cfg("segment registers", self.fd.get_sregs())?;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 31;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cs = segment(0x08, 0xb, 1);
        let data = segment(0x10, 0x3, 1);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = segment(0x18, 0xb, 0);
        sregs.cr0 = 0x11; // PE | ET: 32-bit protected mode, paging off, as PVH requires
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.cfg("segment registers", self.fd.set_sregs(&sregs))?;
        let mut regs = self.cfg("registers", self.fd.get_regs())?;
        regs.rip = entry;
        regs.rbx = PVH_INFO_ADDR;
        regs.rflags = 2;
        self.cfg("registers", self.fd.set_regs(&regs))?;
        Ok(())
    }

    pub fn spawn(mut self, shared: VcpuShared) -> Result<JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                let id = self.id;
                // A panic (debug builds unwind; release builds abort the process) would end
                // this thread silently and leave the VM hanging with a dead vCPU: end the VM
                // with the reason instead.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if let Err(e) = (shared.on_start)() {
                        shared.exit.signal(ExitReason::VcpuError(format!(
                            "vCPU {id} could not start: {e}"
                        )));
                        return;
                    }
                    self.run(&shared)
                }));
                if ran.is_err() {
                    shared
                        .exit
                        .signal(ExitReason::VcpuError(format!("vCPU {id} panicked")));
                }
            })
            .map_err(VcpuError::Spawn)
    }

    fn run(&mut self, s: &VcpuShared) {
        loop {
            s.control.park_if_paused();
            if s.exit.reason().is_some() {
                return;
            }
            let reason = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !s.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    s.pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !s.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    s.mmio.write(addr, data);
                    None
                }
                // A triple fault: the guest can't go on; treat it as a reset, as a PC does.
                Ok(VcpuExit::Shutdown) => Some(ExitReason::GuestReset),
                Ok(VcpuExit::Hlt) => Some(ExitReason::GuestReset),
                Ok(VcpuExit::FailEntry(r, cpu)) => Some(ExitReason::VcpuError(format!(
                    "KVM failed to enter vCPU {} (hardware reason {r:#x}, cpu {cpu})",
                    self.id
                ))),
                Ok(VcpuExit::InternalError) => Some(ExitReason::VcpuError(format!(
                    "KVM internal error on vCPU {}",
                    self.id
                ))),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => ExitReason::GuestPanic,
                    _ => ExitReason::GuestReset,
                }),
                Ok(other) => Some(ExitReason::VcpuError(format!(
                    "vCPU {}: unexpected exit {other:?}",
                    self.id
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(ExitReason::VcpuError(format!(
                    "KVM_RUN failed on vCPU {}: {e}",
                    self.id
                ))),
            };
            if let Some(r) = reason {
                s.exit.signal(r);
                return;
            }
        }
    }
}

/// Pauses every vCPU thread; returns once all of them are parked.
pub fn pause_all(
    control: &RunControl,
    threads: &[JoinHandle<()>],
    timeout: Duration,
) -> Result<(), VcpuError> {
    *control.paused.lock().unwrap_or_else(|e| e.into_inner()) = true;
    let deadline = Instant::now() + timeout;
    while control.parked.load(Ordering::SeqCst)
        < threads.iter().filter(|t| !t.is_finished()).count()
    {
        if Instant::now() > deadline {
            // All or nothing: the vCPUs that did park run again, so the VM is what its state
            // says (Running) rather than half stopped.
            resume_all(control);
            return Err(VcpuError::PauseTimeout(timeout));
        }
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

pub fn resume_all(control: &RunControl) {
    *control.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
    control.cv.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    /// One vCPU parks, the other never does: the pause fails and the parked one runs again.
    #[test]
    fn a_failed_pause_leaves_no_vcpu_parked() {
        install_kick_handler().unwrap();
        let control = Arc::new(RunControl::default());
        let c = control.clone();
        let parks = std::thread::spawn(move || {
            while !*c.paused.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(1));
            }
            c.park_if_paused();
        });
        let stuck = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(500)));
        let threads = [parks, stuck];
        let err = pause_all(&control, &threads, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, VcpuError::PauseTimeout(_)), "{err}");
        assert!(!*control.paused.lock().unwrap(), "still marked paused");
        let [parks, stuck] = threads;
        // The parked one was woken: it returns from park_if_paused and ends.
        parks.join().unwrap();
        stuck.join().unwrap();
    }

    #[test]
    fn cpuid_identifies_each_cpu() {
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xaabb_ccdd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                ..Default::default()
            },
        ])
        .unwrap();
        filter_cpuid(&mut cpuid, 3, 4, false);
        let e = cpuid.as_slice();
        assert_eq!(
            e[0].ecx & (1 << 24),
            0,
            "no TSC deadline unless KVM emulates it"
        );
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xccdd);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!(e[1].edx, 3);
        filter_cpuid(&mut cpuid, 0, 1, true);
        assert_ne!(cpuid.as_slice()[0].ecx & (1 << 24), 0);
    }
}
