//! frakti-vmm running a test guest (a busybox script initrd): the command
//! line every device test starts from, its console and log files, the run
//! to the guest's own reset, and what a failure shows.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use frakti_lab::guest::{self, GuestAssets};
use frakti_lab::process::{ChildGuard, FileTail, read_log, seccomp_kills};
use libtest_mimic::Failed;

pub struct TestVm {
    /// Add the test's own flags here before [`TestVm::start`].
    pub command: Command,
    pub console: PathBuf,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl TestVm {
    /// Our kernel with `initrd`, `memory_mib` of RAM, a quiet console to
    /// `dir/console.log`, the VMM's log to `dir/vmm.log`.
    pub fn new(dir: &Path, initrd: &Path, memory_mib: u32) -> Result<TestVm, Failed> {
        let assets = GuestAssets::locate()?;
        let console = dir.join("console.log");
        let log = dir.join("vmm.log");
        let mut command = Command::new(guest::vmm_binary()?);
        command
            .arg("--kernel")
            .arg(&assets.kernel)
            .arg("--initrd")
            .arg(initrd)
            .args(["--memory", &memory_mib.to_string(), "--cmdline", "quiet"])
            .arg("--serial")
            .arg(&console)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        Ok(TestVm {
            command,
            console,
            log,
            child: None,
        })
    }

    pub fn start(&mut self) -> Result<(), Failed> {
        self.child = Some(ChildGuard::spawn(&mut self.command)?);
        Ok(())
    }

    /// The console, the VMM's log and any seccomp kill, for a failure.
    pub fn diagnostics(&self) -> String {
        format!(
            "console:\n{}\nvmm log:\n{}\nseccomp: {}",
            read_log(&self.console),
            read_log(&self.log),
            seccomp_kills()
        )
    }

    /// An error carrying `what` and the diagnostics.
    pub fn failure(&self, what: impl std::fmt::Display) -> Failed {
        format!("{what}\n{}", self.diagnostics()).into()
    }

    /// Waits, up to `timeout`, for the guest to end the VM (the VMM exits
    /// 0), handing each console line to `on_line` as it comes.
    pub fn run_to_exit(
        &mut self,
        timeout: Duration,
        mut on_line: impl FnMut(&str) -> Result<(), Failed>,
    ) -> Result<(), Failed> {
        let deadline = Instant::now() + timeout;
        let mut tail = FileTail::new(&self.console);
        loop {
            for line in tail.new_lines()? {
                on_line(&line)?;
            }
            let child = self.child.as_mut().ok_or("the VMM was not started")?;
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    return Err(self.failure(format!("VMM exit {status}")));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failure("the guest did not finish"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
