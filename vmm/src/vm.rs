//! Building a VM from its config in one readable sequence, and running it
//! until the guest resets, fails, or the VMM is asked to stop.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use linux_loader::loader::Cmdline;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::ApiInbox;
use crate::arch::x86_64::boot::{self, BootProtocol};
use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::arch::x86_64::{cpuid, mptable, msr, regs};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::EventFdTrigger;
use crate::devices::bus::{self, Bus, lock};
use crate::devices::legacy::console_writer::BoundedWriter;
use crate::devices::legacy::{BootDone, ConsoleOutput, I8042, SerialDevice, i8042, serial};
use crate::devices::manager::{self, DeviceThread, DiskHandle, VirtioDevices};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::metrics::ExitCounters;
use crate::vcpu::{self, ExitReason, ExitSink, VcpuContext, VcpuControl, Vcpus};
use crate::{memory, seccomp};

/// KVM's TSS needs three pages just below the BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot open /dev/kvm ({0}): is KVM available, and may this user use it \
         (root or the kvm group)?"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a capability Frakti needs: {0:?}")]
    MissingCap(Cap),
    #[error("KVM refused {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error(transparent)]
    Cpuid(#[from] cpuid::Error),
    #[error(transparent)]
    Msr(#[from] msr::Error),
    #[error(transparent)]
    Mptable(#[from] mptable::Error),
    #[error(transparent)]
    Bus(#[from] bus::Error),
    #[error(transparent)]
    Devices(#[from] manager::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot open serial output {path}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an event fd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the console writer thread")]
    ConsoleThread(#[source] std::io::Error),
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
}

/// Why the VMM stopped, and the exit code it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reset itself: its normal way to finish (`reboot=k`).
    GuestDone,
    /// The VMM was asked to stop (SIGTERM/SIGINT or the API); `graceful`
    /// if the guest shut down by itself within its grace period.
    Stopped { reason: String, graceful: bool },
    /// The guest kernel panicked (seen on its console).
    GuestPanic(String),
    /// A triple fault, a failed vCPU, or a halted vCPU.
    Failed(ExitReason),
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::GuestDone | Outcome::Stopped { .. } => 0,
            Outcome::GuestPanic(_) | Outcome::Failed(_) => 1,
        }
    }
}

/// A built VM, ready to run.
pub struct Vm {
    pub config: VmConfig,
    pub start: Instant,
    _kvm: Kvm,
    _vm_fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub vcpus: Vcpus,
    pub exits: Arc<ExitSink>,
    pub counters: Arc<ExitCounters>,
    pub boot_done: Arc<OnceLock<Duration>>,
    panic_watch: Arc<Mutex<Option<String>>>,
    /// Console bytes dropped because its output was behind, for the API.
    pub console_dropped: Arc<AtomicU64>,
    reset: EventFdTrigger,
    i8042: Arc<Mutex<I8042>>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_drained: EventFd,
    /// Written by the API (or anyone) to stop the VM.
    pub stop_request: Arc<StopRequest>,
    start_barrier: Arc<Barrier>,
    /// virtio-blk disks and slots, for the API.
    pub disks: Vec<DiskHandle>,
    /// The vsock device, for the API.
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    /// The network device, for the API.
    pub net: Option<Arc<Mutex<Net>>>,
    device_thread: Option<DeviceThread>,
    /// The API's requests, served on the VMM thread once it runs.
    api: Option<ApiInbox>,
}

/// A request to stop the VM, waking the event loop. The guest is asked to
/// shut down (Ctrl-Alt-Del) and gets `grace` to do it before the VM is
/// stopped by force; a zero grace, or a second request, forces at once.
#[derive(Debug)]
pub struct StopRequest {
    pub event: EventFd,
    request: Mutex<Option<(String, Duration)>>,
}

/// How long a guest gets to shut down when asked by a signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl StopRequest {
    fn new() -> std::io::Result<Self> {
        Ok(StopRequest {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            request: Mutex::new(None),
        })
    }

    pub fn request(&self, reason: &str, grace: Duration) {
        *lock(&self.request) = Some((reason.to_string(), grace));
        let _ = self.event.write(1);
    }

    fn take(&self) -> Option<(String, Duration)> {
        lock(&self.request).take()
    }
}

/// Builds the VM: KVM, memory, kernel, boot info, devices, vCPUs. The vCPU
/// threads are started but wait until [`Vm::run`] releases them.
/// `extra_threads` is the number of helper threads (the API) that will wait
/// at [`Vm::start_barrier`].
pub fn build(config: VmConfig, start: Instant, extra_threads: usize) -> Result<Vm, Error> {
    build_with_loader(config, start, extra_threads, load_guest)
}

/// Blocks SIGTERM/SIGINT on the calling thread, so that every thread it
/// spawns inherits the mask and only the VMM loop's signalfd sees them.
fn block_stop_signals() -> Result<SigSet, Error> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block()
        .map_err(|e| Error::EventFd(std::io::Error::from(e)))?;
    Ok(mask)
}

