//! A process's stdio as the agent holds it: pipes, or the master side of a
//! PTY, read and written asynchronously.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::pty::{OpenptyResult, Winsize, openpty};
use tokio::io::unix::AsyncFd;
use tokio::sync::Mutex;

use crate::output::CHUNK;
pub use crate::output::Output;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a pipe")]
    Pipe(#[source] nix::Error),
    #[error("cannot open a pseudo-terminal")]
    Pty(#[source] nix::Error),
    #[error("cannot make a descriptor non-blocking")]
    NonBlocking(#[source] io::Error),
    #[error("cannot duplicate a descriptor")]
    Dup(#[source] io::Error),
    #[error("cannot set the terminal size")]
    Resize(#[source] nix::Error),
}

/// A non-blocking descriptor driven by tokio: a pipe end or a PTY master.
pub struct FdIo(AsyncFd<OwnedFd>);

impl FdIo {
    pub fn new(fd: OwnedFd) -> Result<Self, Error> {
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(|e| Error::NonBlocking(e.into()))?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(|e| Error::NonBlocking(e.into()))?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it
        // open (and its number unchanged) for as long as it exists.
        unsafe { AsyncFd::register(fd) }
            .map(Self)
            .map_err(|e| Error::NonBlocking(e.into_parts().1))
    }

    /// Reads what is there; 0 at end of file. A PTY master reports the
    /// slave's last close as EIO, which is end of file too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn fd(&self) -> &OwnedFd {
        self.0.get_ref()
    }
}

/// The agent's side of a process's stdio.
pub struct Stdio {
    /// Where WriteStdin goes: the pipe's write end or the PTY master.
    /// `None` once closed.
    pub stdin: Mutex<Option<Arc<FdIo>>>,
    pub stdout: Output,
    /// Always empty for a terminal (its output all comes on stdout).
    pub stderr: Output,
    /// The PTY master, for resizing, when the process has a terminal.
    pub tty: Option<Arc<FdIo>>,
}

/// The child's ends, to become its descriptors 0, 1 and 2.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Error::Pipe)
}

/// Pipes for stdin, stdout and stderr.
pub fn pipes() -> Result<(Stdio, ChildStdio), Error> {
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let stdio = Stdio {
        stdin: Mutex::new(Some(Arc::new(FdIo::new(stdin_w)?))),
        stdout: Output::spawn(FdIo::new(stdout_r)?, CHUNK),
        stderr: Output::spawn(FdIo::new(stderr_r)?, CHUNK),
        tty: None,
    };
    let child = ChildStdio {
        stdin: stdin_r,
        stdout: stdout_w,
        stderr: stderr_w,
    };
    Ok((stdio, child))
}

/// A PTY of the given size (0 x 0: the kernel default); the slave becomes
/// the child's stdin, stdout and stderr.
pub fn pty(rows: u16, cols: u16) -> Result<(Stdio, ChildStdio), Error> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let OpenptyResult { master, slave } = openpty(Some(&size), None).map_err(Error::Pty)?;
    for fd in [&master, &slave] {
        let flags = fcntl(fd, FcntlArg::F_GETFD).map_err(Error::Pty)?;
        let flags = nix::fcntl::FdFlag::from_bits_retain(flags) | nix::fcntl::FdFlag::FD_CLOEXEC;
        fcntl(fd, FcntlArg::F_SETFD(flags)).map_err(Error::Pty)?;
    }
    let master = Arc::new(FdIo::new(master)?);
    let child = ChildStdio {
        stdin: slave.try_clone().map_err(Error::Dup)?,
        stdout: slave.try_clone().map_err(Error::Dup)?,
        stderr: slave,
    };
    // stdout is read through its own handle on the same master.
    let stdout = FdIo::new(master.fd().try_clone().map_err(Error::Dup)?);
    let stdio = Stdio {
        stdin: Mutex::new(Some(master.clone())),
        stdout: Output::spawn(stdout?, CHUNK),
        stderr: Output::ended(),
        tty: Some(master),
    };
    Ok((stdio, child))
}

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, Winsize);

/// Sets a PTY's window size (the kernel sends SIGWINCH to its foreground
/// process group).
pub fn resize(master: &FdIo, rows: u16, cols: u16) -> Result<(), Error> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one Winsize from a valid pointer.
    unsafe { set_winsize(master.fd().as_fd().as_raw_fd(), &size) }
        .map(drop)
        .map_err(Error::Resize)
}

/// The byte that ends input on a terminal in canonical mode (VEOF, ^D).
pub const TTY_EOF: u8 = 0x04;
