//! Executing block requests against the backing: read, write, flush,
//! GET_ID, and the status byte that answers each.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::disk::Disk;
use super::request::{self, Request, RequestType};
use super::{BlockCounters, SERIAL_MAX, Shared};
use crate::devices::bus::lock;

/// Executes requests against the backing.
pub(super) struct RequestHandler<'a> {
    pub shared: &'a Shared,
    pub serial: &'a [u8],
}

impl RequestHandler<'_> {
    /// Handles one chain; returns the used length (bytes written to the
    /// guest, status byte included). The backing is taken per request
    /// (its lock only to clone it), the counters updated after it.
    pub fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let disk = lock(&self.shared.disk).clone();
        let mut counters = BlockCounters::default();
        let used = One {
            disk: disk.as_deref(),
            serial: self.serial,
            counters: &mut counters,
        }
        .handle(mem, chain);
        lock(&self.shared.counters).add(&counters);
        used
    }
}

/// One request against one backing.
struct One<'a> {
    disk: Option<&'a Disk>,
    serial: &'a [u8],
    counters: &'a mut BlockCounters,
}

impl One<'_> {
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        self.counters.requests += 1;
        let (status, status_addr, written) = match request::parse(mem, chain) {
            Ok(request) => {
                let (status, written) = self.execute(mem, &request);
                (status, request.status, written)
            }
            Err(e) => {
                tracing::debug!("block: malformed request: {e}");
                match e.status {
                    Some(addr) => (VIRTIO_BLK_S_IOERR, addr, 0),
                    None => {
                        self.counters.dropped += 1;
                        return 0;
                    }
                }
            }
        };
        match status {
            VIRTIO_BLK_S_IOERR => self.counters.io_errors += 1,
            VIRTIO_BLK_S_UNSUPP => self.counters.unsupported += 1,
            _ => {}
        }
        // The status address was checked to lie in guest RAM.
        if mem.write_obj(status as u8, status_addr).is_err() {
            self.counters.dropped += 1;
            return 0;
        }
        written + 1
    }

    /// Returns the status and the number of data bytes written to the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, request: &Request) -> (u32, u32) {
        match request.kind {
            RequestType::In => self.read(mem, request),
            RequestType::Out => (self.write(mem, request), 0),
            RequestType::Flush => (self.flush(), 0),
            RequestType::GetId => self.get_id(mem, request),
            RequestType::Unsupported(kind) => {
                tracing::debug!("block: unsupported request type {kind}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    fn read(&mut self, mem: &GuestMemoryMmap, request: &Request) -> (u32, u32) {
        let Some(disk) = self.disk else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let Some(offset) = disk.offset_of(request.sector, request.data_len) else {
            tracing::debug!("block: read past the end at sector {}", request.sector);
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        match disk.read_into(mem, offset, &request.data) {
            Ok(()) => {
                self.counters.read_bytes += u64::from(request.data_len);
                (VIRTIO_BLK_S_OK, request.data_len)
            }
            Err(e) => {
                tracing::warn!("block {}: read failed: {e}", disk.path().display());
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    fn write(&mut self, mem: &GuestMemoryMmap, request: &Request) -> u32 {
        let Some(disk) = self.disk else {
            return VIRTIO_BLK_S_IOERR;
        };
        if disk.read_only() {
            tracing::debug!("block: write to a read-only disk refused");
            return VIRTIO_BLK_S_IOERR;
        }
        let Some(offset) = disk.offset_of(request.sector, request.data_len) else {
            tracing::debug!("block: write past the end at sector {}", request.sector);
            return VIRTIO_BLK_S_IOERR;
        };
        match disk.write_from(mem, offset, &request.data) {
            Ok(()) => {
                self.counters.written_bytes += u64::from(request.data_len);
                VIRTIO_BLK_S_OK
            }
            Err(e) => {
                tracing::warn!("block {}: write failed: {e}", disk.path().display());
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    fn flush(&mut self) -> u32 {
        self.counters.flushes += 1;
        match self.disk.map(Disk::flush) {
            None | Some(Ok(())) => VIRTIO_BLK_S_OK,
            Some(Err(e)) => {
                tracing::warn!("block: flush failed: {e}");
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// The serial, zero-padded to 20 bytes, cut to the guest's buffer.
    fn get_id(&mut self, mem: &GuestMemoryMmap, request: &Request) -> (u32, u32) {
        let mut id = [0u8; SERIAL_MAX];
        id[..self.serial.len()].copy_from_slice(self.serial);
        let mut written = 0usize;
        for segment in &request.data {
            let Some(rest) = id.get(written..).filter(|rest| !rest.is_empty()) else {
                break;
            };
            let n = rest.len().min(segment.len as usize);
            if mem.write_slice(&rest[..n], segment.addr).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            written += n;
        }
        (VIRTIO_BLK_S_OK, written as u32)
    }
}
