//! vCPU threads: the KVM_RUN loop, exit dispatch to the buses, and a plain
//! state machine (running, paused, exited) driven by the VMM.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::devices::bus::{Bus, lock};
use crate::metrics::ExitCounters;
use crate::seccomp::{self, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot spawn vCPU thread {0}")]
    Spawn(u8, #[source] std::io::Error),
    #[error("vCPUs did not {0} within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("the vCPUs have exited")]
    Exited,
}

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 or KVM system event): done.
    GuestReset,
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// A vCPU halted with no way to wake (should not happen with an irqchip).
    Halted { vcpu: u8 },
    /// KVM_RUN failed or reported an internal error.
    VcpuFailed { vcpu: u8, detail: String },
}

/// The VMM's side of vCPU exits: the first reason wins and the eventfd wakes
/// the VMM loop.
#[derive(Debug)]
pub struct ExitSink {
    pub event: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitSink {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSink {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    pub fn report(&self, reason: ExitReason) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
        }
        let _ = self.event.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }
}

/// What the VMM wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    Running = 0,
    Paused = 1,
    Exited = 2,
}

impl VcpuState {
    fn from_u8(v: u8) -> VcpuState {
        match v {
            0 => VcpuState::Running,
            1 => VcpuState::Paused,
            _ => VcpuState::Exited,
        }
    }
}

/// Shared between the VMM and its vCPU threads.
#[derive(Debug)]
pub struct VcpuControl {
    requested: AtomicU8,
    /// Number of vCPU threads parked in the paused state.
    parked: Mutex<usize>,
    changed: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            requested: AtomicU8::new(VcpuState::Running as u8),
            parked: Mutex::new(0),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    pub fn requested(&self) -> VcpuState {
        VcpuState::from_u8(self.requested.load(Ordering::Acquire))
    }

    fn request(&self, state: VcpuState) {
        let _guard = lock(&self.parked);
        self.requested.store(state as u8, Ordering::Release);
        self.changed.notify_all();
    }

    /// Parks the calling vCPU thread while the VMM wants it paused.
    fn park_while_paused(&self) {
        let mut parked = lock(&self.parked);
        *parked += 1;
        self.changed.notify_all();
        while self.requested() == VcpuState::Paused {
            parked = self.changed.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        *parked -= 1;
        self.changed.notify_all();
    }

    /// Moves the requested state from `from` to `to`; false (and nothing
    /// changed) when it was not `from`, e.g. the VMM asked the vCPUs to
    /// exit meanwhile: a pause can never undo that.
    fn transition(&self, from: VcpuState, to: VcpuState) -> bool {
        let _guard = lock(&self.parked);
        let moved = self
            .requested
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            self.changed.notify_all();
        }
        moved
    }

    /// Waits until the parked count satisfies `want`, the vCPUs are told to
    /// exit, or `timeout` passes.
    fn wait_parked(
        &self,
        what: &'static str,
        want: impl Fn(usize) -> bool,
        timeout: Duration,
    ) -> Result<(), Error> {
        let parked = lock(&self.parked);
        let (_guard, result) = self
            .changed
            .wait_timeout_while(parked, timeout, |p| {
                !want(*p) && self.requested() != VcpuState::Exited
            })
            .unwrap_or_else(|p| p.into_inner());
        if self.requested() == VcpuState::Exited {
            Err(Error::Exited)
        } else if result.timed_out() {
            Err(Error::Timeout(what, timeout))
        } else {
            Ok(())
        }
    }
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `run` points at this thread's mmap'd kvm_run page,
            // which lives as long as the thread's VcpuFd; a volatile store
            // makes the next (or current) KVM_RUN return at once.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler; once per process.
pub fn register_kick_handler() -> Result<(), Error> {
    register_signal_handler(kick_signal(), kick_handler).map_err(Error::Signal)
}

/// How a vCPU thread starts: shared buses, control and counters.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VcpuControl>,
    pub exits: Arc<ExitSink>,
    pub counters: Arc<ExitCounters>,
    pub seccomp: bool,
    /// Every thread that must install its filter before the guest runs.
    pub start: Arc<Barrier>,
}

