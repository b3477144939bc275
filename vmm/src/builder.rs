//! Puts a VM together from a `VmConfig`: KVM VM and memory, kernel + initramfs via PVH,
//! the MP table, legacy devices on the I/O bus, virtio devices on MMIO (announced on the
//! kernel command line), and the vCPUs. Everything that opens a file or a device happens
//! here, on the main thread, before any seccomp filter or jail.
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::MutEventSubscriber;
use kvm_ioctls::IoEventAddress;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{BlockConfig, FsConfig, NetConfig, SerialConfig, VsockConfig};
use crate::arch::layout::{self, FIRST_DEVICE_IRQ, LAST_IRQ, MMIO_DEVICES_START, MMIO_DEVICE_SIZE};
use crate::arch::{mptable, pvh};
use crate::devices::bus::Bus;
use crate::devices::legacy::boot_timer::BootTime;
use crate::devices::legacy::capped_log::{CappedLog, DEFAULT_CONSOLE_CAP};
use crate::devices::legacy::{boot_timer, i8042, serial, BootTimer, SerialDevice, I8042};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::mmio::{cmdline_entry, MmioTransport};
use crate::devices::virtio::{block, fs, net, rng, vsock, GuestMemory, VirtioDevice};
use crate::vstate::startup::StartupProfile;
use crate::vstate::vcpu::{self, Vcpu};
use crate::vstate::vm::Vm;
use crate::vstate::VmExit;
use husk_vmm_api::EntropyConfig;

/// The command line every guest gets before the devices' entries: console on the UART,
/// `reboot=k` so a guest reboot resets through the i8042 and ends the VM, no waiting after
/// a panic, and no slow i8042 AUX probing in kernels that have the driver.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd";

