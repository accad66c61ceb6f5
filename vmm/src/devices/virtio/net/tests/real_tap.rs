//! A real tap, created in a private network namespace of a test thread
//! (it disappears with the thread): frames both ways through the device,
//! seen on the interface by an AF_PACKET socket; and adopting descriptors.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::*;
use crate::devices::virtio::net::tap::{self, ifreq, ifreq_name};

/// Runs `f` on a thread in a fresh network namespace. A host that cannot
/// (no /dev/net/tun, or no right to unshare: run as root) fails the test
/// saying so: a test that did not run must not count as passed.
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        assert!(
            std::path::Path::new("/dev/net/tun").exists(),
            "this test needs /dev/net/tun (modprobe tun)"
        );
        // SAFETY: unshare takes its flags by value and moves only this
        // thread into a new network namespace.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            unshared,
            0,
            "this test needs unshare(CLONE_NEWNET) (run it as root): {}",
            io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("test thread")
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> OwnedFd {
    // SAFETY: plain system call with arguments by value.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `ip link set NAME up`, without IPv6 so the kernel sends nothing of its
/// own on the link.
fn bring_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    let mut request = ifreq(name, 0).unwrap();
    // SAFETY: SIOCGIFFLAGS reads and writes an ifreq, which `request` is.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    assert_eq!(ret, 0, "SIOCGIFFLAGS: {}", io::Error::last_os_error());
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq, which `request` is.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &request) };
    assert_eq!(ret, 0, "SIOCSIFFLAGS: {}", io::Error::last_os_error());
}

/// A non-blocking AF_PACKET socket on interface `name`, all protocols.
fn packet_socket(name: &str) -> OwnedFd {
    let all = (libc::ETH_P_ALL as u16).to_be();
    let sock = socket(
        libc::AF_PACKET,
        libc::SOCK_RAW | libc::SOCK_NONBLOCK,
        libc::c_int::from(all),
    );
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: `cname` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    // SAFETY: sockaddr_ll is plain data for which all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a sockaddr_ll of the length given.
    let ret = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
    sock
}

fn packet_send(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: `frame` is valid for reads of its length.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
}

/// Waits up to 5 s for a frame equal to `want` on the packet socket.
fn packet_expect(sock: &OwnedFd, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if &buf[..n as usize] == want {
            return;
        }
    }
    panic!("the frame never showed up on the interface");
}

/// A /dev/net/tun descriptor attached to `name` with `flags`, blocking.
fn raw_tun(name: &str, flags: libc::c_int) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut request = ifreq(name, flags as libc::c_short).unwrap();
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `request` is.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    assert_eq!(ret, 0, "TUNSETIFF: {}", io::Error::last_os_error());
    assert_eq!(ifreq_name(&request), name);
    file
}