pub struct VcpuHandle {
    pub id: u8,
    thread: JoinHandle<()>,
}

/// Starts the vCPU thread. It installs its seccomp filter, waits at the
/// start barrier, then runs the guest until told to exit.
pub fn spawn(id: u8, fd: VcpuFd, ctx: VcpuContext) -> Result<VcpuHandle, Error> {
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || vcpu_thread(id, fd, ctx))
        .map_err(|e| Error::Spawn(id, e))?;
    Ok(VcpuHandle { id, thread })
}

fn vcpu_thread(id: u8, mut fd: VcpuFd, ctx: VcpuContext) {
    KVM_RUN.with(|run| run.set(fd.get_kvm_run() as *mut kvm_run));
    if ctx.seccomp {
        if let Err(e) = seccomp::apply(ThreadKind::Vcpu) {
            ctx.start.wait();
            ctx.exits.report(ExitReason::VcpuFailed {
                vcpu: id,
                detail: format!("seccomp: {e}"),
            });
            return;
        }
    }
    ctx.start.wait();
    let mut unhandled = UnhandledPorts::default();
    loop {
        match ctx.control.requested() {
            VcpuState::Running => {}
            VcpuState::Paused => {
                ctx.control.park_while_paused();
                continue;
            }
            VcpuState::Exited => break,
        }
        if let Some(reason) = run_once(id, &mut fd, &ctx, &mut unhandled) {
            ctx.exits.report(reason);
            break;
        }
    }
    KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
}

/// Logs accesses to ports nobody handles, rate-limited (1st, 2nd, 4th, 8th…).
#[derive(Default)]
struct UnhandledPorts {
    seen: std::collections::HashMap<u64, u64>,
}

impl UnhandledPorts {
    fn note(&mut self, vcpu: u8, kind: &str, addr: u64) {
        let count = self.seen.entry(addr).or_default();
        *count += 1;
        if count.is_power_of_two() {
            tracing::debug!(
                vcpu,
                addr = format!("{addr:#x}"),
                count = *count,
                "unhandled {kind}"
            );
        }
    }
}

/// One KVM_RUN; returns why the guest stopped, if it did.
fn run_once(
    id: u8,
    fd: &mut VcpuFd,
    ctx: &VcpuContext,
    unhandled: &mut UnhandledPorts,
) -> Option<ExitReason> {
    let counters = &ctx.counters;
    match fd.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            ExitCounters::count(&counters.io_in);
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
                ExitCounters::count(&counters.unhandled_port);
                unhandled.note(id, "port read", u64::from(port));
            }
            None
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            ExitCounters::count(&counters.io_out);
            if !ctx.pio.write(u64::from(port), data) {
                ExitCounters::count(&counters.unhandled_port);
                unhandled.note(id, "port write", u64::from(port));
            }
            None
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            ExitCounters::count(&counters.mmio_read);
            if !ctx.mmio.read(addr, data) {
                data.fill(0);
                unhandled.note(id, "MMIO read", addr);
            }
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            ExitCounters::count(&counters.mmio_write);
            if !ctx.mmio.write(addr, data) {
                unhandled.note(id, "MMIO write", addr);
            }
            None
        }
        Ok(VcpuExit::Hlt) => {
            ExitCounters::count(&counters.hlt);
            Some(ExitReason::Halted { vcpu: id })
        }
        Ok(VcpuExit::Shutdown) => {
            ExitCounters::count(&counters.shutdown);
            Some(ExitReason::TripleFault { vcpu: id })
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            ExitCounters::count(&counters.system_event);
            tracing::info!(vcpu = id, kind, "KVM system event");
            Some(ExitReason::GuestReset)
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::VcpuFailed {
            vcpu: id,
            detail: format!("KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on cpu {cpu}"),
        }),
        Ok(VcpuExit::InternalError) => Some(ExitReason::VcpuFailed {
            vcpu: id,
            detail: "KVM_EXIT_INTERNAL_ERROR".into(),
        }),
        Ok(VcpuExit::Intr) => {
            ExitCounters::count(&counters.interrupted);
            None
        }
        Ok(other) => {
            ExitCounters::count(&counters.other);
            tracing::warn!(vcpu = id, "unexpected vCPU exit {other:?}");
            None
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            ExitCounters::count(&counters.interrupted);
            fd.set_kvm_immediate_exit(0);
            None
        }
        Err(e) => Some(ExitReason::VcpuFailed {
            vcpu: id,
            detail: format!("KVM_RUN: {e}"),
        }),
    }
}

