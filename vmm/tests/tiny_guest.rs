//! The VMM end to end on the host's /dev/kvm with hand-written guest code
//! (PVM runs a few hundred instructions fine; a Linux guest needs the lab).
//! The code runs in 32-bit protected mode, entered as if by PVH.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use frakti_vmm::arch::x86_64::boot::BootProtocol;
use frakti_vmm::arch::x86_64::layout::HIMEM_START;
use frakti_vmm::config::{SerialOutput, VmConfig};
use frakti_vmm::vcpu::{ExitReason, VcpuState};
use frakti_vmm::vm::{self, Outcome};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Prints "OK\n" on COM1, touches a port nobody handles, signals
/// boot-done, resets through the i8042.
const HELLO_AND_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xe4, 0x99, 0xe6, 0x99, // in al, 0x99; out 0x99, al (no device there)
    0x66, 0xba, 0xf0, 0x0f, // mov dx, 0xff0 (boot-done port)
    0xb0, 0x7b, 0xee, // mov al, 0x7b; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al (i8042 reset)
    0xf4, // hlt
];

/// `ud2` with an empty IDT: #UD → #GP → #DF → triple fault.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

/// Prints '.' forever.
const DOTS_FOREVER: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'.', // mov al, '.'
    0xee, // loop: out dx, al
    0xeb, 0xfd, // jmp loop
];

fn config(dir: &std::path::Path, vcpus: u8, seccomp: bool) -> VmConfig {
    VmConfig {
        vcpus,
        memory_mib: 64,
        serial: SerialOutput::File(dir.join("console.log")),
        seccomp,
        ..VmConfig::with_kernel(PathBuf::from("/unused"))
    }
}

fn load_code(code: &'static [u8]) -> vm::GuestLoader {
    // A plain fn pointer cannot capture; pick the blob by its address.
    match code.as_ptr() {
        p if p == HELLO_AND_RESET.as_ptr() => |_, mem| load(mem, HELLO_AND_RESET),
        p if p == TRIPLE_FAULT.as_ptr() => |_, mem| load(mem, TRIPLE_FAULT),
        _ => |_, mem| load(mem, DOTS_FOREVER),
    }
}

fn load(mem: &GuestMemoryMmap, code: &[u8]) -> Result<BootProtocol, vm::Error> {
    mem.write_slice(code, GuestAddress(HIMEM_START))
        .expect("code fits in guest memory");
    Ok(BootProtocol::Pvh {
        entry: GuestAddress(HIMEM_START),
    })
}

fn console(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
}

#[test]
fn guest_prints_signals_boot_done_and_resets_under_seccomp() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm::build_with_loader(
        config(dir.path(), 1, true),
        Instant::now(),
        0,
        load_code(HELLO_AND_RESET),
    )
    .unwrap();
    let boot_done = vm.boot_done.clone();
    let counters = vm.counters.clone();
    // The test thread becomes the VMM thread, filter included; run it on
    // its own thread so the filter does not outlive the test.
    let outcome = std::thread::spawn(move || vm.run().unwrap())
        .join()
        .unwrap();
    assert_eq!(outcome, Outcome::GuestDone);
    assert_eq!(outcome.exit_code(), 0);
    assert_eq!(console(dir.path()), "OK\n");
    assert!(boot_done.get().is_some(), "boot-done port not seen");
    let exits = counters.snapshot();
    assert!(exits.io_out >= 5, "{exits:?}");
    assert_eq!(exits.unhandled_port, 2, "{exits:?}");
}

