//! `frakti-guest-tool`: the guest's side of Frakti's traffic tests and
//! benchmarks, built static so it runs in any test initrd.
//!
//! ```text
//! frakti-guest-tool vsock-echo-server PORT CONNECTIONS
//!     echo each of CONNECTIONS vsock streams back, then exit
//! frakti-guest-tool vsock-echo-client CID PORT STREAMS BYTES
//!     STREAMS concurrent streams each send BYTES of pattern and check the echo
//! frakti-guest-tool vsock-sink PORT CONNECTIONS
//!     per stream: read to EOF, answer "<bytes>\n"
//! frakti-guest-tool tcp-send ADDR:PORT STREAM BYTES
//!     send BYTES of stream STREAM's pattern over TCP, then read the peer's answer
//! frakti-guest-tool tree ROOT
//!     one JSON line per path under ROOT: kind, mode, owner, link, hash, xattrs…
//! frakti-guest-tool blockio FILE seq-write|seq-read|rand-write|rand-read BLOCK_SIZE BYTES [DEPTH]
//!     O_DIRECT I/O on FILE (or a block device), DEPTH random ops in flight (threads),
//!     timed inside: {"mode","block_size","bytes","ops","secs"}
//! ```
//! Every command prints one result line and exits non-zero on failure.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::thread;

use frakti_guest_tool::{join, send_and_check, send_pattern};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept, bind, connect, listen,
    setsockopt, socket, sockopt,
};

const VMADDR_CID_ANY: u32 = u32::MAX;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["vsock-echo-server", port, connections] => {
            vsock_echo_server(parse(port), parse(connections))
        }
        ["vsock-echo-client", cid, port, streams, bytes] => {
            vsock_echo_client(parse(cid), parse(port), parse(streams), parse(bytes))
        }
        ["vsock-sink", port, connections] => vsock_sink(parse(port), parse(connections)),
        ["tcp-send", addr, stream, bytes] => tcp_send(addr, parse(stream), parse(bytes)),
        ["tree", root] => frakti_guest_tool::tree::print_tree(
            std::path::Path::new(root),
            &mut io::BufWriter::new(io::stdout().lock()),
        ),
        ["blockio", file, mode, block_size, bytes, depth @ ..] if depth.len() <= 1 => {
            frakti_guest_tool::blockio::Mode::parse(mode).and_then(|mode| {
                let report = frakti_guest_tool::blockio::run_at_depth(
                    std::path::Path::new(file),
                    mode,
                    parse(block_size),
                    parse(bytes),
                    depth.first().map_or(1, |d| parse(d)),
                )?;
                println!("{}", report.json());
                Ok(())
            })
        }
        _ => Err(io::Error::other(
            "usage: frakti-guest-tool vsock-echo-server PORT CONNECTIONS | \
             vsock-echo-client CID PORT STREAMS BYTES | vsock-sink PORT CONNECTIONS | \
             tcp-send ADDR:PORT STREAM BYTES | tree ROOT | \
             blockio FILE seq-write|seq-read|rand-write|rand-read BLOCK_SIZE BYTES [DEPTH]",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("frakti-guest-tool: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr + Default>(text: &str) -> T {
    text.parse().unwrap_or_else(|_| {
        println!("frakti-guest-tool: {text:?} is not a number");
        std::process::exit(2)
    })
}

/// A vsock stream as a `UnixStream`: both are plain stream sockets to std.
fn vsock_stream(fd: OwnedFd) -> UnixStream {
    UnixStream::from(fd)
}

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(fd)
}

/// Accepts a stream whose close waits (up to 30 s) until the host end
/// has taken every byte: the test guest resets the VM right after, and
/// data still queued in the guest kernel would be lost.
fn vsock_accept(listener: &OwnedFd) -> io::Result<UnixStream> {
    let fd = accept(listener.as_raw_fd())?;
    // SAFETY: accept just returned this descriptor; we are its only owner.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 30,
    };
    setsockopt(&fd, sockopt::Linger, &linger)?;
    Ok(vsock_stream(fd))
}

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` of linux/vm_sockets.h (on 64-bit, a
/// `struct timeval`, at level `AF_VSOCK`); the libc crate lacks it.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// The guest kernel gives up a vsock connect after 2 s by default; a host
/// side busy with dozens of connections at once (the lab, under TCG) may
/// answer later than that without anything being wrong.
const CONNECT_TIMEOUT: libc::timeval = libc::timeval {
    tv_sec: 60,
    tv_usec: 0,
};

fn vsock_connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let timeout = CONNECT_TIMEOUT;
    // SAFETY: `fd` is an open socket; setsockopt reads exactly
    // size_of::<timeval>() bytes from a valid timeval that outlives the call.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
    Ok(vsock_stream(fd))
}

fn vsock_echo_server(port: u32, connections: usize) -> io::Result<()> {
    let listener = vsock_listen(port)?;
    println!("@@ vsock echo server listening on {port}");
    let mut workers = Vec::new();
    for _ in 0..connections {
        let mut stream = vsock_accept(&listener)?;
        workers.push(thread::spawn(move || -> io::Result<u64> {
            let mut reader = stream.try_clone()?;
            let n = io::copy(&mut reader, &mut stream)?;
            stream.shutdown(Shutdown::Write)?;
            Ok(n)
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += join(worker)?;
    }
    println!("vsock-echo-server ok connections={connections} bytes={total}");
    Ok(())
}

fn vsock_echo_client(cid: u32, port: u32, streams: u64, bytes: u64) -> io::Result<()> {
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|seed| {
            thread::spawn(move || -> io::Result<()> {
                let stream = vsock_connect(cid, port)?;
                send_and_check(stream, seed, bytes)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for worker in workers {
        if let Err(e) = join(worker) {
            failures.push(e.to_string());
        }
    }
    if !failures.is_empty() {
        return Err(io::Error::other(failures.join("; ")));
    }
    println!(
        "vsock-echo-client ok streams={streams} bytes={} seconds={:.2}",
        streams * bytes,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn vsock_sink(port: u32, connections: usize) -> io::Result<()> {
    let listener = vsock_listen(port)?;
    println!("@@ vsock sink listening on {port}");
    let mut buf = vec![0u8; 256 * 1024];
    for _ in 0..connections {
        let mut stream = vsock_accept(&listener)?;
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        stream.write_all(format!("{total}\n").as_bytes())?;
        stream.shutdown(Shutdown::Write)?;
        println!("vsock-sink received={total}");
    }
    Ok(())
}

fn tcp_send(addr: &str, seed: u64, bytes: u64) -> io::Result<()> {
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    send_pattern(&mut stream, seed, bytes)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    println!(
        "tcp-send ok bytes={bytes} seconds={:.2} peer says: {}",
        started.elapsed().as_secs_f64(),
        answer.trim()
    );
    Ok(())
}