#[derive(Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// Appended to DEFAULT_CMDLINE.
    pub extra_cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub serial: SerialConfig,
    pub blocks: Vec<BlockConfig>,
    /// A `tap_fd` is an index into `tap_fds`.
    pub nets: Vec<NetConfig>,
    pub fs: Vec<FsConfig>,
    pub vsock: Option<VsockConfig>,
    pub tap_fds: Vec<OwnedFd>,
    pub entropy: EntropyConfig,
    /// The directory the VMM will be jailed in (canonical), if any: paths the VM uses after
    /// start are resolved inside it.
    pub jail_dir: Option<PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::new(),
            initramfs: None,
            extra_cmdline: String::new(),
            mem_mib: 128,
            vcpus: 1,
            serial: SerialConfig::Stdout,
            blocks: vec![],
            entropy: EntropyConfig::default(),
            nets: vec![],
            fs: vec![],
            vsock: None,
            jail_dir: None,
            tap_fds: vec![],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error(transparent)]
    Boot(#[from] pvh::BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error("cannot allocate guest memory: {0}")]
    Memory(String),
    #[error("{what}: {err}")]
    Device { what: String, err: String },
    #[error("too many devices: IRQs {FIRST_DEVICE_IRQ}..={LAST_IRQ} are used up")]
    TooManyDevices,
    #[error("cannot register {what} with KVM: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A built VM, not yet running: call `start`.
pub struct BuiltVm {
    pub vm: Vm,
    pub mem: GuestMemory,
    pub exit: Arc<VmExit>,
    pub panicked: Arc<AtomicBool>,
    pub boot_time: BootTime,
    /// Device event handlers, for the caller's event loop.
    pub subscribers: Vec<Subscriber>,
    /// Devices whose back end can block (disks), each for an I/O thread of its own
    /// (`devices::io_thread`), with the thread's name.
    pub io_devices: Vec<(String, Subscriber)>,
    /// Devices' helper threads (virtio-fs's worker and watchdog), to jail and filter.
    pub helper_threads: Vec<crate::devices::helper_thread::HelperThread>,
    pub cmdline: String,
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// Socket files the VM created and must remove when it ends.
    pub cleanup_paths: Vec<PathBuf>,
}

fn dev_err(what: impl Into<String>, err: impl std::fmt::Display) -> BuildError {
    BuildError::Device {
        what: what.into(),
        err: err.to_string(),
    }
}

fn guest_memory(cfg: &VmConfig) -> Result<GuestMemory, BuildError> {
    if cfg.mem_mib < 16 {
        return Err(BuildError::Config(format!(
            "{} MiB of guest memory is too little (at least 16)",
            cfg.mem_mib
        )));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(cfg.mem_mib << 20)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    if cfg.fs.is_empty() {
        let regions = ranges
            .iter()
            .map(|&(gpa, len)| crate::vstate::memory::map_guest_ram(gpa, len, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BuildError::Memory(e.to_string()))?;
        GuestMemoryMmap::from_regions(regions).map_err(|e| BuildError::Memory(e.to_string()))
    } else {
        // vhost-user back ends map guest memory themselves: it must be memfd-backed.
        fs::shared_guest_memory(&ranges).map_err(|e| BuildError::Memory(e.to_string()))
    }
}

/// The KVM VM with guest memory registered and its vCPUs configured, and how long each of
/// those three took.
fn set_up_kvm(
    mem: &GuestMemory,
    num_cpus: u8,
) -> Result<(Vm, Vec<Vcpu>, [Duration; 3]), BuildError> {
    let t = Instant::now();
    let vm = Vm::new()?;
    let created = t.elapsed();
    vm.register_memory(mem)?;
    let registered = t.elapsed();
    let mut vcpus = Vec::with_capacity(num_cpus.into());
    for id in 0..num_cpus {
        let v = Vcpu::new(&vm.fd, id)?;
        v.configure(&vm.kvm, num_cpus)?;
        vcpus.push(v);
    }
    Ok((
        vm,
        vcpus,
        [created, registered - created, t.elapsed() - registered],
    ))
}

/// Loads kernel and initramfs and writes the PVH boot structures and the MP table; returns
/// the kernel's entry point.
fn load_guest(cfg: &VmConfig, mem: &GuestMemory) -> Result<pvh::LoadedKernel, BuildError> {
    let ram = layout::ram_ranges(cfg.mem_mib << 20);
    let kernel = pvh::load_kernel(mem, &cfg.kernel)?;
    let initrd = match &cfg.initramfs {
        Some(p) => Some(pvh::load_initrd(mem, p, kernel.kernel_end)?),
        None => None,
    };
    pvh::write_gdt(mem)?;
    pvh::write_start_info(mem, &ram, initrd)?;
    mptable::setup(mem, cfg.vcpus)?;
    Ok(kernel)
}

fn serial_writer(out: &SerialConfig) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match out {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::Disabled => Box::new(std::io::sink()),
        // The guest decides how much it prints: the file keeps at most a fixed amount.
        SerialConfig::File(p) => {
            let what = || format!("serial output {}", p.display());
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(p)
                .map_err(|e| dev_err(what(), e))?;
            Box::new(CappedLog::new(file, DEFAULT_CONSOLE_CAP).map_err(|e| dev_err(what(), e))?)
        }
    })
}

pub fn build(mut cfg: VmConfig, start: Instant) -> Result<BuiltVm, BuildError> {
    if cfg.vcpus == 0 || cfg.vcpus > 32 {
        return Err(BuildError::Config(format!(
            "{} vCPUs: choose 1 to 32",
            cfg.vcpus
        )));
    }
    let mut profile = StartupProfile::new(start);
    profile.mark("process");
    let mem = guest_memory(&cfg)?;
    crate::vstate::memory::advise(&mem).map_err(|e| BuildError::Memory(e.to_string()))?;
    profile.mark("memory");
    // KVM's VM set-up and the guest's loading (page faults, file reads) do not depend on
    // each other; on a host whose KVM ioctls are slow (nested, PVM) each takes milliseconds,
    // so they run side by side.
    let (vm, vcpus, kernel) = std::thread::scope(|s| {
        let kvm_setup = std::thread::Builder::new()
            .name("husk-kvm-setup".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn_scoped(s, || set_up_kvm(&mem, cfg.vcpus))?;
        let kernel = load_guest(&cfg, &mem);
        profile.mark("kernel+initramfs");
        let (vm, vcpus, took) = kvm_setup.join().expect("the KVM set-up thread panicked")?;
        profile.mark("waiting for kvm");
        for (name, d) in ["kvm", "memory slots", "vcpus"].into_iter().zip(took) {
            profile.beside(name, d);
        }
        Ok::<_, BuildError>((vm, vcpus, kernel?))
    })?;

    let exit = Arc::new(VmExit::new()?);
    let panicked = Arc::new(AtomicBool::new(false));

    let mut pio = Bus::new();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.fd
        .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(|err| BuildError::Kvm {
            what: "the serial IRQ",
            err,
        })?;
    let serial = SerialDevice::new(serial_irq, serial_writer(&cfg.serial)?, panicked.clone());
    let bus_err = |e: crate::devices::bus::BusError| dev_err("I/O bus", e);
    pio.insert(
        Arc::new(Mutex::new(serial)),
        serial::SERIAL_BASE,
        serial::SERIAL_LEN,
    )
    .map_err(bus_err)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        i8042::I8042_BASE,
        i8042::I8042_LEN,
    )
    .map_err(bus_err)?;
    let timer = BootTimer::new(start);
    let boot_time = timer.handle();
    pio.insert(Arc::new(Mutex::new(timer)), boot_timer::BOOT_MARKER_PORT, 1)
        .map_err(bus_err)?;

    let mut devices = Devices {
        vm: &vm,
        mem: &mem,
        subscribers: Vec::new(),
        io_devices: Vec::new(),
        mmio: Bus::new(),
        cmdline: String::new(),
        next: 0,
    };
    let mut cleanup_paths = Vec::new();
    let mut helper_threads = Vec::new();
    let limiter = |what: &str, cfg: &Option<husk_vmm_api::RateLimiterConfig>| {
        cfg.as_ref()
            .map(RateLimiter::new)
            .transpose()
            .map_err(|e| dev_err(what, e))
    };
    let mut rng = rng::Rng::new().map_err(|e| dev_err("virtio-rng", e))?;
    if let Some(l) = limiter("virtio-rng", &cfg.entropy.rate_limiter)? {
        rng = rng.with_rate_limiter(l);
    }
    devices.add(Arc::new(Mutex::new(rng)))?;
    for b in &cfg.blocks {
        let what = format!("disk {}", b.path.display());
        let mut d = block::Block::new(&b.path, b.read_only).map_err(|e| dev_err(&what, e))?;
        if let Some(id) = &b.id {
            d = d.with_serial(id);
        }
        if let Some(l) = limiter(&what, &b.rate_limiter)? {
            d = d.with_rate_limiter(l);
        }
        devices.add_with_io_thread(Arc::new(Mutex::new(d)), "husk-blk")?;
    }
    let mut tap_fds: Vec<Option<OwnedFd>> = cfg.tap_fds.drain(..).map(Some).collect();
    for n in cfg.nets.drain(..) {
        let mac = n.mac.map(|m| m.0);
        let rx = limiter("virtio-net", &n.rx_rate_limiter)?;
        let tx = limiter("virtio-net", &n.tx_rate_limiter)?;
        let d = match (n.tap_name, n.tap_fd) {
            (Some(name), _) => net::Net::new_with_tap_name(&name, mac)
                .map_err(|e| dev_err(format!("tap {name}"), e))?,
            (None, Some(i)) => {
                let fd = tap_fds.get_mut(i).and_then(Option::take).ok_or_else(|| {
                    BuildError::Config(format!("net device: no tap fd number {i}"))
                })?;
                net::Net::new_with_tap_fd(fd, mac).map_err(|e| dev_err("tap fd", e))?
            }
            (None, None) => {
                return Err(BuildError::Config(
                    "net device: neither a tap name nor a tap fd".into(),
                ))
            }
        };
        devices.add(Arc::new(Mutex::new(d.with_rate_limiters(rx, tx))))?;
    }
    for f in &cfg.fs {
        let mut d = fs::Fs::new(&f.socket_path, &f.tag, 1, fs::DEFAULT_QUEUE_SIZE)
            .map_err(|e| dev_err(format!("virtio-fs {}", f.socket_path.display()), e))?;
        helper_threads.extend(d.helper_threads());
        devices.add(Arc::new(Mutex::new(d)))?;
    }
    if let Some(v) = &cfg.vsock {
        let mut d = vsock::Vsock::new(v.guest_cid, &v.uds_path)
            .map_err(|e| dev_err(format!("vsock {}", v.uds_path.display()), e))?;
        if let Some(jail) = &cfg.jail_dir {
            d = d.jailed_in(jail);
        }
        devices.add(Arc::new(Mutex::new(d)))?;
        cleanup_paths.push(v.uds_path.clone());
    }
    let mmio = devices.mmio;
    let subscribers = devices.subscribers;
    let io_devices = devices.io_devices;
    let mut cmdline = format!("{DEFAULT_CMDLINE}{}", devices.cmdline);
    if !cfg.extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&cfg.extra_cmdline);
    }
    pvh::write_cmdline(&mem, &cmdline)?;

    profile.mark("devices");
    vcpus[0].set_boot_entry(kernel.entry.0)?;
    profile.mark("boot entry");
    tracing::info!("VM built: {profile}");
    Ok(BuiltVm {
        vm,
        mem,
        exit,
        panicked,
        boot_time,
        subscribers,
        io_devices,
        helper_threads,
        cmdline,
        vcpus,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        cleanup_paths,
    })
}

