//! `frakti-agent`: PID 1 of a Frakti pod VM (see the library docs).

use std::process::ExitCode;

use frakti_agent::{pid1, sysinfo};
use frakti_proto::ready::ReadyLine;

const HELP: &str = "\
frakti-agent: PID 1 of a Frakti pod VM.

It runs as /init of the guest initrd: mounts /proc, /sys and /dev, prints
a ready line on the console (uptime, vCPUs, memory), tells the VMM it is
ready (boot-done port), then either resets the VM at once
(frakti_after_ready=reset on the kernel command line) or serves as init
until Ctrl-Alt-Del, SIGTERM or SIGPWR asks it to shut down
(frakti_after_ready=wait, the default). It refuses to run as any other
process.

Options:
  -h, --help     show this help
  -V, --version  show the version";

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("-h" | "--help") => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("frakti-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) if std::process::id() != 1 => {
            eprintln!("frakti-agent: unknown argument '{other}' (try --help)");
            return ExitCode::from(2);
        }
        _ => {}
    }
    if std::process::id() != 1 {
        eprintln!("frakti-agent: must run as PID 1 (the init of a Frakti guest VM); see --help");
        return ExitCode::from(2);
    }
    if let Err(e) = boot().and_then(|()| after_ready()) {
        eprintln!("frakti-agent: {}", error_chain(e.as_ref()));
    }
    pid1::reset_vm()
}

type BoxError = Box<dyn std::error::Error>;

fn boot() -> Result<(), BoxError> {
    pid1::mount_kernel_filesystems()?;
    pid1::block_init_signals()?;
    pid1::hand_ctrl_alt_del_to_init()?;
    let ready = ReadyLine {
        uptime_secs: sysinfo::uptime_secs()?,
        cpus: sysinfo::online_cpus()?,
        mem_total_kib: sysinfo::mem_total_kib()?,
    };
    println!("{ready}");
    if std::env::var(frakti_proto::DUMP_KMSG_PARAM).is_ok_and(|v| v == "1") {
        for line in sysinfo::kernel_log()? {
            println!("{line}");
        }
    }
    // Only a metric for the VMM: a guest that cannot signal still serves.
    if let Err(e) =
        pid1::signal_boot_done(frakti_proto::BOOT_DONE_PORT, frakti_proto::BOOT_DONE_VALUE)
    {
        eprintln!("frakti-agent: warning: {}", error_chain(&e));
    }
    Ok(())
}

/// What the kernel command line asks for after the ready line.
fn after_ready() -> Result<(), BoxError> {
    match std::env::var(frakti_proto::AFTER_READY_PARAM).as_deref() {
        Ok("reset") => Ok(()),
        Ok("wait") | Err(_) => {
            let signal = pid1::wait_for_shutdown()?;
            println!("frakti-agent: {signal}: shutting down");
            Ok(())
        }
        Ok(other) => Err(format!(
            "{}={other} is not 'reset' or 'wait'",
            frakti_proto::AFTER_READY_PARAM
        )
        .into()),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