/// Puts the guest into memory and says how the boot vCPU enters it.
pub type GuestLoader = fn(&VmConfig, &GuestMemoryMmap) -> Result<BootProtocol, Error>;

/// [`build`] with another guest loader (tests boot hand-written code).
pub fn build_with_loader(
    config: VmConfig,
    start: Instant,
    extra_threads: usize,
    loader: GuestLoader,
) -> Result<Vm, Error> {
    block_stop_signals()?;
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    for cap in [Cap::Irqchip, Cap::Irqfd, Cap::Ioeventfd, Cap::ImmediateExit] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCap(cap));
        }
    }
    let vm_fd = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm_fd
        .create_irq_chip()
        .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd
        .create_pit2(pit)
        .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;

    tracing::debug!(ms = start.elapsed().as_millis() as u64, "KVM VM created");
    let memory = memory::create(config.memory_bytes())?;
    memory::register(&vm_fd, &memory)?;

    tracing::debug!(
        ms = start.elapsed().as_millis() as u64,
        "guest memory mapped"
    );
    let mut mmio_bus = Bus::default();
    let virtio = VirtioDevices::attach_all(
        &vm_fd,
        &memory,
        &mut mmio_bus,
        &config.disks,
        config.vsock.as_ref(),
        config.net.as_ref(),
    )?;
    // The guest learns of virtio-mmio devices from its command line.
    let mut boot_config = config.clone();
    boot_config.cmdline = std::iter::once(config.cmdline.as_str())
        .chain(virtio.cmdline.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    let protocol = loader(&boot_config, &memory)?;
    tracing::debug!(ms = start.elapsed().as_millis() as u64, "guest loaded");
    mptable::setup(&memory, config.vcpus)?;

    let devices = attach_legacy_devices(&vm_fd, &config, start)?;
    let counters = Arc::new(ExitCounters::default());
    let exits = Arc::new(ExitSink::new().map_err(Error::EventFd)?);
    let control = Arc::new(VcpuControl::default());
    // vCPUs + the VMM thread + helper threads (API) meet here once their
    // seccomp filters are in place.
    let device_threads = usize::from(!virtio.is_empty());
    let start_barrier = Arc::new(Barrier::new(
        usize::from(config.vcpus) + 1 + extra_threads + device_threads,
    ));
    vcpu::register_kick_handler()?;
    let ctx = VcpuContext {
        pio: Arc::new(devices.pio),
        mmio: Arc::new(mmio_bus),
        control: control.clone(),
        exits: exits.clone(),
        counters: counters.clone(),
        seccomp: config.seccomp,
        start: start_barrier.clone(),
    };
    tracing::debug!(ms = start.elapsed().as_millis() as u64, "devices attached");
    let vcpus = create_vcpus(&kvm, &vm_fd, &memory, &config, protocol, ctx)?;
    tracing::debug!(ms = start.elapsed().as_millis() as u64, "vCPUs created");
    // Spawned before the VMM thread installs its filter, which threads
    // would inherit; it installs its own.
    let device_thread = if virtio.is_empty() {
        None
    } else {
        Some(virtio.start_thread(config.seccomp, start_barrier.clone())?)
    };

    Ok(Vm {
        config,
        start,
        _kvm: kvm,
        _vm_fd: vm_fd,
        memory,
        vcpus: Vcpus::new(vcpus, control),
        exits,
        counters,
        boot_done: devices.boot_done,
        panic_watch: devices.panic_watch,
        console_dropped: devices.console_dropped,
        reset: devices.reset,
        i8042: devices.i8042,
        serial: devices.serial,
        serial_drained: devices.serial_drained,
        stop_request: Arc::new(StopRequest::new().map_err(Error::EventFd)?),
        start_barrier,
        disks: virtio.disks,
        vsock: virtio.vsock,
        net: virtio.net,
        device_thread,
        api: None,
    })
}

