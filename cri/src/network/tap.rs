//! The tap a pod VM's NIC uses, joined to the CNI interface of the pod's
//! network namespace the way Kata Containers' "tcfilter" mode does: an
//! ingress qdisc on both devices, and on each a match-all u32 filter whose
//! `mirred egress redirect` action sends every frame out of the other one.
//! The VMM inherits the tap's descriptor; the guest NIC takes the CNI
//! interface's MAC and MTU, so the host side's neighbours stay valid.
//!
//! Everything here is blocking: async callers use `spawn_blocking`.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle};
use rtnetlink::{Handle, LinkUnspec};

use super::netns;

const TUN_DEVICE: &str = "/dev/net/tun";
/// What the VMM requires of an inherited tap (vmm/src/devices/virtio/net/tap.rs).
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
/// ETH_P_ALL. tc takes the protocol in network byte order, and rtnetlink
/// passes it through unconverted.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// ffff:0, the ingress qdisc's handle, which its filters name as parent.
const INGRESS_HANDLE: u32 = 0xffff_0000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("invalid interface name {0:?} (1 to 15 bytes, no '/', ':', whitespace or NUL)")]
    InvalidName(String),
    #[error("cannot open a netlink connection in the network namespace {netns}")]
    Connect {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no interface {name} in the network namespace {netns}")]
    NotFound { name: String, netns: PathBuf },
    #[error("cannot look up the interface {name} in the network namespace {netns}")]
    Lookup {
        name: String,
        netns: PathBuf,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("the interface {name} in the network namespace {netns} has no {what}")]
    Incomplete {
        name: String,
        netns: PathBuf,
        what: &'static str,
    },
    #[error("cannot open {TUN_DEVICE}")]
    OpenTun(#[source] io::Error),
    #[error("cannot create the tap {name} in the network namespace {netns}")]
    CreateTap {
        name: String,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A netlink request failed; `action` says which, on which device.
    #[error("cannot {action} in the network namespace {netns}")]
    Netlink {
        action: String,
        netns: PathBuf,
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

/// A tap joined to the CNI interface, for the VMM. Not persistent: the
/// device disappears when the last copy of `fd` is closed.
#[derive(Debug)]
pub struct Tap {
    pub fd: OwnedFd,
    /// The tap's name in the pod's network namespace.
    pub name: String,
    /// The CNI interface's MAC, for the guest NIC.
    pub mac: [u8; 6],
    /// The CNI interface's MTU, which the tap also has.
    pub mtu: u32,
}

/// Creates the tap `tap_name` in the network namespace at `netns` and joins
/// it to `cni_ifname` there. On failure nothing is left behind: the tap
/// goes with its descriptor, and the CNI interface's ingress qdisc (with
/// its filter) is removed. The interface must not have an ingress qdisc.
pub fn attach_tap(netns: &Path, cni_ifname: &str, tap_name: &str) -> Result<Tap, Error> {
    check_name(cni_ifname)?;
    check_name(tap_name)?;
    let path = netns.to_path_buf();
    let (cni_ifname, tap_name) = (cni_ifname.to_string(), tap_name.to_string());
    netns::run_in(netns, move || {
        with_netlink(&path, |handle| {
            attach_here(handle, &path, &cni_ifname, &tap_name)
        })
    })
}

async fn attach_here(
    handle: Handle,
    netns: &Path,
    cni_ifname: &str,
    tap_name: &str,
) -> Result<Tap, Error> {
    let nl = Netlink { handle, netns };
    let (cni, message) = nl
        .find_link(cni_ifname)
        .await?
        .ok_or_else(|| nl.not_found(cni_ifname))?;
    let (mac, mtu) = nl.mac_and_mtu(&message, cni_ifname)?;
    let (fd, tap_name) = create_tap(nl.netns, tap_name)?;
    // While `fd` is open the tap exists (under the kernel's final name).
    let (tap, _) = nl
        .find_link(&tap_name)
        .await?
        .ok_or_else(|| nl.not_found(&tap_name))?;
    let up = LinkUnspec::new_with_index(tap.index).mtu(mtu).up().build();
    let action = format!("set the MTU of {tap_name} to {mtu} and bring it up");
    nl.handle
        .link()
        .set(up)
        .execute()
        .await
        .map_err(nl.failed(action))?;
    join(&nl, &cni, &tap).await?;
    Ok(Tap {
        fd,
        name: tap_name,
        mac,
        mtu,
    })
}

/// Redirects each device's ingress to the other's egress. The tap's qdisc
/// goes with the tap; the CNI interface's is removed here on failure (but
/// one that was there before is not ours and stays).
async fn join(nl: &Netlink<'_>, cni: &Link, tap: &Link) -> Result<(), Error> {
    nl.add_ingress(tap).await?;
    nl.add_ingress(cni).await?;
    let mut joined = nl.redirect(cni, tap).await;
    if joined.is_ok() {
        joined = nl.redirect(tap, cni).await;
    }
    if joined.is_err() {
        if let Err(e) = nl.del_ingress(cni).await {
            tracing::warn!("undoing a failed tap setup: {}", crate::error_chain(&e));
        }
    }
    joined
}

/// Removes what [`attach_tap`] added to `cni_ifname`. A missing namespace,
/// interface or qdisc is fine: there is nothing left to undo.
pub fn detach(netns: &Path, cni_ifname: &str) -> Result<(), Error> {
    check_name(cni_ifname)?;
    let (path, cni_ifname) = (netns.to_path_buf(), cni_ifname.to_string());
    let detached = netns::run_in(netns, move || {
        with_netlink(&path, |handle| detach_here(handle, &path, &cni_ifname))
    });
    match detached {
        Err(Error::Netns(netns::Error::Open { source, .. }))
            if source.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other,
    }
}

async fn detach_here(handle: Handle, netns: &Path, cni_ifname: &str) -> Result<(), Error> {
    let nl = Netlink { handle, netns };
    match nl.find_link(cni_ifname).await? {
        Some((cni, _)) => nl.del_ingress(&cni).await,
        None => Ok(()),
    }
}

/// Runs `work` against a netlink socket of the calling thread's network
/// namespace (where a socket is created decides which one it talks to).
pub(crate) fn with_netlink<T, F>(netns: &Path, work: impl FnOnce(Handle) -> F) -> Result<T, Error>
where
    F: Future<Output = Result<T, Error>>,
{
    let connect_error = |source| Error::Connect {
        netns: netns.to_path_buf(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(connect_error)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(connect_error)?;
        tokio::spawn(connection);
        work(handle).await
    })
}

/// An interface of the namespace.
pub(crate) struct Link {
    pub(crate) name: String,
    /// As links and mirred take it.
    pub(crate) index: u32,
    /// As tc messages take it.
    pub(crate) tc_index: i32,
}

/// The interface called `name`, with its attributes; `None` if absent.
pub(crate) async fn find_link(
    handle: &Handle,
    netns: &Path,
    name: &str,
) -> Result<Option<(Link, LinkMessage)>, Error> {
    let mut links = handle.link().get().match_name(name).execute();
    let message = match links.try_next().await {
        Ok(Some(message)) => message,
        Err(e) if errno(&e) == Some(libc::ENODEV) => return Ok(None),
        Ok(None) => return Ok(None),
        Err(e) => {
            let (name, netns, source) = (name.to_string(), netns.to_path_buf(), Box::new(e));
            return Err(Error::Lookup {
                name,
                netns,
                source,
            });
        }
    };
    let index = message.header.index;
    let Ok(tc_index) = i32::try_from(index) else {
        let (name, netns) = (name.to_string(), netns.to_path_buf());
        let what = "valid index";
        return Err(Error::Incomplete { name, netns, what });
    };
    let name = name.to_string();
    let link = Link {
        name,
        index,
        tc_index,
    };
    Ok(Some((link, message)))
}

/// A netlink connection in the namespace at `netns`.
struct Netlink<'a> {
    handle: Handle,
    netns: &'a Path,
}

impl Netlink<'_> {
    async fn find_link(&self, name: &str) -> Result<Option<(Link, LinkMessage)>, Error> {
        find_link(&self.handle, self.netns, name).await
    }

    fn mac_and_mtu(&self, message: &LinkMessage, name: &str) -> Result<([u8; 6], u32), Error> {
        let (mut mac, mut mtu) = (None, None);
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(value) => mtu = Some(*value),
                _ => {}
            }
        }
        let mac = mac.ok_or_else(|| self.incomplete(name, "Ethernet address"))?;
        Ok((mac, mtu.ok_or_else(|| self.incomplete(name, "MTU"))?))
    }

    async fn add_ingress(&self, link: &Link) -> Result<(), Error> {
        let request = self.handle.qdisc().add(link.tc_index).ingress();
        let action = format!("add an ingress qdisc to {}", link.name);
        request.execute().await.map_err(self.failed(action))
    }

    /// `tc filter add dev FROM parent ffff: protocol all u32 match u32 0 0
    /// action mirred egress redirect dev TO`.
    async fn redirect(&self, from: &Link, to: &Link) -> Result<(), Error> {
        let action = format!("redirect the traffic of {} to {}", from.name, to.name);
        let request = (self.handle.traffic_filter(from.tc_index).add())
            .parent(INGRESS_HANDLE)
            .protocol(PROTOCOL_ALL)
            .redirect(to.index)
            .map_err(self.failed(action.clone()))?;
        request.execute().await.map_err(self.failed(action))
    }

    /// `tc qdisc del dev NAME ingress`; its filters go with it. No qdisc
    /// there (ENOENT), or one of another kind, e.g. clsact (EINVAL), is
    /// fine: neither is ours.
    async fn del_ingress(&self, link: &Link) -> Result<(), Error> {
        let mut request = self.handle.qdisc().del(link.tc_index);
        let message = request.message_mut();
        message.header.parent = TcHandle::INGRESS;
        message.header.handle = TcHandle::from(INGRESS_HANDLE);
        // Only an ingress qdisc: a clsact sits at the same place.
        let kind = TcAttribute::Kind("ingress".to_string());
        message.attributes.push(kind);
        match request.execute().await {
            Err(e) if !matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL)) => {
                let action = format!("remove the ingress qdisc of {}", link.name);
                Err(self.failed(action)(e))
            }
            _ => Ok(()),
        }
    }

    fn failed(&self, action: String) -> impl FnOnce(rtnetlink::Error) -> Error {
        let netns = self.netns.to_path_buf();
        move |source| Error::Netlink {
            action,
            netns,
            source: Box::new(source),
        }
    }

    fn not_found(&self, name: &str) -> Error {
        let (name, netns) = (name.to_string(), self.netns.to_path_buf());
        Error::NotFound { name, netns }
    }

    fn incomplete(&self, name: &str, what: &'static str) -> Error {
        let (name, netns) = (name.to_string(), self.netns.to_path_buf());
        Error::Incomplete { name, netns, what }
    }
}

