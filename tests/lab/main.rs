//! `frakti-lab`: runs work where a Linux guest can boot (see `--help`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use frakti_lab::demo;
use frakti_lab::guest::{self, GuestAssets};
use frakti_lab::initramfs::Initramfs;
use frakti_lab::mode::Mode;
use frakti_lab::rerun::run_self_in_lab;
use frakti_lab::runner::{self, LabConfig};

/// The Frakti lab: boots real VMs on any development host.
///
/// On hosts with hardware KVM (kvm_intel/kvm_amd) VMs run directly. On hosts
/// whose /dev/kvm is PVM, or that have no KVM, they run inside the lab: an L1
/// Linux VM under QEMU TCG with an emulated AMD CPU (SVM+NPT), whose
/// /dev/kvm is real. Set FRAKTI_LAB=direct|nested to override the choice.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print which mode this host uses and why.
    Mode,
    /// Build the guest initrd: the static agent as /init.
    Initrd {
        /// The statically linked frakti-agent.
        #[arg(long)]
        agent: PathBuf,
        /// Where to write the (uncompressed newc) cpio archive.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run shell commands in one L1 boot of the lab; print each one's output
    /// and exit with the first non-zero status.
    Run {
        #[command(flatten)]
        lab: LabArgs,
        /// Programs to put in L1 at /lab/bin/NAME (with their libraries).
        #[arg(long = "program")]
        programs: Vec<PathBuf>,
        /// Also put the guest kernel and initrd at /lab/guest/.
        #[arg(long)]
        with_guest: bool,
        /// Shell commands, run in order inside L1.
        #[arg(required = true, last = true)]
        commands: Vec<String>,
    },
    /// Frakti as a user meets it: start the daemon, import a small image built here, run a
    /// container in a VM of its own with `frakti run`, print its output and start time.
    Demo {
        #[command(flatten)]
        lab: LabArgs,
    },
}

#[derive(Debug, clap::Args)]
struct LabArgs {
    /// Overall timeout of the lab run, in seconds.
    #[arg(long, env = runner::TIMEOUT_ENV, default_value_t = 1200)]
    timeout: u64,
    /// L1 vCPUs (one is steadier than two: see runner::LabConfig).
    #[arg(long, env = runner::CPUS_ENV, default_value_t = 1)]
    l1_cpus: u32,
    /// L1 memory in MiB.
    #[arg(long, default_value_t = 4096)]
    l1_memory: u32,
    /// Keep the L1 initrd and serial logs in this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
}

impl LabArgs {
    fn config(&self, echo: bool) -> LabConfig {
        LabConfig {
            cpus: self.l1_cpus,
            memory_mib: self.l1_memory,
            timeout: Duration::from_secs(self.timeout),
            echo,
            work_dir: self.keep.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("frakti-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Mode => {
            println!("{}", Mode::detect()?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Initrd { agent, out } => {
            guest::build_initrd(&agent, &out)
                .with_context(|| format!("building the guest initrd {}", out.display()))?;
            eprintln!("initrd: {} (/init = {})", out.display(), agent.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            lab,
            programs,
            with_guest,
            commands,
        } => {
            let mut payload = Initramfs::new();
            for program in &programs {
                let name = program
                    .file_name()
                    .with_context(|| format!("{} has no file name", program.display()))?;
                payload.program(&format!("/lab/bin/{}", name.to_string_lossy()), program)?;
            }
            if with_guest {
                GuestAssets::locate()?.add_to(&mut payload);
            }
            let results = runner::run(&lab.config(false), payload, &commands)?;
            let mut first_failure = 0;
            for (command, result) in commands.iter().zip(&results) {
                println!("$ {command}\n{}[exit {}]", result.output, result.status);
                if first_failure == 0 {
                    first_failure = result.status;
                }
            }
            Ok(exit_code(first_failure))
        }
        Cmd::Demo { lab } => demo(&lab),
    }
}

fn demo(lab: &LabArgs) -> anyhow::Result<ExitCode> {
    let guest = GuestAssets::locate()?;
    let mode = Mode::detect()?;
    eprintln!("frakti-lab: mode {mode}");
    let scratch = tempfile::tempdir()?;
    let image = match std::env::var_os(demo::IMAGE_ENV) {
        Some(image) => PathBuf::from(image),
        None => demo::build_image(scratch.path())?,
    };
    if mode.is_nested() {
        let programs = [
            (demo::FRAKTI_ENV, demo::frakti_binary()?),
            (guest::VMM_ENV, guest::vmm_binary()?),
            (demo::MKFS_EROFS_ENV, demo::mkfs_erofs_binary()?),
            (demo::IMAGE_ENV, image),
        ];
        let status = run_self_in_lab(&["demo".to_string()], &guest, &programs, &lab.config(true))?;
        return Ok(exit_code(status));
    }
    demo::run_here(&demo::Programs {
        frakti: demo::frakti_binary()?,
        vmm: guest::vmm_binary()?,
        kernel: guest.kernel,
        initrd: guest.initrd,
        mkfs_erofs: demo::mkfs_erofs_binary()?,
        image,
    })?;
    Ok(ExitCode::SUCCESS)
}

fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
