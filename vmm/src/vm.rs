//! A built VM and its run loop: the guest runs until it resets, fails, or
//! the VMM is asked to stop. Building it is [`crate::builder`]'s.

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Cap, Kvm, VmFd};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::ApiInbox;
use crate::arch::x86_64::boot::{self};
use crate::arch::x86_64::{cpuid, mptable, msr, regs};
use crate::config::VmConfig;
use crate::devices::EventFdTrigger;
use crate::devices::bus::{self, lock};
use crate::devices::legacy::{I8042, SerialDevice};
use crate::devices::manager::{self, DeviceThreads, DiskHandle};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::metrics::ExitCounters;
use crate::vcpu::{self, ExitReason, ExitSink, Vcpus};
use crate::{memory, seccomp};

pub(crate) use crate::builder::block_stop_signals;
pub use crate::builder::{GuestLoader, build, build_with_loader, load_guest};

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
    pub(crate) _kvm: Kvm,
    pub(crate) _vm_fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub vcpus: Vcpus,
    pub exits: Arc<ExitSink>,
    pub counters: Arc<ExitCounters>,
    pub boot_done: Arc<OnceLock<Duration>>,
    pub(crate) panic_watch: Arc<Mutex<Option<String>>>,
    /// Console bytes dropped because its output was behind, for the API.
    pub console_dropped: Arc<AtomicU64>,
    pub(crate) reset: EventFdTrigger,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) serial_drained: EventFd,
    /// Written by the API (or anyone) to stop the VM.
    pub stop_request: Arc<StopRequest>,
    pub(crate) start_barrier: Arc<Barrier>,
    /// virtio-blk disks and slots, for the API.
    pub disks: Vec<DiskHandle>,
    /// The vsock device, for the API.
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    /// The network device, for the API.
    pub net: Option<Arc<Mutex<Net>>>,
    pub(crate) device_threads: DeviceThreads,
    /// The API's requests, served on the VMM thread once it runs.
    pub(crate) api: Option<ApiInbox>,
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
    pub(crate) fn new() -> std::io::Result<Self> {
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
        self.device_threads.stop();
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