/// Kernel, initrd, command line and boot information.
pub fn load_guest(config: &VmConfig, memory: &GuestMemoryMmap) -> Result<BootProtocol, Error> {
    let kernel = boot::load_kernel(memory, &config.kernel)?;
    tracing::debug!("kernel loaded");
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(memory, path, kernel.end)?),
        None => None,
    };
    tracing::debug!("initrd loaded");
    let text = config.full_cmdline();
    let cmdline =
        Cmdline::try_from(&text, CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    boot::write_cmdline(memory, &cmdline)?;
    match kernel.protocol {
        BootProtocol::Pvh { .. } => boot::configure_pvh(memory, initrd)?,
        BootProtocol::Linux64 { .. } => {
            boot::configure_linux64(memory, text.len() + 1, initrd, kernel.setup_header)?
        }
    }
    tracing::debug!(protocol = ?kernel.protocol, cmdline = text, "boot protocol");
    Ok(kernel.protocol)
}

struct LegacyDevices {
    pio: Bus,
    i8042: Arc<Mutex<I8042>>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_drained: EventFd,
    reset: EventFdTrigger,
    boot_done: Arc<OnceLock<Duration>>,
    panic_watch: Arc<Mutex<Option<String>>>,
    console_dropped: Arc<AtomicU64>,
}

/// COM1, the i8042 reset line and the boot-done port on the I/O bus.
fn attach_legacy_devices(
    vm_fd: &VmFd,
    config: &VmConfig,
    start: Instant,
) -> Result<LegacyDevices, Error> {
    let out: Box<dyn Write + Send> = match &config.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::SerialFile {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
    };
    // The vCPU that writes COM1 never waits for the output.
    let writer = BoundedWriter::spawn(out, config.seccomp).map_err(Error::ConsoleThread)?;
    let console_dropped = writer.dropped();
    let console = ConsoleOutput::new(Box::new(writer));
    let panic_watch = console.panic_watch();
    let irq = EventFdTrigger::new().map_err(Error::EventFd)?;
    vm_fd
        .register_irqfd(&irq.0, serial::COM1_IRQ)
        .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
    let serial_drained = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    let drained_clone = serial_drained.try_clone().map_err(Error::EventFd)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, drained_clone, console)));

    let reset = EventFdTrigger::new().map_err(Error::EventFd)?;
    let keyboard_irq = EventFdTrigger::new().map_err(Error::EventFd)?;
    vm_fd
        .register_irqfd(&keyboard_irq.0, i8042::KEYBOARD_IRQ)
        .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        reset.try_clone().map_err(Error::EventFd)?,
        keyboard_irq,
    )));
    let boot_done = BootDone::new(start);
    let boot_done_watch = boot_done.watch();

    let mut pio = Bus::default();
    pio.insert(serial::COM1_PORT, serial::COM1_LEN, serial.clone())?;
    pio.insert(i8042::I8042_PORT, i8042::I8042_LEN, i8042.clone())?;
    pio.insert(
        u64::from(frakti_proto::BOOT_DONE_PORT),
        1,
        Arc::new(Mutex::new(boot_done)),
    )?;
    Ok(LegacyDevices {
        pio,
        i8042,
        serial,
        serial_drained,
        reset,
        boot_done: boot_done_watch,
        panic_watch,
        console_dropped,
    })
}

