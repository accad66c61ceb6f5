//! Child processes that never outlive us, and files read as they grow.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

/// A spawned child that is killed when the guard is dropped (test failure,
/// panic, early return) and, through `PR_SET_PDEATHSIG`, when this process
/// dies without running destructors (SIGKILL, Ctrl-C).
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    pub fn spawn(command: &mut Command) -> io::Result<ChildGuard> {
        // SAFETY: the closure runs between fork and exec and only calls
        // prctl, which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(ChildGuard {
            child: command.spawn()?,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills the child (if still running) and reaps it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // ESRCH (already gone) is fine: wait() below reaps it either way.
        let _ = self.child.kill();
        self.child.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Reads a file that another process appends to, one complete line at a time.
#[derive(Debug)]
pub struct FileTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl FileTail {
    pub fn new(path: &Path) -> FileTail {
        FileTail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Lines completed since the last call, without `\r` and `\n`.
    /// A file that does not exist yet has no lines.
    pub fn new_lines(&mut self) -> io::Result<Vec<String>> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut fresh = Vec::new();
        self.offset += file.read_to_end(&mut fresh)? as u64;
        self.partial.extend_from_slice(&fresh);
        let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(last_newline + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        Ok(String::from_utf8_lossy(&complete)
            .lines()
            .map(|l| l.replace('\r', ""))
            .collect())
    }
}

/// Reads a log file for an error message; a missing file reads as empty.
pub fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

/// What a process killed with SIGSYS was doing: the kernel's seccomp audit
/// lines (`type=1326 ... syscall=N`), for a test's failure message.
pub fn seccomp_kills() -> String {
    let out = std::process::Command::new("dmesg").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("type=1326")).collect();
    if lines.is_empty() {
        "no seccomp audit line in dmesg".into()
    } else {
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    #[test]
    fn tail_returns_complete_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut tail = FileTail::new(&path);
        assert!(tail.new_lines().unwrap().is_empty());
        let mut f = File::create(&path).unwrap();
        f.write_all(b"one\r\ntw").unwrap();
        assert_eq!(tail.new_lines().unwrap(), vec!["one"]);
        f.write_all(b"o\nthree\n").unwrap();
        assert_eq!(tail.new_lines().unwrap(), vec!["two", "three"]);
        assert!(tail.new_lines().unwrap().is_empty());
    }

    #[test]
    fn dropping_the_guard_kills_the_child() {
        let guard = ChildGuard::spawn(Command::new("sleep").arg("600")).unwrap();
        let proc_dir = PathBuf::from(format!("/proc/{}", guard.id()));
        assert!(proc_dir.exists());
        drop(guard);
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!proc_dir.exists(), "child survived its guard");
    }

    #[test]
    fn kill_reports_a_finished_childs_status() {
        let mut guard = ChildGuard::spawn(&mut Command::new("true")).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(guard.kill().unwrap().success());
    }
}
