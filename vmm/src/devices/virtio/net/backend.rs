//! What carries the frames on the host side: a tap ([`super::tap::Tap`])
//! in production, any file descriptor with one-frame-per-read semantics in
//! tests. Frames move straight between the descriptor and guest memory.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, volatile_memory::PtrGuardMut};

use super::chain::{self, Segment};

/// Most iovecs one readv/writev takes (Linux's UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// A host-side frame transport. Each read returns exactly one frame and
/// each write sends exactly one; both carry the 12-byte
/// `virtio_net_hdr_v1` in front of the Ethernet frame. The descriptor is
/// non-blocking: no frame to read, or no room to write, is `WouldBlock`.
pub trait Backend: AsRawFd + Send {
    /// Reads one frame into `buffers`. Returns the frame's full length,
    /// header included: more than `buffers.len()` if its tail did not fit
    /// and was lost (a tap reports it so; a backend that cannot tell
    /// returns at most `buffers.len()`).
    fn read_frame(&mut self, buffers: &mut GuestBuffers<'_>) -> io::Result<usize>;

    /// Writes one frame gathered from `buffers`; returns the bytes taken.
    fn write_frame(&mut self, buffers: &GuestBuffers<'_>) -> io::Result<usize>;

    /// Which offloads frames read from the backend may carry (`TUN_F_*`:
    /// partial checksums, TCP segments up to 64 KiB), as the guest
    /// negotiated them. A backend that never produces them ignores this.
    fn set_offloads(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// Guest buffers as iovecs for vectored I/O, checked to lie in guest RAM.
///
/// Built from guest memory and borrowing it, so the pointers stay valid
/// (and, with vm-memory's guards, mapped) for as long as the value lives.
/// Raw iovecs rather than `IoSliceMut`: the guest may write these bytes at
/// any time, so no Rust reference to them may exist.
pub struct GuestBuffers<'a> {
    iovecs: Vec<libc::iovec>,
    _guards: Vec<PtrGuardMut>,
    len: usize,
    _mem: PhantomData<&'a GuestMemoryMmap>,
}

impl<'a> GuestBuffers<'a> {
    /// The host mappings of `segments`, in order.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        segments: &[Segment],
    ) -> Result<GuestBuffers<'a>, chain::Error> {
        let mut iovecs = Vec::with_capacity(segments.len());
        let mut guards = Vec::with_capacity(segments.len());
        let mut len = 0usize;
        for segment in segments {
            for slice in mem.get_slices(segment.addr, segment.len as usize) {
                let slice = slice.map_err(|_| chain::Error::OutOfMemory {
                    addr: segment.addr.0,
                    len: segment.len,
                })?;
                let guard = slice.ptr_guard_mut();
                iovecs.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: guard.len(),
                });
                len += guard.len();
                guards.push(guard);
            }
        }
        if iovecs.len() > IOV_MAX {
            return Err(chain::Error::TooManyDescriptors);
        }
        Ok(GuestBuffers {
            iovecs,
            _guards: guards,
            len,
            _mem: PhantomData,
        })
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }
}

fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let done = call();
        if done >= 0 {
            return Ok(done as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// `readv(2)` of one frame into guest buffers.
pub fn readv(fd: RawFd, buffers: &mut GuestBuffers<'_>) -> io::Result<usize> {
    let iovecs = buffers.iovecs();
    // SAFETY: each iovec maps guest RAM that `buffers` keeps mapped, with
    // the length vm-memory checked; the kernel writes only inside them.
    // At most IOV_MAX iovecs, so the count fits an int.
    retry_eintr(|| unsafe { libc::readv(fd, iovecs.as_ptr(), iovecs.len() as libc::c_int) })
}

/// `writev(2)` of one frame from guest buffers.
pub fn writev(fd: RawFd, buffers: &GuestBuffers<'_>) -> io::Result<usize> {
    let iovecs = buffers.iovecs();
    // SAFETY: as in `readv`; the kernel only reads the buffers.
    retry_eintr(|| unsafe { libc::writev(fd, iovecs.as_ptr(), iovecs.len() as libc::c_int) })
}