#[test]
fn a_real_tap_carries_frames_both_ways() {
    in_fresh_netns(|| {
        let tap = Tap::open("frakti%d").unwrap();
        let name = tap.name().to_string();
        assert_eq!(name, "frakti0", "the kernel expands %d");
        bring_up(&name);
        let packets = packet_socket(&name);

        let setup = Setup::new();
        let mem = &setup.mem;
        let (mut rxq, mut txq) = setup.queues();
        let mut dev = Device::new(mem, &rxq, &txq, tap);
        assert_eq!(dev.net.lock().unwrap().backend().name(), "frakti0");

        // Guest to interface.
        let eth = frame(0x21, 300);
        send(mem, &mut txq, TX_BUF, &eth);
        dev.kick_tx();
        assert_eq!(txq.used_idx(), 1, "{:?}", dev.counters());
        assert_eq!(dev.counters().tx_frames, 1);
        packet_expect(&packets, &eth);

        // A header the kernel refuses (hdr_len past the frame): that frame
        // is dropped, the next goes.
        let mut bad = TX_HEADER;
        bad[2..4].copy_from_slice(&0x4000u16.to_le_bytes());
        mem.write_slice(&bad, GuestAddress(TX_BUF + 0x1000))
            .unwrap();
        txq.add_chain(&[
            Buffer::readable(TX_BUF + 0x1000, 12),
            Buffer::readable(TX_BUF + HEADER_LEN as u64, 300),
        ]);
        send(mem, &mut txq, TX_BUF + 0x2000, &frame(0x22, 60));
        dev.kick_tx();
        assert_eq!(txq.used_idx(), 3);
        let counters = dev.counters();
        assert_eq!((counters.tx_frames, counters.tx_dropped), (2, 1));
        packet_expect(&packets, &frame(0x22, 60));

        // Interface to guest.
        for n in 0..8 {
            offer(&mut rxq, n);
        }
        dev.kick_rx();
        let eth = frame(0x42, 1514);
        packet_send(&packets, &eth);
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            dev.events.wait(50);
            let found = (0..rxq.used_idx()).find(|&i| {
                let (id, len) = rxq.used_elem(i);
                let at = RX_BUF + u64::from(id) * 0x1000;
                len == RX_LEN && guest_bytes(mem, at + HEADER_LEN as u64, eth.len()) == eth
            });
            if found.is_some() || Instant::now() > deadline {
                break found;
            }
        };
        let (id, _) = rxq.used_elem(found.expect("the frame reached the guest"));
        let at = RX_BUF + u64::from(id) * 0x1000;
        assert_eq!(guest_bytes(mem, at, HEADER_LEN), rx_header());
        assert!(dev.counters().rx_frames >= 1);
        assert!(!dev.interrupt.needs_reset());
    });
}

#[test]
fn only_taps_with_the_right_flags_are_adopted() {
    in_fresh_netns(|| {
        // Not attached to any interface yet.
        let unattached = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        assert!(matches!(
            Tap::from_fd(unattached.into()),
            Err(tap::Error::NotTun(_))
        ));
        // (A tap without IFF_NO_PI cannot be told apart, see `from_fd`.)
        let wrong = [
            ("nohdr0", libc::IFF_TAP | libc::IFF_NO_PI),
            ("tun0", libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR),
        ];
        for (name, flags) in wrong {
            let file = raw_tun(name, flags);
            match Tap::from_fd(file.into()) {
                Err(tap::Error::WrongFlags { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        let good = raw_tun(
            "good0",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        let tap = Tap::from_fd(good.into()).unwrap();
        assert_eq!(tap.name(), "good0");
        // SAFETY: F_GETFL takes no argument.
        let flags = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0, "made non-blocking");
        // Opening an existing tap by name attaches to it.
        drop(tap);
        let again = Tap::open("good0").unwrap();
        assert_eq!(again.name(), "good0");
    });
}

/// The offloads reach a real tap from the device thread, under its
/// seccomp filter (activation runs on a vCPU thread, whose filter has no
/// tap ioctl: the device thread applies them).
#[test]
fn a_real_tap_takes_the_offloads_under_the_device_filter() {
    use seccompiler::SeccompAction;

    use crate::seccomp::{ThreadKind, apply_with};

    in_fresh_netns(|| {
        let tap = Tap::open("frakti%d").unwrap();
        let setup = Setup::new();
        let mem = &setup.mem;
        let (rxq, txq) = setup.queues();
        let mut dev = Device::new(mem, &rxq, &txq, tap);
        assert!(!dev.net.lock().unwrap().guest_offloads());
        apply_with(ThreadKind::Device, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        dev.net.lock().unwrap().reset();
        dev.events.settle();
        dev.net
            .lock()
            .unwrap()
            .activate(
                mem.clone(),
                dev.interrupt.clone(),
                vec![rxq.create_queue(), txq.create_queue()],
                vec![dev.rx_evt.clone(), dev.tx_evt.clone()],
                OFFLOADS,
            )
            .unwrap();
        dev.events.settle();
        assert!(
            dev.net.lock().unwrap().guest_offloads(),
            "TUNSETOFFLOAD failed on the device thread"
        );
    });
}