/// Places virtio devices: one MMIO window and one IRQ each, ioeventfds and irqfd wired.
struct Devices<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemory,
    subscribers: Vec<Subscriber>,
    io_devices: Vec<(String, Subscriber)>,
    mmio: Bus,
    cmdline: String,
    next: u32,
}

impl Devices<'_> {
    fn add<D: VirtioDevice + 'static>(&mut self, dev: Arc<Mutex<D>>) -> Result<(), BuildError> {
        self.place(dev.clone())?;
        self.subscribers.push(dev);
        Ok(())
    }

    /// Places `dev` for an I/O thread of its own, named `prefix` and the device's index.
    fn add_with_io_thread<D: VirtioDevice + 'static>(
        &mut self,
        dev: Arc<Mutex<D>>,
        prefix: &str,
    ) -> Result<(), BuildError> {
        let n = self.io_devices.len();
        self.place(dev.clone())?;
        self.io_devices.push((format!("{prefix}{n}"), dev));
        Ok(())
    }

    /// An MMIO window, queue notifications and an IRQ for `dev`.
    fn place<D: VirtioDevice + 'static>(&mut self, dev: Arc<Mutex<D>>) -> Result<(), BuildError> {
        let irq = FIRST_DEVICE_IRQ + self.next;
        if irq > LAST_IRQ {
            return Err(BuildError::TooManyDevices);
        }
        let base = MMIO_DEVICES_START + u64::from(self.next) * MMIO_DEVICE_SIZE;
        let transport = MmioTransport::new(self.mem.clone(), dev.clone())?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            // Notify register: the guest writes the queue index there.
            self.vm
                .fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), i as u32)
                .map_err(|err| BuildError::Kvm {
                    what: "a queue notification (ioeventfd)",
                    err,
                })?;
        }
        self.vm
            .fd
            .register_irqfd(&transport.irq().evt, irq)
            .map_err(|err| BuildError::Kvm {
                what: "a device IRQ (irqfd)",
                err,
            })?;
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_DEVICE_SIZE)
            .map_err(|e| dev_err("MMIO bus", e))?;
        self.cmdline.push(' ');
        self.cmdline
            .push_str(&cmdline_entry(MMIO_DEVICE_SIZE, base, irq));
        self.next += 1;
        Ok(())
    }
}

impl BuiltVm {
    /// Starts one thread per vCPU; `on_start` runs on each before its first KVM_RUN.
    pub fn start(
        &mut self,
        on_start: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    ) -> Result<RunningVcpus, BuildError> {
        vcpu::install_kick_handler()?;
        let control = Arc::new(vcpu::RunControl::default());
        let shared = vcpu::VcpuShared {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exit: self.exit.clone(),
            control: control.clone(),
            on_start,
        };
        let mut threads = Vec::new();
        for v in self.vcpus.drain(..) {
            threads.push(v.spawn(shared.clone())?);
        }
        Ok(RunningVcpus { threads, control })
    }
}

pub struct RunningVcpus {
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub control: Arc<vcpu::RunControl>,
}

impl RunningVcpus {
    pub fn pause(&self) -> Result<(), vcpu::VcpuError> {
        vcpu::pause_all(
            &self.control,
            &self.threads,
            std::time::Duration::from_secs(2),
        )
    }
    pub fn resume(&self) {
        vcpu::resume_all(&self.control)
    }
}