#[test]
fn triple_fault_is_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm::build_with_loader(
        config(dir.path(), 1, false),
        Instant::now(),
        0,
        load_code(TRIPLE_FAULT),
    )
    .unwrap();
    let outcome = vm.run().unwrap();
    assert_eq!(
        outcome,
        Outcome::Failed(ExitReason::TripleFault { vcpu: 0 })
    );
    assert_eq!(outcome.exit_code(), 1);
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm::build_with_loader(
        config(dir.path(), 2, false),
        Instant::now(),
        0,
        load_code(DOTS_FOREVER),
    )
    .unwrap();
    let remote = vm.vcpus.remote();
    let stop = vm.stop_request.clone();
    let runner = std::thread::spawn(move || vm.run().unwrap());

    let wait_for_output = |at_least: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while console(dir.path()).len() < at_least {
            assert!(Instant::now() < deadline, "guest made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for_output(10);
    remote.pause().unwrap();
    assert_eq!(remote.state(), VcpuState::Paused);
    // The console's writer thread may still be writing what the guest
    // printed before the pause.
    std::thread::sleep(Duration::from_millis(100));
    let paused_len = console(dir.path()).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        console(dir.path()).len(),
        paused_len,
        "guest ran while paused"
    );

    remote.resume().unwrap();
    assert_eq!(remote.state(), VcpuState::Running);
    wait_for_output(paused_len + 10);

    // No guest code answers Ctrl-Alt-Del: the grace runs out, then force.
    stop.request("test", Duration::from_millis(200));
    let outcome = runner.join().unwrap();
    match outcome {
        Outcome::Stopped { reason, graceful } => {
            assert!(!graceful);
            assert!(reason.contains("did not shut down in time"), "{reason}");
        }
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[test]
fn stop_without_grace_is_immediate() {
    let dir = tempfile::tempdir().unwrap();
    let vm = vm::build_with_loader(
        config(dir.path(), 1, false),
        Instant::now(),
        0,
        load_code(DOTS_FOREVER),
    )
    .unwrap();
    let stop = vm.stop_request.clone();
    let runner = std::thread::spawn(move || vm.run().unwrap());
    std::thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    stop.request("now", Duration::ZERO);
    let outcome = runner.join().unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert_eq!(
        outcome,
        Outcome::Stopped {
            reason: "now".into(),
            graceful: false
        }
    );
}

/// The API's pause and resume (and, every other round, a shutdown) racing
/// the guest's own reset, again and again: the VM always ends as the guest
/// or the shutdown asked, whichever came first, nothing hangs, and a pause
/// after the vCPU threads were joined answers at once without signalling
/// them (it used to signal joined threads: undefined behaviour). 300 rounds
/// here; the e2e suite runs this binary in the lab (real KVM) with
/// `FRAKTI_RACE_ROUNDS=1000`.
#[test]
fn pause_and_resume_racing_the_guests_reset() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let rounds: u32 = match std::env::var("FRAKTI_RACE_ROUNDS") {
        Ok(n) => n.parse().expect("FRAKTI_RACE_ROUNDS is a number"),
        Err(_) => 300,
    };
    let mut shut_down = 0;
    for round in 0..rounds {
        let dir = tempfile::tempdir().unwrap();
        let vm = vm::build_with_loader(
            config(dir.path(), 2, false),
            Instant::now(),
            0,
            load_code(HELLO_AND_RESET),
        )
        .unwrap();
        let remote = vm.vcpus.remote();
        let stop = vm.stop_request.clone();
        // Odd rounds also shut the VM down after a few pause/resume pairs.
        let shutdown_after = (round % 2 == 1).then_some(round % 5);
        let done = Arc::new(AtomicBool::new(false));
        let racer = {
            let (remote, done) = (remote.clone(), done.clone());
            std::thread::spawn(move || {
                let mut calls = 0u32;
                while !done.load(Ordering::Acquire) {
                    let _ = remote.pause();
                    let _ = remote.resume();
                    if shutdown_after == Some(calls) {
                        stop.request("race", Duration::ZERO);
                    }
                    calls += 1;
                }
                calls
            })
        };
        let started = Instant::now();
        let outcome = vm.run().unwrap();
        done.store(true, Ordering::Release);
        let stopped = Outcome::Stopped {
            reason: "race".into(),
            graceful: false,
        };
        assert!(
            outcome == Outcome::GuestDone || (shutdown_after.is_some() && outcome == stopped),
            "round {round}: {outcome:?}"
        );
        shut_down += u32::from(outcome == stopped);
        racer.join().unwrap();
        let asked = Instant::now();
        let late = remote.pause();
        assert!(
            asked.elapsed() < Duration::from_millis(100),
            "round {round}: a pause after the VM ended took {:?} ({late:?})",
            asked.elapsed()
        );
        assert_eq!(remote.state(), VcpuState::Exited, "round {round}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "round {round} took {:?}",
            started.elapsed()
        );
    }
    eprintln!(
        "pause/resume/shutdown racing the guest's reset: {rounds} rounds, each ended as asked ({shut_down} by the shutdown)"
    );
}
