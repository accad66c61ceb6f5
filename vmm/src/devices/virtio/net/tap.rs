//! A tap interface: Ethernet frames with a virtio-net header in front,
//! one per read or write, on a non-blocking file descriptor.
//!
//! The tap is set up for the device's frame format once, at construction
//! (`IFF_NO_PI`, `IFF_VNET_HDR` with a 12-byte `virtio_net_hdr_v1`, no
//! offloads), so that at runtime frames move between the tap and guest
//! buffers with a single readv/writev each and no copy in between.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::{self, Backend, GuestBuffers};
use super::chain::HEADER_LEN;

const TUN_DEVICE: &str = "/dev/net/tun";
/// The flags a tap must have for this device.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
/// IFF_TUN and IFF_TAP: which kind of device.
const TYPE_MASK: libc::c_int = libc::IFF_TUN | libc::IFF_TAP;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid interface name {0:?} (1 to 15 bytes, no '/', ':', space or NUL)")]
    InvalidName(String),
    #[error("cannot open {TUN_DEVICE}")]
    OpenTun(#[source] io::Error),
    #[error("cannot create or attach tap {name}")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("the file descriptor is not an attached tun/tap device")]
    NotTun(#[source] io::Error),
    #[error("{name} is not a tap with IFF_NO_PI and IFF_VNET_HDR (flags {flags:#x})")]
    WrongFlags { name: String, flags: libc::c_int },
    #[error("cannot configure tap {name} ({what})")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Checks that `fd` is a tap attached with this device's flags; its name.
/// Nothing is changed on the descriptor (the VMM checks an inherited tap
/// this way before it opens anything of its own).
pub fn check_tap_fd(fd: BorrowedFd<'_>) -> Result<String, Error> {
    let mut request = ifreq("", 0)?;
    // SAFETY: TUNGETIFF writes an `ifreq`, which `request` is; on any
    // other kind of descriptor the call fails without writing.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut request) };
    if ret < 0 {
        return Err(Error::NotTun(io::Error::last_os_error()));
    }
    let name = ifreq_name(&request);
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = libc::c_int::from(unsafe { request.ifr_ifru.ifru_flags });
    if flags & TYPE_MASK != libc::IFF_TAP || flags & TAP_FLAGS != TAP_FLAGS {
        return Err(Error::WrongFlags { name, flags });
    }
    Ok(name)
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the tap called `name`, creating it if absent (which needs
    /// CAP_NET_ADMIN). The interface still has to be brought up by
    /// whoever owns the network (frakti's CNI step).
    pub fn open(name: &str) -> Result<Tap, Error> {
        let mut request = ifreq(name, TAP_FLAGS as libc::c_short)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // std adds O_CLOEXEC.
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(Error::OpenTun)?;
        // SAFETY: TUNSETIFF reads and writes back an `ifreq`, which
        // `request` is, and the call borrows it only for its duration.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if ret < 0 {
            return Err(Error::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel returns the final name (a "%d" in it is expanded).
        let tap = Tap {
            file,
            name: ifreq_name(&request),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Adopts an open tap descriptor (e.g. inherited from frakti, which
    /// made the tap inside the pod's network namespace). It must be a tap
    /// attached with `IFF_NO_PI | IFF_VNET_HDR`; it is made non-blocking.
    ///
    /// `IFF_NO_PI` can only be partly checked: TUNGETIFF reports
    /// `IFF_NOFILTER` in the same bit (0x1000) when no socket filter is
    /// attached, so a tap with packet information but no filter passes.
    /// Whoever creates the tap must set `IFF_NO_PI`.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, Error> {
        let name = check_tap_fd(fd.as_fd())?;
        let file = File::from(fd);
        let tap = Tap { file, name };
        tap.set_nonblocking()?;
        tap.configure()?;
        Ok(tap)
    }

    /// The interface's name, e.g. `tap0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Our header size, and no offloads until the guest negotiates them
    /// ([`Backend::set_offloads`]): the tap then hands us only complete,
    /// checksummed frames of at most the MTU.
    fn configure(&self) -> Result<(), Error> {
        let fd = self.file.as_raw_fd();
        let size = HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `size`.
        let ret = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(self.configure_error("TUNSETVNETHDRSZ"));
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // involved.
        let ret = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if ret < 0 {
            return Err(self.configure_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    fn set_nonblocking(&self) -> Result<(), Error> {
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL takes no argument and touches no memory.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: F_SETFL takes the flags by value.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(self.configure_error("O_NONBLOCK"));
        }
        Ok(())
    }

    fn configure_error(&self, what: &'static str) -> Error {
        Error::Configure {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Backend for Tap {
    /// A tap returns the whole frame's length even when it truncated it
    /// to the buffers (`tun_put_user`), which is how truncation shows.
    fn read_frame(&mut self, buffers: &mut GuestBuffers<'_>) -> io::Result<usize> {
        backend::readv(self.file.as_raw_fd(), buffers)
    }

    fn write_frame(&mut self, buffers: &GuestBuffers<'_>) -> io::Result<usize> {
        backend::writev(self.file.as_raw_fd(), buffers)
    }

    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // involved.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// An `ifreq` naming `name` with `flags`; checks the name.
pub(super) fn ifreq(name: &str, flags: libc::c_short) -> Result<libc::ifreq, Error> {
    let mut ifr_name = [0 as libc::c_char; libc::IFNAMSIZ];
    let valid = name.len() < libc::IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace());
    if !valid || (name.is_empty() && flags != 0) {
        return Err(Error::InvalidName(name.to_string()));
    }
    for (dst, src) in ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(libc::ifreq {
        ifr_name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: flags },
    })
}

pub(super) fn ifreq_name(request: &libc::ifreq) -> String {
    let bytes: Vec<u8> = request.ifr_name.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "0123456789abcdef", "a/b", "a b", "a:1", "a\0b"] {
            assert!(
                matches!(Tap::open(bad), Err(Error::InvalidName(_))),
                "{bad:?}"
            );
        }
        let request = ifreq("tap%d", 7).unwrap();
        assert_eq!(ifreq_name(&request), "tap%d");
        assert!(ifreq("0123456789abcde", 1).is_ok());
    }

    #[test]
    fn descriptors_that_are_not_taps_are_refused() {
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(file)),
            Err(Error::NotTun(_))
        ));
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(a)),
            Err(Error::NotTun(_))
        ));
    }
}