/// The VMM's handle on all vCPU threads.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    control: Arc<VcpuControl>,
    /// The threads a remote may signal: emptied (under the lock) before
    /// any is joined, so no remote ever signals a joined thread.
    kickable: Arc<Mutex<Vec<libc::pthread_t>>>,
}

const STATE_CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

impl Vcpus {
    pub fn new(handles: Vec<VcpuHandle>, control: Arc<VcpuControl>) -> Self {
        use std::os::unix::thread::JoinHandleExt;
        let threads = handles.iter().map(|h| h.thread.as_pthread_t()).collect();
        Vcpus {
            handles,
            control,
            kickable: Arc::new(Mutex::new(threads)),
        }
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    pub fn control(&self) -> Arc<VcpuControl> {
        self.control.clone()
    }

    fn kick_all(&self) {
        for handle in &self.handles {
            // A thread that already exited cannot be kicked, and need not be.
            let _ = handle.thread.kill(kick_signal());
        }
    }

    pub fn join(self) {
        self.control.request(VcpuState::Exited);
        self.kick_all();
        // From here on remotes kick nobody (a pause now answers at once).
        self.kickable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for handle in self.handles {
            if handle.thread.join().is_err() {
                tracing::error!(vcpu = handle.id, "vCPU thread panicked");
            }
        }
    }
}

/// Pauses and resumes the vCPUs; cheap to clone into the API thread.
#[derive(Clone)]
pub struct VcpuRemote {
    control: Arc<VcpuControl>,
    threads: Arc<Mutex<Vec<libc::pthread_t>>>,
}

impl Vcpus {
    pub fn remote(&self) -> VcpuRemote {
        VcpuRemote {
            control: self.control.clone(),
            threads: self.kickable.clone(),
        }
    }
}

impl VcpuRemote {
    pub fn state(&self) -> VcpuState {
        self.control.requested()
    }

    /// A transition that did not happen: the vCPUs are already where
    /// asked, or they have exited.
    fn not_moved(&self) -> Result<(), Error> {
        match self.control.requested() {
            VcpuState::Exited => Err(Error::Exited),
            _ => Ok(()),
        }
    }

    pub fn pause(&self) -> Result<(), Error> {
        let n = {
            let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
            if threads.is_empty() {
                // Joined: the VM is over.
                return Err(Error::Exited);
            }
            if !self
                .control
                .transition(VcpuState::Running, VcpuState::Paused)
            {
                return self.not_moved();
            }
            for thread in threads.iter() {
                // SAFETY: `Vcpus::join` empties this list under the same
                // lock before it joins any thread, so each handle here is
                // of a thread not yet joined (one that has returned stays
                // valid to signal until it is joined).
                unsafe { libc::pthread_kill(*thread, kick_signal()) };
            }
            threads.len()
        };
        self.control
            .wait_parked("pause", |p| p == n, STATE_CHANGE_TIMEOUT)
    }

    pub fn resume(&self) -> Result<(), Error> {
        if !self
            .control
            .transition(VcpuState::Paused, VcpuState::Running)
        {
            return self.not_moved();
        }
        self.control
            .wait_parked("resume", |p| p == 0, STATE_CHANGE_TIMEOUT)
    }
}
