//! The queue-draining loop the devices share for the queues the guest
//! fills (block requests, net transmit, vsock transmit): pop a chain,
//! handle it, return it, within a budget, with notifications off while
//! there is work and on again once the ring is empty.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// What became of one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Return it to the driver with this used length.
    Used(u32),
    /// Leave it in the ring (it comes first next time) and stop.
    Keep,
}

/// Why draining ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// The ring is empty and notifications are on again.
    Idle,
    /// The budget is spent; chains may remain: the caller comes back.
    Budget,
    /// `pause` said so, or a chain was kept.
    Paused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains returned to the used ring.
    pub used: usize,
    pub end: DrainEnd,
}

/// Pops and handles chains until the ring is empty (notifications
/// re-enabled, then looked at once more: the driver may have added a chain
/// before it saw them on), the budget is spent (rounds count too, so a
/// driver racing us cannot keep us here), `pause` says to stop, or
/// `handle` keeps a chain. A chain whose head is past the queue cannot be
/// returned: it is skipped (logged under `what`).
pub fn drain<E: From<virtio_queue::Error>>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut budget: usize,
    what: &str,
    mut pause: impl FnMut() -> bool,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Result<Handled, E>,
) -> Result<Drained, E> {
    let mut used = 0;
    loop {
        queue.disable_notification(mem)?;
        while budget > 0 {
            if pause() {
                return Ok(Drained {
                    used,
                    end: DrainEnd::Paused,
                });
            }
            let Some(chain) = queue.iter(mem)?.next() else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            match handle(chain)? {
                Handled::Keep => {
                    queue.go_to_previous_position();
                    return Ok(Drained {
                        used,
                        end: DrainEnd::Paused,
                    });
                }
                Handled::Used(len) => {
                    if let Err(e) = queue.add_used(mem, head, len) {
                        tracing::debug!("{what}: cannot return descriptor {head}: {e}");
                        continue;
                    }
                    used += 1;
                }
            }
        }
        if budget == 0 {
            return Ok(Drained {
                used,
                end: DrainEnd::Budget,
            });
        }
        budget -= 1;
        if !queue.enable_notification(mem)? {
            return Ok(Drained {
                used,
                end: DrainEnd::Idle,
            });
        }
    }
}
