//! `frakti-agent`: PID 1 of a Frakti pod VM (see the library docs).

use std::process::ExitCode;

use frakti_agent::{pid1, sysinfo};
use frakti_proto::ready::ReadyLine;

const HELP: &str = "\
frakti-agent: PID 1 of a Frakti pod VM.

It runs as /init of the guest initrd: mounts /proc, /sys and /dev, prints
a ready line on the console (uptime, vCPUs, memory) and resets the VM.
It refuses to run as any other process.

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
    if let Err(e) = boot() {
        eprintln!("frakti-agent: {}", error_chain(e.as_ref()));
    }
    pid1::reset_vm()
}

fn boot() -> Result<(), Box<dyn std::error::Error>> {
    pid1::mount_kernel_filesystems()?;
    let ready = ReadyLine {
        uptime_secs: sysinfo::uptime_secs()?,
        cpus: sysinfo::online_cpus()?,
        mem_total_kib: sysinfo::mem_total_kib()?,
    };
    println!("{ready}");
    Ok(())
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
