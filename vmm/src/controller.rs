//! The VMM's controller: holds the configuration until `start`, then the running VM.
//! It serves the control API (`ApiHandler`) and is what the one-shot CLI drives too, so
//! both paths go through the same code.
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::api::{self, ApiHandler, Request, Response, VmState, VmStatus};
use crate::builder::{self, BuiltVm, RunningVcpus, Subscriber, VmConfig};
use crate::cleanup::{self, CleanupGuard};
pub use crate::jail::JailSpec;
use crate::jail::JoinJail;
use crate::seccomp::{self, ThreadKind};
use crate::vstate::startup::FirstRun;
use crate::vstate::{ExitReason, VmExit};

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub seccomp: bool,
    /// Test hook: report the jail from inside, then make a forbidden call
    /// ([`crate::jail::selftest`]); the path is one that must not exist in the jail.
    pub jail_selftest: Option<PathBuf>,
}

struct Running {
    vm: BuiltVm,
    vcpus: RunningVcpus,
}

pub struct Controller {
    cfg: VmConfig,
    configured: bool,
    state: VmState,
    running: Option<Running>,
    /// Event-loop subscribers made while handling a request, for the loop to add.
    pending: Vec<Subscriber>,
    /// Set when the VM ended, or was shut down before it started.
    ended: Option<ExitReason>,
    cleanup: Option<CleanupGuard>,
    jail: Option<JailSpec>,
    opts: Options,
}

/// Wakes the event loop when any thread ends the VM.
struct ExitWatcher(Arc<VmExit>);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.evt.read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.evt, EventSet::IN)) {
            tracing::error!("cannot watch the VM exit event: {e:?}");
        }
    }
}

impl Controller {
    /// Forks the socket-cleanup helper (with a jail, forks the VMM into its PID namespace
    /// and stays outside as the helper), so call it first thing, while the process has one
    /// thread and before anything allocates guest memory.
    pub fn new(opts: Options, jail: Option<JailSpec>) -> Result<Self, cleanup::CleanupError> {
        Ok(Controller {
            cfg: VmConfig::default(),
            configured: false,
            state: VmState::Configuring,
            running: None,
            pending: Vec::new(),
            ended: None,
            cleanup: Some(match &jail {
                Some(_) => cleanup::spawn_in_new_pid_namespace()?,
                None => cleanup::spawn()?,
            }),
            jail,
            opts,
        })
    }

    /// Files to remove when the VMM ends, however it ends.
    pub fn remove_at_exit(&mut self, paths: &[PathBuf]) -> Result<(), cleanup::CleanupError> {
        match &mut self.cleanup {
            Some(c) => c.watch(paths),
            None => Ok(()),
        }
    }

    /// Sets the whole configuration at once (the CLI path).
    pub fn set_config(&mut self, cfg: VmConfig) {
        self.cfg = cfg;
        self.configured = true;
    }

    pub fn take_pending(&mut self) -> Vec<Subscriber> {
        std::mem::take(&mut self.pending)
    }

    /// The final reason once the VM is over; a reset after a panic banner is a panic.
    pub fn finished(&mut self) -> Option<ExitReason> {
        if self.ended.is_none() {
            let r = self.running.as_ref()?;
            let mut reason = r.vm.exit.reason()?;
            if reason == ExitReason::GuestReset && r.vm.panicked.load(Ordering::SeqCst) {
                reason = ExitReason::GuestPanic;
            }
            self.ended = Some(reason);
            self.state = VmState::Exited;
        }
        self.ended.clone()
    }

    /// Stops waiting for the cleanup helper: it removes the socket files once we are gone.
    pub fn finish_cleanup(&mut self) {
        if let Some(c) = self.cleanup.take() {
            c.finish();
        }
    }

    /// Builds and starts the VM; boot time is measured from `origin` (process start in
    /// the CLI mode, the `start` request in the API mode).
    pub fn start(&mut self, origin: Instant) -> Result<(), String> {
        if !self.configured {
            return Err("start needs a configure first (kernel, memory, vCPUs)".into());
        }
        let mut cfg = std::mem::take(&mut self.cfg);
        let jail = match &self.jail {
            Some(j) => {
                Some(jailed(j, &mut cfg).map_err(|e| format!("cannot set up the jail: {e}"))?)
            }
            None => None,
        };
        let mut vm =
            builder::build(cfg, origin).map_err(|e| format!("cannot build the VM: {e}"))?;
        self.remove_at_exit(&vm.cleanup_paths)
            .map_err(|e| e.to_string())?;
        if let Some(j) = &jail {
            let helpers: Vec<&dyn JoinJail> = vm
                .helper_threads
                .iter()
                .map(|h| h as &dyn JoinJail)
                .collect();
            crate::jail::enter(j, &helpers).map_err(|e| format!("cannot enter the jail: {e}"))?;
            if let Some(outside) = &self.opts.jail_selftest {
                crate::jail::selftest::report_inside(outside);
            }
        }
        let want_seccomp = self.opts.seccomp;
        let first_run = FirstRun::new(origin);
        let on_start: Arc<dyn Fn() -> Result<(), String> + Send + Sync> = Arc::new(move || {
            if want_seccomp {
                seccomp::install(ThreadKind::Vcpu).map_err(|e| e.to_string())?;
            }
            first_run.entering();
            Ok(())
        });
        if want_seccomp {
            for helper in vm.helper_threads.drain(..) {
                helper
                    .confine()
                    .map_err(|e| format!("cannot confine a device's helper thread: {e}"))?;
            }
        }
        // Before the main thread's filter, which a thread spawned later would inherit.
        for (name, dev) in vm.io_devices.drain(..) {
            // Detached: it serves its device until the process ends.
            crate::devices::io_thread::spawn(&name, dev, want_seccomp)
                .map_err(|e| e.to_string())?;
        }
        let vcpus = vm.start(on_start).map_err(|e| e.to_string())?;
        if want_seccomp {
            seccomp::install(ThreadKind::Vmm)
                .map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
        }
        self.pending.append(&mut vm.subscribers);
        self.pending
            .push(Arc::new(Mutex::new(ExitWatcher(vm.exit.clone()))));
        self.running = Some(Running { vm, vcpus });
        self.state = VmState::Running;
        if self.jail.is_some() && self.opts.jail_selftest.is_some() {
            crate::jail::selftest::forbidden_call();
        }
        Ok(())
    }