/// Creates and configures every vCPU (CPUID, MSRs, LAPIC; registers for the
/// boot vCPU) and starts its thread.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
    config: &VmConfig,
    protocol: BootProtocol,
    ctx: VcpuContext,
) -> Result<Vec<vcpu::VcpuHandle>, Error> {
    let supported = cpuid::supported(kvm)?;
    let mut handles = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        let mut cpuid = supported.clone();
        cpuid::configure(&mut cpuid, id, config.vcpus)?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
        msr::setup(&fd)?;
        regs::setup_lapic(&fd)?;
        if id == 0 {
            regs::setup_boot_vcpu(&fd, memory, protocol)?;
        } else {
            regs::setup_fpu(&fd)?;
        }
        handles.push(vcpu::spawn(id, fd, ctx.clone())?);
    }
    Ok(handles)
}

impl Vm {
    /// Barrier that helper threads (the API) wait at once their seccomp
    /// filter is installed.
    pub fn start_barrier(&self) -> Arc<Barrier> {
        self.start_barrier.clone()
    }

    /// Has the VMM thread serve the API's requests (from [`crate::api::channel`]).
    pub fn serve_api(&mut self, inbox: ApiInbox) {
        self.api = Some(inbox);
    }

    /// Lets the guest run, serves events until it stops, then tears the
    /// vCPUs down. The calling thread becomes the VMM event loop.
    pub fn run(self) -> Result<Outcome, Error> {
        let signals = signal_fd()?;
        let shutdown_timer =
            TimerFd::new().map_err(|e| Error::EventFd(std::io::Error::other(e)))?;
        if self.config.seccomp {
            seccomp::apply(seccomp::ThreadKind::Vmm)?;
        }
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(Error::EventLoop)?;
        let events = Arc::new(Mutex::new(VmmEvents {
            exits: self.exits.clone(),
            reset: self.reset.0.try_clone().map_err(Error::EventFd)?,
            stop_request: self.stop_request.clone(),
            signals,
            shutdown_timer,
            i8042: self.i8042.clone(),
            serial: self.serial.clone(),
            serial_drained: self.serial_drained.try_clone().map_err(Error::EventFd)?,
            console_input: self.config.console_input,
            shutting_down: None,
            stop: None,
        }));
        manager.add_subscriber(events.clone());
        if let Some(api) = self.api {
            manager.add_subscriber(Arc::new(Mutex::new(api)));
        }
        self.start_barrier.wait();
        tracing::info!(
            vcpus = self.config.vcpus,
            memory_mib = self.config.memory_mib,
            setup_ms = self.start.elapsed().as_millis() as u64,
            "guest started"
        );
        let stop = loop {
            manager.run().map_err(Error::EventLoop)?;
            if let Some(stop) = lock(&events).stop.take() {
                break stop;
            }
        };
        self.vcpus.join();
        if let Some(devices) = self.device_thread {
            devices.stop();
        }
        let panic = lock(&self.panic_watch).clone();
        Ok(outcome(stop, panic))
    }
}

/// Maps why the loop stopped (and a panic seen on the console) to an outcome.
fn outcome(stop: Stop, panic: Option<String>) -> Outcome {
    match (stop, panic) {
        (_, Some(message)) => Outcome::GuestPanic(message),
        (Stop::Reset | Stop::Vcpu(ExitReason::GuestReset), None) => Outcome::GuestDone,
        (Stop::Vcpu(reason), None) => Outcome::Failed(reason),
        (Stop::ShutDown(reason), None) => Outcome::Stopped {
            reason,
            graceful: true,
        },
        (Stop::Forced(reason), None) => Outcome::Stopped {
            reason,
            graceful: false,
        },
    }
}

/// SIGTERM/SIGINT arrive through a signalfd; they were blocked before any
/// VMM thread was spawned.
fn signal_fd() -> Result<SignalFd, Error> {
    let mask = block_stop_signals()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| Error::EventFd(std::io::Error::from(e)))
}

#[derive(Debug)]
enum Stop {
    /// The guest reset the machine by itself.
    Reset,
    Vcpu(ExitReason),
    /// The guest shut down when asked.
    ShutDown(String),
    /// Stopped without the guest's cooperation.
    Forced(String),
}