/// The positive errno of a netlink error reply.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.raw_code().checked_neg(),
        _ => None,
    }
}

/// Creates the tap in the calling thread's network namespace; returns its
/// descriptor and the name the kernel gave it (it expands a "%d").
fn create_tap(netns: &Path, name: &str) -> Result<(OwnedFd, String), Error> {
    let mut request = ifreq(name, TAP_FLAGS)?;
    // std opens with O_CLOEXEC: only the VMM, handed the fd, inherits it.
    let file = (OpenOptions::new().read(true).write(true))
        .open(TUN_DEVICE)
        .map_err(Error::OpenTun)?;
    // SAFETY: TUNSETIFF reads and writes back a `struct ifreq`, which
    // `request` is; the kernel keeps no pointer to it after the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if ret < 0 {
        let (name, netns) = (name.to_string(), netns.to_path_buf());
        let source = io::Error::last_os_error();
        return Err(Error::CreateTap {
            name,
            netns,
            source,
        });
    }
    Ok((OwnedFd::from(file), ifreq_name(&request)))
}

/// Checks an interface name as the kernel would.
fn check_name(name: &str) -> Result<(), Error> {
    let bad_byte = |b: u8| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(bad_byte) {
        return Err(Error::InvalidName(name.to_string()));
    }
    Ok(())
}

