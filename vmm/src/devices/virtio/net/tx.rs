//! Transmit: frames from the guest's transmit queue to the backend.

use std::io;

use virtio_queue::{DescriptorChain, Queue};

use crate::devices::virtio::drain::{DrainEnd, Handled, drain};
use vm_memory::GuestMemoryMmap;

use super::backend::{Backend, GuestBuffers};
use super::chain::{self, Direction, HEADER_LEN};
use super::{MAX_FRAMES_PER_WAKE, NetCounters, RingError};

/// Why transmission stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxStop {
    /// The ring is empty and notifications are on again.
    Idle,
    /// The budget is spent; frames may remain.
    Budget,
    /// The backend is full; the frame at the head stays in the ring.
    Blocked,
}

/// What became of one chain.
enum Outcome {
    /// Sent, dropped or malformed: return it to the driver.
    Done,
    /// The backend has no room: leave it in the ring.
    Blocked,
}

/// Sends available frames until the ring is empty, the backend is full or
/// the budget is spent. Returns how many chains went to the used ring.
pub(super) fn transmit<B: Backend>(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    backend: &mut B,
    counters: &mut NetCounters,
) -> Result<(usize, TxStop), RingError> {
    let drained = drain(
        queue,
        mem,
        MAX_FRAMES_PER_WAKE,
        "net tx",
        || false,
        |chain| {
            Ok::<_, RingError>(match transmit_one(mem, chain, backend, counters)? {
                // The device writes nothing into transmit buffers.
                Outcome::Done => Handled::Used(0),
                // Not consumed: the same chain comes first next time.
                Outcome::Blocked => {
                    counters.tx_blocked += 1;
                    Handled::Keep
                }
            })
        },
    )?;
    let stop = match drained.end {
        DrainEnd::Idle => TxStop::Idle,
        DrainEnd::Budget => TxStop::Budget,
        DrainEnd::Paused => TxStop::Blocked,
    };
    Ok((drained.used, stop))
}

fn transmit_one<B: Backend>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    backend: &mut B,
    counters: &mut NetCounters,
) -> Result<Outcome, RingError> {
    let buffers = match chain::parse(mem, chain, Direction::Tx)
        .and_then(|segments| GuestBuffers::new(mem, &segments))
    {
        Ok(buffers) => buffers,
        Err(e) if e.is_corrupt_ring() => return Err(e.into()),
        Err(e) => {
            tracing::debug!("net: malformed tx chain: {e}");
            counters.tx_malformed += 1;
            return Ok(Outcome::Done);
        }
    };
    match backend.write_frame(&buffers) {
        Ok(_) => {
            counters.tx_frames += 1;
            counters.tx_bytes += (buffers.len() - HEADER_LEN) as u64;
        }
        Err(e) if is_backpressure(&e) => return Ok(Outcome::Blocked),
        Err(e) => {
            // E.g. EIO while the tap is down, EINVAL for a header or frame
            // the kernel refuses: this frame is lost, the next may go.
            tracing::debug!("net: backend refused a frame: {e}");
            counters.tx_dropped += 1;
        }
    }
    Ok(Outcome::Done)
}

/// The backend cannot take a frame now but will later.
fn is_backpressure(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock || error.raw_os_error() == Some(libc::ENOBUFS)
}
