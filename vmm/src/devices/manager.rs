//! The VM's virtio devices: where each lives (MMIO window and IRQ), its KVM
//! wiring (irqfd, ioeventfds), how the guest learns of it (kernel command
//! line), and the device thread that runs their I/O off the vCPU threads.

use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::bus::{self, Bus, lock};
use super::virtio::block::{self, Block};
use super::virtio::mmio::{self, MmioTransport};
use super::virtio::net::mac::MacAddr;
use super::virtio::net::tap::{self, Tap};
use super::virtio::net::{self, Net};
use super::virtio::vsock::{self, Vsock};
use super::virtio::{MMIO_WINDOW_SIZE, MmioSlot, VirtioDevice};
use crate::config::{DiskConfig, NetConfig, VsockConfig};
use crate::seccomp::{self, ThreadKind};
use frakti_proto::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no MMIO slot or IRQ left for device {0}")]
    NoSlot(usize),
    #[error("disk {serial:?}")]
    Block {
        serial: String,
        #[source]
        source: block::Error,
    },
    #[error("vsock device")]
    Vsock(#[from] vsock::Error),
    #[error("network device")]
    Net(#[from] net::Error),
    #[error("network device: tap")]
    Tap(#[from] tap::Error),
    #[error("network device: bad MAC {0:?}")]
    Mac(String),
    #[error("network device: give tap=NAME or fd=N")]
    NoTap,
    #[error("virtio-mmio transport")]
    Transport(#[from] mmio::Error),
    #[error(transparent)]
    Bus(#[from] bus::Error),
    #[error("KVM refused {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot start the device thread")]
    Thread(#[source] std::io::Error),
}

/// A virtio-blk disk or slot, as the API sees it.
#[derive(Clone)]
pub struct DiskHandle {
    pub slot: MmioSlot,
    pub block: Arc<Mutex<Block>>,
}

impl std::fmt::Debug for DiskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskHandle")
            .field("slot", &self.slot)
            .finish()
    }
}

impl DiskHandle {
    pub fn serial(&self) -> String {
        lock(&self.block).serial().to_string()
    }

    /// Sets (or with `None` removes) the backing file, read-only when asked
    /// or when the slot is; the guest gets a config-change interrupt and
    /// sees the new capacity.
    /// Opens `path` (without holding the device: a slow open must not
    /// stall the device thread or a vCPU reading the config space), then
    /// swaps it in.
    pub fn set_backing(&self, path: Option<&Path>, read_only: bool) -> Result<(), block::Error> {
        let read_only = read_only || lock(&self.block).read_only();
        let disk = path
            .map(|path| block::disk::Disk::open(path, read_only))
            .transpose()?;
        lock(&self.block).set_disk(disk);
        Ok(())
    }

    pub fn backing(&self) -> Option<PathBuf> {
        lock(&self.block).disk().map(|d| d.path().to_path_buf())
    }
}

/// Every virtio device of a VM.
#[derive(Default)]
pub struct VirtioDevices {
    pub disks: Vec<DiskHandle>,
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    pub net: Option<Arc<Mutex<Net>>>,
    /// `virtio_mmio.device=...` parameters for the kernel command line.
    pub cmdline: Vec<String>,
    /// The disks' queue handlers: each served on a thread of its own, so
    /// disk I/O never delays network or vsock traffic, nor another disk.
    disk_subscribers: Vec<Subscriber>,
    /// vsock and net.
    io_subscribers: Vec<Subscriber>,
}

impl VirtioDevices {
    /// Creates the disks (slots 0..), then the vsock and network devices,
    /// places them on the MMIO bus and wires them to KVM.
    pub fn attach_all(
        vm_fd: &VmFd,
        memory: &GuestMemoryMmap,
        mmio_bus: &mut Bus,
        disks: &[DiskConfig],
        vsock: Option<&VsockConfig>,
        net: Option<&NetConfig>,
    ) -> Result<VirtioDevices, Error> {
        let mut devices = VirtioDevices::default();
        for config in disks {
            let slot = devices.next_slot()?;
            let block_err = |source| Error::Block {
                serial: config.serial.clone(),
                source,
            };
            let block = match &config.path {
                Some(path) => Block::with_backing(&config.serial, path, config.read_only),
                None => Block::new(&config.serial, config.read_only),
            }
            .map_err(block_err)?;
            let block = Arc::new(Mutex::new(block));
            devices.attach(vm_fd, memory, mmio_bus, slot, block.clone())?;
            devices.disk_subscribers.push(lock(&block).queue_handler());
            devices.disks.push(DiskHandle { slot, block });
        }
        if let Some(config) = vsock {
            let slot = devices.next_slot()?;
            let vsock = Arc::new(Mutex::new(Vsock::new(config.cid, &config.uds)?));
            devices.attach(vm_fd, memory, mmio_bus, slot, vsock.clone())?;
            devices.io_subscribers.push(vsock.clone());
            devices.vsock = Some(vsock);
        }
        if let Some(config) = net {
            let slot = devices.next_slot()?;
            let net = Arc::new(Mutex::new(Net::new(open_tap(config)?, mac(config)?)?));
            devices.attach(vm_fd, memory, mmio_bus, slot, net.clone())?;
            devices.io_subscribers.push(net.clone());
            devices.net = Some(net);
        }
        Ok(devices)
    }

    fn next_slot(&self) -> Result<MmioSlot, Error> {
        let index = self.cmdline.len();
        u32::try_from(index)
            .ok()
            .and_then(MmioSlot::nth)
            .ok_or(Error::NoSlot(index))
    }

    /// Puts one device behind a virtio-mmio transport at `slot`.
    fn attach(
        &mut self,
        vm_fd: &VmFd,
        memory: &GuestMemoryMmap,
        mmio_bus: &mut Bus,
        slot: MmioSlot,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), Error> {
        let transport = MmioTransport::new(memory.clone(), device)?;
        vm_fd
            .register_irqfd(transport.interrupt().irqfd(), slot.irq)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        // Queue notifications go straight from KVM to the device thread.
        for (offset, queue, evt) in transport.ioeventfds() {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(slot.base + offset), queue)
                .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
        }
        mmio_bus.insert(slot.base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))?;
        self.cmdline.push(slot.cmdline_param());
        Ok(())
    }

    /// How many device threads [`VirtioDevices::start_threads`] starts (each
    /// waits at the start barrier).
    pub fn thread_count(&self) -> usize {
        self.disk_subscribers.len() + usize::from(!self.io_subscribers.is_empty())
    }

    /// Starts the device threads — one per disk (a slow disk, a volume on
    /// a busy device, holds up only itself), one for vsock and net — each
    /// installs its seccomp filter, waits at `start` with the other
    /// threads, then serves queue events until [`DeviceThreads::stop`].
    pub fn start_threads(
        &self,
        with_seccomp: bool,
        start: Arc<Barrier>,
    ) -> Result<DeviceThreads, Error> {
        let mut threads = Vec::new();
        for (n, disk) in self.disk_subscribers.iter().enumerate() {
            threads.push(start_thread(
                &format!("disk{n}"),
                vec![disk.clone()],
                with_seccomp,
                start.clone(),
            )?);
        }
        if !self.io_subscribers.is_empty() {
            threads.push(start_thread(
                "net-vsock",
                self.io_subscribers.clone(),
                with_seccomp,
                start.clone(),
            )?);
        }
        Ok(DeviceThreads(threads))
    }
}

fn start_thread(
    name: &str,
    mut subscribers: Vec<Subscriber>,
    with_seccomp: bool,
    start: Arc<Barrier>,
) -> Result<DeviceThread, Error> {
    let stop_event = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Thread)?;
    let stopped = Arc::new(AtomicBool::new(false));
    let stop = StopEvent {
        event: stop_event.try_clone().map_err(Error::Thread)?,
        stopped: stopped.clone(),
    };
    subscribers.push(Arc::new(Mutex::new(stop)));
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || device_loop(subscribers, &stopped, with_seccomp, &start))
        .map_err(Error::Thread)?;
    Ok(DeviceThread { stop_event, handle })
}

