//! Building a VM from its config in one readable sequence: KVM, guest
//! memory, the kernel and its boot information, legacy and virtio devices,
//! then the vCPU threads, which wait until [`Vm::run`] releases them.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use linux_loader::loader::Cmdline;
use nix::sys::signal::{SigSet, Signal};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, BootProtocol};
use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::arch::x86_64::{cpuid, mptable, msr, regs};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::EventFdTrigger;
use crate::devices::bus::Bus;
use crate::devices::legacy::console_writer::BoundedWriter;
use crate::devices::legacy::{BootDone, ConsoleOutput, I8042, SerialDevice, i8042, serial};
use crate::devices::manager::VirtioDevices;
use crate::memory;
use crate::metrics::ExitCounters;
use crate::vcpu::{self, ExitSink, VcpuContext, VcpuControl, Vcpus};
use crate::vm::{Error, StopRequest, Vm};

/// KVM's TSS needs three pages just below the BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Builds the VM: KVM, memory, kernel, boot info, devices, vCPUs. The vCPU
/// threads are started but wait until [`Vm::run`] releases them.
/// `extra_threads` is the number of helper threads (the API) that will wait
/// at [`Vm::start_barrier`].
pub fn build(config: VmConfig, start: Instant, extra_threads: usize) -> Result<Vm, Error> {
    build_with_loader(config, start, extra_threads, load_guest)
}

/// Blocks SIGTERM/SIGINT on the calling thread, so that every thread it
/// spawns inherits the mask and only the VMM loop's signalfd sees them.
pub(crate) fn block_stop_signals() -> Result<SigSet, Error> {
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
    let device_threads = virtio.thread_count();
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
    let device_threads = virtio.start_threads(config.seccomp, start_barrier.clone())?;

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
        device_threads,
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
