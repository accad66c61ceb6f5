//! The first end-to-end proof: QEMU `-M microvm` boots our guest kernel and
//! initrd, and the agent reports the vCPUs and memory it was given.

use std::time::Duration;

use frakti_lab::guest::{self, GuestAssets, MicrovmConfig};
use libtest_mimic::{Failed, Trial};

pub fn tests() -> Vec<Trial> {
    [(1, 128), (2, 512)]
        .into_iter()
        .map(|(cpus, memory_mib)| {
            Trial::test(
                format!("qemu_microvm::boots_guest_to_agent_{cpus}cpu_{memory_mib}mib"),
                move || boots_guest_to_agent(cpus, memory_mib),
            )
        })
        .collect()
}

fn boots_guest_to_agent(cpus: u32, memory_mib: u32) -> Result<(), Failed> {
    let guest = GuestAssets::locate()?;
    let config = MicrovmConfig {
        cpus,
        memory_mib,
        timeout: Duration::from_secs(120),
    };
    let report = guest::boot_qemu_microvm(&guest, &config)?;
    let ready = &report.ready;
    eprintln!(
        "  {ready} ({:.2} s from QEMU start)",
        report.time_to_ready.as_secs_f64()
    );
    if ready.cpus != cpus {
        return Err(format!("guest sees {} vCPUs, expected {cpus}", ready.cpus).into());
    }
    // MemTotal excludes what the kernel reserves for itself, but most of the
    // RAM must be there and never more than we gave.
    let given_kib = u64::from(memory_mib) * 1024;
    if ready.mem_total_kib > given_kib || ready.mem_total_kib < given_kib * 3 / 4 {
        return Err(format!(
            "guest MemTotal {} KiB is implausible for {memory_mib} MiB",
            ready.mem_total_kib
        )
        .into());
    }
    if !report.exited_after_ready {
        return Err("the agent did not reset the VM after its ready line".into());
    }
    Ok(())
}
