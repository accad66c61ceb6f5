//! The user's terminal for `-t`: raw mode (restored when the guard goes,
//! whatever the way out) and its size.

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::termios::{self, SetArg, Termios};

/// Raw mode on stdin while alive; the previous mode comes back on drop.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts stdin's terminal into raw mode (no echo, no line editing, no
    /// signals from keys: Ctrl-C goes to the container as a byte).
    pub fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let saved = termios::tcgetattr(fd)
            .map_err(|e| anyhow::anyhow!("reading the terminal's mode: {e}"))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw)
            .map_err(|e| anyhow::anyhow!("setting the terminal to raw mode: {e}"))?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Whether stdin is a terminal (what `-t` needs).
pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// The size (columns, rows) of the terminal on stdout, else stdin.
pub fn size() -> Option<(u16, u16)> {
    let stdout = std::io::stdout();
    let stdin = std::io::stdin();
    size_of(stdout.as_fd()).or_else(|| size_of(stdin.as_fd()))
}

fn size_of(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, which
    // lives across the call; `fd` is a valid open descriptor.
    let ok = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::TIOCGWINSZ,
            &mut size,
        )
    };
    (ok == 0 && size.ws_col > 0 && size.ws_row > 0).then_some((size.ws_col, size.ws_row))
}