/// An `ifreq` for the interface `name` (checked) with `flags`.
fn ifreq(name: &str, flags: libc::c_int) -> Result<libc::ifreq, Error> {
    check_name(name)?;
    // Zeroed, and check_name left room for the NUL.
    let mut ifr_name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // The IFF_ flags all fit a short (the field's type).
    let ifru_flags = flags as libc::c_short;
    let ifr_ifru = libc::__c_anonymous_ifr_ifru { ifru_flags };
    Ok(libc::ifreq { ifr_name, ifr_ifru })
}

fn ifreq_name(request: &libc::ifreq) -> String {
    let bytes: Vec<u8> = request.ifr_name.iter().map(|&c| c as u8).collect();
    let name = CStr::from_bytes_until_nul(&bytes).map(CStr::to_bytes);
    String::from_utf8_lossy(name.unwrap_or(&bytes)).into_owned()
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::process::Command;

    use nix::sys::socket::{setsockopt, sockopt};
    use nix::sys::time::TimeVal;
    use rtnetlink::LinkVeth;
    use rtnetlink::packet_route::link::LinkFlags;

    use super::*;

    const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x07];
    /// IEEE's local experimental EtherType: no other traffic has it.
    const ETHERTYPE: u16 = 0x88b5;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "tap tests need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
        );
    }

    /// Removes the namespace even when a test fails half-way.
    struct Cleanup(PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = netns::remove(&self.0);
        }
    }

    /// A namespace holding eth0 (MTU 1400, MAC) and its veth peer `peer`.
    fn namespace_with_veth(dir: &Path) -> Cleanup {
        let ns = dir.join("ns");
        netns::create(&ns).unwrap();
        let cleanup = Cleanup(ns.clone());
        let path = ns.clone();
        netns::run_in(&ns, move || {
            with_netlink(&path, |handle| async move {
                let veth = LinkVeth::new("eth0", "peer").up().build();
                handle.link().add(veth).execute().await.unwrap();
                let eth0 = LinkUnspec::new_with_name("eth0").address(MAC.to_vec());
                let eth0 = eth0.mtu(1400).build();
                handle.link().set(eth0).execute().await.unwrap();
                let peer = LinkUnspec::new_with_name("peer").up().build();
                handle.link().set(peer).execute().await.unwrap();
                Ok(())
            })
        })
        .unwrap();
        cleanup
    }

    fn link(ns: &Path, name: &str) -> Option<(Link, LinkMessage)> {
        let (path, name) = (ns.to_path_buf(), name.to_string());
        netns::run_in(ns, move || {
            let (path, name) = (&path, &name);
            with_netlink(path, |handle| async move {
                find_link(&handle, path, name).await
            })
        })
        .unwrap()
    }

    /// `tc ARGS` run in the namespace.
    fn tc(ns: &Path, args: &[&str]) -> String {
        let output = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .arg("tc")
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "tc {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    fn tap_flags(fd: &OwnedFd) -> (String, libc::c_int) {
        let mut request = ifreq("x", 0).unwrap();
        // SAFETY: TUNGETIFF writes a `struct ifreq`, which `request` is.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut request) };
        assert_eq!(ret, 0, "TUNGETIFF: {}", io::Error::last_os_error());
        // SAFETY: TUNGETIFF filled in the flags member.
        let flags = libc::c_int::from(unsafe { request.ifr_ifru.ifru_flags });
        (ifreq_name(&request), flags)
    }

    /// A packet socket on the interface with index `index` in `ns` that
    /// receives frames of [`ETHERTYPE`] only.
    fn listen(ns: &Path, index: u32) -> File {
        netns::run_in(ns, move || {
            let protocol = ETHERTYPE.to_be();
            let kind = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
            // SAFETY: socket(2) takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_PACKET, kind, protocol.into()) };
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            let file = unsafe { File::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = i32::try_from(index).unwrap();
            let len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: bind(2) reads `len` bytes at the pointer: `addr`.
            let ret = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
            assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
            let timeout = TimeVal::from(libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            });
            setsockopt(&file, sockopt::ReceiveTimeout, &timeout).unwrap();
            Ok::<_, netns::Error>(file)
        })
        .unwrap()
    }

    #[test]
    fn attach_joins_the_tap_to_the_cni_interface() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let cleanup = namespace_with_veth(dir.path());
        let ns = cleanup.0.clone();

        let tap = attach_tap(&ns, "eth0", "tap0").unwrap();
        assert_eq!((tap.name.as_str(), tap.mac, tap.mtu), ("tap0", MAC, 1400));
        let (name, flags) = tap_flags(&tap.fd);
        assert_eq!(name, "tap0");
        assert_eq!(flags & (libc::IFF_TUN | libc::IFF_TAP), libc::IFF_TAP);
        assert_eq!(flags & TAP_FLAGS, TAP_FLAGS, "flags {flags:#x}");

        let (_, message) = link(&ns, "tap0").expect("no tap0 in the namespace");
        assert!(message.header.flags.contains(LinkFlags::Up));
        assert!(message.attributes.contains(&LinkAttribute::Mtu(1400)));

        for (dev, other) in [("eth0", "tap0"), ("tap0", "eth0")] {
            let qdiscs = tc(&ns, &["qdisc", "show", "dev", dev, "ingress"]);
            assert_eq!(qdiscs.matches("qdisc ingress ffff:").count(), 1, "{qdiscs}");
            let filters = tc(&ns, &["filter", "show", "dev", dev, "ingress"]);
            assert!(filters.contains("protocol all"), "{filters}");
            assert!(
                filters.contains("match 00000000/00000000 at 0"),
                "{filters}"
            );
            let action = format!("mirred (Egress Redirect to device {other}) stolen");
            assert_eq!(filters.matches(&action).count(), 1, "{filters}");
            assert_eq!(filters.matches("action order").count(), 1, "{filters}");
        }

        // A frame from the guest comes out of eth0, to its peer.
        let (peer, _) = link(&ns, "peer").unwrap();
        let mut socket = listen(&ns, peer.index);
        let mut frame = vec![0; 10]; // An empty virtio_net_hdr.
        frame.extend([0xff; 6]);
        frame.extend(MAC);
        frame.extend(ETHERTYPE.to_be_bytes());
        frame.extend(b"frakti");
        let mut tap_file = File::from(tap.fd);
        tap_file.write_all(&frame).unwrap();
        let mut received = [0; 64];
        let len = socket.read(&mut received).unwrap();
        assert_eq!(&received[..len], &frame[10..]);

        detach(&ns, "eth0").unwrap();
        detach(&ns, "eth0").unwrap();
        assert_eq!(tc(&ns, &["qdisc", "show", "dev", "eth0", "ingress"]), "");
        assert_eq!(tc(&ns, &["filter", "show", "dev", "eth0", "ingress"]), "");
        drop(tap_file);
        assert!(link(&ns, "tap0").is_none(), "tap0 outlived its descriptor");
        netns::remove(&ns).unwrap();
        // No namespace: nothing to detach.
        detach(&ns, "eth0").unwrap();
    }

    #[test]
    fn attach_without_the_interface_fails_and_leaves_nothing() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("ns");
        netns::create(&ns).unwrap();
        let _cleanup = Cleanup(ns.clone());

        let err = attach_tap(&ns, "eth0", "tap0").unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("eth0") && message.contains(ns.to_str().unwrap()));
        assert!(link(&ns, "tap0").is_none());
        detach(&ns, "eth0").unwrap();
        netns::remove(&ns).unwrap();
    }

    #[test]
    fn qdiscs_of_others_are_reported_and_left_alone() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let cleanup = namespace_with_veth(dir.path());
        let ns = cleanup.0.clone();
        let show = || tc(&ns, &["qdisc", "show", "dev", "eth0", "ingress"]);
        for kind in ["ingress", "clsact"] {
            tc(&ns, &["qdisc", "add", "dev", "eth0", kind]);
            let err = attach_tap(&ns, "eth0", "tap0").unwrap_err();
            let message = crate::error_chain(&err);
            assert!(
                message.contains("add an ingress qdisc to eth0"),
                "{message}"
            );
            assert!(link(&ns, "tap0").is_none());
            let qdiscs = show();
            assert_eq!(
                qdiscs.matches(&format!("qdisc {kind} ffff:")).count(),
                1,
                "{qdiscs}"
            );
            tc(&ns, &["qdisc", "del", "dev", "eth0", kind]);
        }
        // Not an ingress qdisc, so not one of ours.
        tc(&ns, &["qdisc", "add", "dev", "eth0", "clsact"]);
        detach(&ns, "eth0").unwrap();
        assert!(show().contains("qdisc clsact ffff:"));
        netns::remove(&ns).unwrap();
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "0123456789abcdef", "a/b", "a b", "a:1", "a\0b"] {
            let err = attach_tap(Path::new("/nonexistent"), "eth0", bad).unwrap_err();
            assert!(matches!(err, Error::InvalidName(_)), "{bad:?}: {err:?}");
        }
        assert!(check_name("0123456789abcde").is_ok());
        assert_eq!(ifreq_name(&ifreq("tap%d", 0).unwrap()), "tap%d");
    }
}