    fn status(&mut self) -> VmStatus {
        let exit_reason = self.finished().map(|r| match r {
            ExitReason::GuestReset => api::ExitReason::GuestReset,
            ExitReason::GuestPanic => api::ExitReason::GuestPanic,
            ExitReason::VcpuError(_) => api::ExitReason::VcpuError,
            ExitReason::Api => api::ExitReason::Api,
        });
        VmStatus {
            state: self.state,
            exit_reason,
            boot_ms: self
                .running
                .as_ref()
                .and_then(|r| r.vm.boot_time.micros())
                .map(|us| us / 1000),
        }
    }

    fn configure(&mut self, c: api::MachineConfig) {
        self.cfg.kernel = c.kernel;
        self.cfg.initramfs = c.initramfs;
        self.cfg.extra_cmdline = c.cmdline.unwrap_or_default();
        self.cfg.mem_mib = u64::from(c.mem_mib);
        self.cfg.vcpus = c.vcpus;
        self.cfg.serial = c.serial;
        self.configured = true;
    }
}

/// The jail for this VM: its directory made and resolved (and told to the builder, so paths
/// used after start resolve inside it), and the file-size limit raised to the largest
/// writable disk, whose writes would fail past it.
fn jailed(spec: &JailSpec, cfg: &mut VmConfig) -> Result<JailSpec, crate::jail::JailError> {
    let mut spec = spec.clone();
    spec.dir = crate::jail::prepare_dir(&spec.dir)?;
    cfg.jail_dir = Some(spec.dir.clone());
    let largest_disk = cfg
        .blocks
        .iter()
        .filter(|b| !b.read_only)
        .filter_map(|b| std::fs::metadata(&b.path).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    spec.limits.fsize = spec.limits.fsize.max(largest_disk);
    Ok(spec)
}

/// Virtio devices a VM can have: one interrupt line each.
const MAX_DEVICES: usize =
    (crate::arch::layout::LAST_IRQ - crate::arch::layout::FIRST_DEVICE_IRQ + 1) as usize;

impl Controller {
    /// Devices configured so far, with the rng every VM gets.
    fn device_count(&self) -> usize {
        let c = &self.cfg;
        1 + c.blocks.len() + c.nets.len() + c.fs.len() + usize::from(c.vsock.is_some())
    }
}

impl ApiHandler for Controller {
    fn handle(&mut self, req: Request, mut fds: Vec<OwnedFd>) -> Response {
        let _ = self.finished();
        if let Err(e) = req.check_state(self.state) {
            return Response::error(e);
        }
        let adds_device = match req {
            Request::AddBlock(_) | Request::AddNet(_) | Request::AddFs(_) => true,
            Request::AddVsock(_) => self.cfg.vsock.is_none(),
            _ => false,
        };
        if adds_device && self.device_count() >= MAX_DEVICES {
            // Also bounds the tap fds a client can make us hold before start.
            return Response::error(format!(
                "at most {MAX_DEVICES} devices fit the VM's interrupt lines (vsock and rng included)"
            ));
        }
        match req {
            Request::Configure(c) => self.configure(c),
            Request::AddBlock(b) => self.cfg.blocks.push(b),
            Request::AddNet(mut n) => {
                if let Some(i) = n.tap_fd {
                    if i >= fds.len() {
                        return Response::error("add_net: tap_fd does not name a passed fd");
                    }
                    // From an index into this request's fds to one into the VM's.
                    self.cfg.tap_fds.push(fds.swap_remove(i));
                    n.tap_fd = Some(self.cfg.tap_fds.len() - 1);
                }
                self.cfg.nets.push(n);
            }
            Request::AddFs(f) => self.cfg.fs.push(f),
            Request::AddVsock(v) => self.cfg.vsock = Some(v),
            Request::ConfigureEntropy(e) => self.cfg.entropy = e,
            Request::Start => {
                if let Err(e) = self.start(Instant::now()) {
                    tracing::error!("{e}");
                    return Response::error(e);
                }
            }
            Request::Pause => match &self.running {
                Some(r) => {
                    if let Err(e) = r.vcpus.pause() {
                        return Response::error(e.to_string());
                    }
                    self.state = VmState::Paused;
                }
                None => return Response::error("the VM is not running"),
            },
            Request::Resume => {
                if let Some(r) = &self.running {
                    r.vcpus.resume();
                    self.state = VmState::Running;
                }
            }
            Request::Shutdown => match &self.running {
                Some(r) => {
                    r.vcpus.resume();
                    r.vm.exit.signal(ExitReason::Api)
                }
                None => {
                    self.ended = Some(ExitReason::Api);
                    self.state = VmState::Exited;
                }
            },
            Request::Status => return Response::ok_with(&self.status()),
        }
        Response::ok()
    }
}