/// Opens the tap on the VMM thread, before its seccomp filter forbids it.
fn open_tap(config: &NetConfig) -> Result<Tap, Error> {
    match (&config.tap, config.fd) {
        (Some(name), None) => Ok(Tap::open(name)?),
        (None, Some(fd)) if fd >= 0 => {
            // SAFETY: the configuration hands this inherited descriptor to
            // the VMM; nothing else in the process owns or closes it.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            Ok(Tap::from_fd(fd)?)
        }
        _ => Err(Error::NoTap),
    }
}

fn mac(config: &NetConfig) -> Result<MacAddr, Error> {
    match &config.mac {
        Some(text) => text.parse().map_err(|_| Error::Mac(text.clone())),
        None => Ok(MacAddr::random_local()),
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn device_loop(
    subscribers: Vec<Subscriber>,
    stopped: &AtomicBool,
    with_seccomp: bool,
    start: &Barrier,
) {
    // Created before the filter: epoll_create1 is not on the device list.
    let manager = EventManager::<Subscriber>::new();
    let filtered = if with_seccomp {
        seccomp::apply(ThreadKind::Device)
    } else {
        Ok(())
    };
    start.wait();
    let mut manager = match (manager, filtered) {
        (Ok(manager), Ok(())) => manager,
        (Err(e), _) => {
            return tracing::error!("devices stopped: no event loop: {}", error_chain(&e));
        }
        (_, Err(e)) => return tracing::error!("devices stopped: {}", error_chain(&e)),
    };
    for subscriber in subscribers {
        manager.add_subscriber(subscriber);
    }
    while !stopped.load(Ordering::Acquire) {
        if let Err(e) = manager.run() {
            tracing::error!("devices stopped: event loop: {}", error_chain(&e));
            return;
        }
    }
}

/// Ends the device loop when its eventfd is written.
struct StopEvent {
    event: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopEvent {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            tracing::error!(
                "device thread cannot watch its stop event: {}",
                error_chain(&e)
            );
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.event.read();
        self.stopped.store(true, Ordering::Release);
    }
}

/// A running device thread.
struct DeviceThread {
    stop_event: EventFd,
    handle: JoinHandle<()>,
}

/// The running device threads.
pub struct DeviceThreads(Vec<DeviceThread>);

impl DeviceThreads {
    /// Stops each loop after its current event and joins the threads.
    pub fn stop(self) {
        for thread in &self.0 {
            let _ = thread.stop_event.write(1);
        }
        for thread in self.0 {
            if thread.handle.join().is_err() {
                tracing::error!("device thread panicked");
            }
        }
    }
}
