//! virtio-net through frakti-vmm: the VMM creates a tap in L1 (or on the
//! host), the test gives it an address, and the guest pings that address
//! and sends 64 MiB of a known pattern over TCP to a server the test runs
//! there, which checks every byte.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::path::Path;
use std::process::Command;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use frakti_guest_tool::Checker;
use frakti_lab::guest;
use frakti_lab::process::read_log;
use libtest_mimic::{Failed, Trial};

use crate::test_vm::TestVm;

pub fn tests() -> Vec<Trial> {
    vec![Trial::test(
        "net::ping_and_64_mib_over_tcp_to_a_tap",
        ping_and_64_mib_over_tcp_to_a_tap,
    )]
}

const TAP: &str = "frtap0";
const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.15";
const MAC: &str = "52:54:00:12:34:56";
const PORT: u16 = 7000;
const STREAM: u64 = 77;
const BYTES: u64 = 64 << 20;
const TOOL: &str = "/bin/frakti-guest-tool";

fn guest_script() -> String {
    format!(
        "ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add {GUEST_IP}/24 dev eth0\n\
         echo \"guest mac $(cat /sys/class/net/eth0/address)\"\n\
         i=0; until ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; do \
             i=$((i+1)); [ $i -gt 60 ] && break; done\n\
         ping -c 3 {HOST_IP} && echo \"@@ ping ok\"\n\
         {TOOL} tcp-send {HOST_IP}:{PORT} {STREAM} {BYTES}\n"
    )
}

fn ip(args: &[&str]) -> Result<(), Failed> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// Accepts one connection, checks it carries exactly the pattern, answers.
fn tcp_checker(listener: TcpListener) -> JoinHandle<Result<u64, String>> {
    thread::spawn(move || {
        let (mut stream, peer) = listener.accept().map_err(|e| e.to_string())?;
        let mut checker = Checker::new(STREAM);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => checker.feed(&buf[..n]),
                Err(e) => return Err(format!("reading from {peer}: {e}")),
            }
        }
        let verdict = if checker.is_complete(BYTES) {
            "ok"
        } else {
            "bad"
        };
        let _ = writeln!(stream, "{verdict} {}", checker.received);
        let _ = stream.shutdown(Shutdown::Write);
        if checker.is_complete(BYTES) {
            Ok(checker.received)
        } else {
            Err(format!(
                "{} bytes from {peer}, first mismatch at {:?}",
                checker.received, checker.mismatch_at
            ))
        }
    })
}

fn wait_for_tap(deadline: Instant) -> Result<(), String> {
    while !Path::new(&format!("/sys/class/net/{TAP}")).exists() {
        if Instant::now() > deadline {
            return Err(format!("the VMM did not create {TAP}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn ping_and_64_mib_over_tcp_to_a_tap() -> Result<(), Failed> {
    let tool = guest::guest_tool_binary()?;
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("net-test-initrd.cpio");
    guest::build_script_initrd_with(&guest_script(), &[(TOOL, &tool)], &initrd)?;
    let mut vm = TestVm::new(dir.path(), &initrd, 256)?;
    vm.command.arg("--net").arg(format!("tap={TAP},mac={MAC}"));
    vm.start()?;
    let started = Instant::now();
    wait_for_tap(started + Duration::from_secs(60)).map_err(|e| vm.failure(e))?;
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
    ip(&["link", "set", TAP, "up"])?;
    let server = tcp_checker(TcpListener::bind((HOST_IP, PORT))?);
    vm.run_to_exit(Duration::from_secs(240), |_| Ok(()))?;
    let seconds = started.elapsed().as_secs_f64();
    if !server.is_finished() {
        return Err(vm.failure("the guest never connected"));
    }
    let received = server
        .join()
        .map_err(|_| "the TCP checker panicked".to_string())?
        .map_err(|e| vm.failure(e))?;
    let out = read_log(&vm.console);
    for needle in [
        format!("guest mac {MAC}"),
        "@@ ping ok".to_string(),
        format!("tcp-send ok bytes={BYTES}"),
        format!("peer says: ok {BYTES}"),
    ] {
        if !out.contains(&needle) {
            return Err(vm.failure(format!("console lacks {needle:?}")));
        }
    }
    if Path::new(&format!("/sys/class/net/{TAP}")).exists() {
        return Err(format!("{TAP} outlived the VMM").into());
    }
    eprintln!(
        "net: ping ok, {} MiB checked in {seconds:.1} s (boot included)",
        received >> 20
    );
    Ok(())
}