/// The VMM thread's events: guest reset, vCPU exits, signals, stop
/// requests and their grace timer, and console input.
struct VmmEvents {
    exits: Arc<ExitSink>,
    reset: EventFd,
    stop_request: Arc<StopRequest>,
    signals: SignalFd,
    shutdown_timer: TimerFd,
    i8042: Arc<Mutex<I8042>>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_drained: EventFd,
    console_input: bool,
    /// Why the guest was asked to shut down, while it has time to do so.
    shutting_down: Option<String>,
    stop: Option<Stop>,
}

const STDIN: i32 = libc::STDIN_FILENO;

impl MutEventSubscriber for VmmEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.exits.event.as_raw_fd(),
            self.reset.as_raw_fd(),
            self.stop_request.event.as_raw_fd(),
            self.signals.as_raw_fd(),
            self.shutdown_timer.as_raw_fd(),
            self.serial_drained.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch fd {fd}: {}", frakti_proto::error_chain(&e));
            }
        }
        if self.console_input {
            if let Err(e) = ops.add(Events::new_raw(STDIN, EventSet::IN)) {
                tracing::warn!("console input disabled: {}", frakti_proto::error_chain(&e));
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            tracing::info!("guest reset the machine");
            self.stop = Some(match self.shutting_down.take() {
                Some(reason) => Stop::ShutDown(reason),
                None => Stop::Reset,
            });
        } else if fd == self.exits.event.as_raw_fd() {
            let _ = self.exits.event.read();
            if let Some(reason) = self.exits.reason() {
                self.stop = Some(Stop::Vcpu(reason));
            }
        } else if fd == self.stop_request.event.as_raw_fd() {
            let _ = self.stop_request.event.read();
            if let Some((reason, grace)) = self.stop_request.take() {
                self.ask_guest_to_stop(reason, grace);
            }
        } else if fd == self.signals.as_raw_fd() {
            if let Ok(Some(info)) = self.signals.read_signal() {
                let name = if info.ssi_signo == libc::SIGINT as u32 {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                self.ask_guest_to_stop(name.to_string(), DEFAULT_SHUTDOWN_GRACE);
            }
        } else if fd == self.shutdown_timer.as_raw_fd() {
            let _ = self.shutdown_timer.wait();
            if let Some(reason) = self.shutting_down.take() {
                tracing::warn!("the guest did not shut down in time; stopping it");
                self.stop = Some(Stop::Forced(format!(
                    "{reason}; the guest did not shut down in time"
                )));
            }
        } else if fd == self.serial_drained.as_raw_fd() {
            let _ = self.serial_drained.read();
            lock(&self.serial).flush_input();
        } else if fd == STDIN {
            self.read_console_input(events, ops);
        }
    }
}

impl VmmEvents {
    /// Presses Ctrl-Alt-Del and arms the grace timer; forces the stop if
    /// the grace is zero, the guest cannot be asked, or it was asked before.
    fn ask_guest_to_stop(&mut self, reason: String, grace: Duration) {
        if let Some(earlier) = self.shutting_down.take() {
            self.stop = Some(Stop::Forced(format!("{earlier}; then {reason}")));
            return;
        }
        if grace.is_zero() {
            self.stop = Some(Stop::Forced(reason));
            return;
        }
        if let Err(e) = lock(&self.i8042).press_ctrl_alt_del() {
            tracing::warn!("cannot ask the guest to shut down: {e}");
            self.stop = Some(Stop::Forced(format!("{reason}; guest not asked: {e}")));
            return;
        }
        if let Err(e) = self.shutdown_timer.reset(grace, None) {
            tracing::warn!("no grace timer: {e}");
            self.stop = Some(Stop::Forced(reason));
            return;
        }
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "{reason}: asked the guest to shut down"
        );
        self.shutting_down = Some(reason);
    }

    fn read_console_input(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(STDIN, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // EOF or error: stop watching stdin so the loop does not spin.
            let _ = ops.remove(events);
            return;
        }
        lock(&self.serial).queue_input(&buf[..n as usize]);
    }
}
