//! Host ends of a VM's vsock: frakti-vmm's hybrid unix socket, the
//! kernel's AF_VSOCK (for QEMU's vhost-vsock baseline), and (re-exported
//! from the daemon) a gRPC client of the guest's agent over the hybrid
//! socket.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};

/// Opens a stream to guest `port` through the hybrid socket.
pub fn hybrid_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::other(format!(
                "closed before OK (got {:?})",
                String::from_utf8_lossy(&line)
            )));
        }
        line.push(byte[0]);
    }
    check_ok_line(&line)?;
    stream.set_read_timeout(None)?;
    Ok(stream)
}

fn check_ok_line(line: &[u8]) -> io::Result<()> {
    if line.starts_with(b"OK ") {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "expected OK <port>, got {:?}",
            String::from_utf8_lossy(line)
        )))
    }
}

/// The agent's async client through the hybrid socket, and the wait for a
/// booting VM's agent: the daemon's own (`frakti_cri::sandbox::agent`).
pub use frakti_cri::sandbox::agent::{AgentClient, wait_for_agent};

/// Opens a stream to `port` of the VM with `cid` through AF_VSOCK (a
/// vhost-vsock device, as QEMU has). The stream is a plain socket; std
/// handles it as a `UnixStream`.
pub fn kernel_connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
    Ok(UnixStream::from(fd))
}
