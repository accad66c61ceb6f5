//! Receive: frames from the backend into the guest's receive buffers.

use std::io;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::backend::{Backend, GuestBuffers};
use super::chain::{self, Direction, HEADER_LEN};
use super::{MAX_FRAMES_PER_WAKE, NetCounters, RingError};

/// Why reception stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RxStop {
    /// The backend has no frame waiting.
    BackendEmpty,
    /// The driver gave no buffers; notifications are on so it kicks us
    /// when it adds some.
    NoBuffers,
    /// The budget is spent; frames may remain in the backend.
    Budget,
    /// The backend failed (error or end of file): stop reading it.
    BackendFailed,
}

/// What became of one chain.
enum Outcome {
    /// Return it to the driver with this used length.
    Used(u32),
    /// Nothing read: leave it in the ring.
    Unused(RxStop),
}

/// Moves frames from the backend into receive chains until one of them
/// runs out or the budget is spent. A chain is taken from the ring only
/// when a frame is read into it, so no frame is ever held by the device.
/// `offloads`: the guest negotiated checksum/segmentation offloads, so the
/// backend's header (flags, GSO fields) reaches it; else a clean one does.
pub(super) fn receive<B: Backend>(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    backend: &mut B,
    counters: &mut NetCounters,
    offloads: bool,
) -> Result<(usize, RxStop), RingError> {
    let mut used = 0;
    let mut budget = MAX_FRAMES_PER_WAKE;
    // Buffers are only wanted when frames wait, see `NoBuffers`.
    queue.disable_notification(mem)?;
    while budget > 0 {
        budget -= 1;
        let Some(chain) = queue.iter(mem)?.next() else {
            // Ask for a kick, then look again: the driver may have added
            // buffers before it saw the request.
            if queue.enable_notification(mem)? {
                queue.disable_notification(mem)?;
                continue;
            }
            return Ok((used, RxStop::NoBuffers));
        };
        let head = chain.head_index();
        match receive_one(mem, chain, backend, counters, offloads)? {
            Outcome::Used(len) => {
                if let Err(e) = queue.add_used(mem, head, len) {
                    tracing::debug!("net: cannot return rx descriptor {head}: {e}");
                    continue;
                }
                used += 1;
            }
            Outcome::Unused(stop) => {
                queue.go_to_previous_position();
                return Ok((used, stop));
            }
        }
    }
    Ok((used, RxStop::Budget))
}

fn receive_one<B: Backend>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    backend: &mut B,
    counters: &mut NetCounters,
    offloads: bool,
) -> Result<Outcome, RingError> {
    let segments = match chain::parse(mem, chain, Direction::Rx) {
        Ok(segments) => segments,
        Err(e) if e.is_corrupt_ring() => return Err(e.into()),
        Err(e) => return Ok(malformed(counters, &e)),
    };
    let mut buffers = match GuestBuffers::new(mem, &segments) {
        Ok(buffers) => buffers,
        Err(e) => return Ok(malformed(counters, &e)),
    };
    let capacity = buffers.len();
    let len = match backend.read_frame(&mut buffers) {
        Ok(0) => {
            tracing::warn!("net: the backend reached end of file");
            return Ok(Outcome::Unused(RxStop::BackendFailed));
        }
        Ok(len) => len,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Ok(Outcome::Unused(RxStop::BackendEmpty));
        }
        Err(e) => {
            tracing::warn!("net: cannot read from the backend: {e}");
            return Ok(Outcome::Unused(RxStop::BackendFailed));
        }
    };
    drop(buffers);
    if len > capacity {
        // The driver's buffers were smaller than the frame: its tail is
        // lost, so the frame is dropped whole (used length 0).
        counters.rx_truncated += 1;
        return Ok(Outcome::Used(0));
    }
    let Ok(used) = u32::try_from(len) else {
        counters.rx_truncated += 1;
        return Ok(Outcome::Used(0));
    };
    if len < HEADER_LEN {
        counters.rx_dropped += 1;
        return Ok(Outcome::Used(0));
    }
    // Without offloads the backend's header may carry flags the guest did
    // not negotiate: it gets a clean one. With them the header passes
    // through. Either way num_buffers, which a tap leaves unwritten, is 1.
    let written = if offloads {
        chain::write_at(
            mem,
            &segments,
            chain::NUM_BUFFERS_OFFSET,
            &1u16.to_le_bytes(),
        )
    } else {
        chain::write_at(mem, &segments, 0, &chain::rx_header())
    };
    if written.is_err() {
        counters.rx_dropped += 1;
        return Ok(Outcome::Used(0));
    }
    counters.rx_frames += 1;
    counters.rx_bytes += (len - HEADER_LEN) as u64;
    Ok(Outcome::Used(used))
}

fn malformed(counters: &mut NetCounters, error: &chain::Error) -> Outcome {
    tracing::debug!("net: malformed rx chain: {error}");
    counters.rx_malformed += 1;
    Outcome::Used(0)
}
