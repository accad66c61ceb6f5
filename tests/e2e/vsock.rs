//! virtio-vsock through frakti-vmm: 64 concurrent streams, half opened by
//! the host through the hybrid socket (`CONNECT <port>`), half by the guest
//! to a host unix socket (`<uds>_<port>`), each echoing 1 MiB of a known
//! pattern that the sending end checks.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use frakti_guest_tool::send_and_check;
use frakti_lab::guest;
use frakti_lab::process::read_log;
use frakti_lab::vsock::hybrid_connect;
use libtest_mimic::{Failed, Trial};

use crate::test_vm::TestVm;

pub fn tests() -> Vec<Trial> {
    vec![Trial::test(
        "vsock::echo_64_streams_both_ways",
        echo_64_streams_both_ways,
    )]
}

const STREAMS_EACH_WAY: u64 = 32;
const BYTES_PER_STREAM: u64 = 1 << 20;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
const GUEST_CID: u32 = 3;
const TOOL: &str = "/bin/frakti-guest-tool";

fn guest_script() -> String {
    format!(
        "{TOOL} vsock-echo-server {GUEST_PORT} {STREAMS_EACH_WAY} &\n\
         server=$!\n\
         {TOOL} vsock-echo-client 2 {HOST_PORT} {STREAMS_EACH_WAY} {BYTES_PER_STREAM}\n\
         wait $server\n"
    )
}

/// How long the host server waits for the guest's connections: a guest
/// that opens fewer must fail the test, not hang it.
const ACCEPT_DEADLINE: Duration = Duration::from_secs(300);

/// Echoes `connections` streams accepted on `listener`; returns the bytes.
fn host_echo_server(listener: UnixListener, connections: u64) -> JoinHandle<std::io::Result<u64>> {
    thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + ACCEPT_DEADLINE;
        let mut workers = Vec::new();
        while (workers.len() as u64) < connections {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(std::io::Error::other(format!(
                            "the guest opened {} of {connections} connections",
                            workers.len()
                        )));
                    }
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(e),
            };
            stream.set_nonblocking(false)?;
            workers.push(thread::spawn(move || -> std::io::Result<u64> {
                let mut reader = stream.try_clone()?;
                let n = std::io::copy(&mut reader, &mut stream)?;
                stream.shutdown(std::net::Shutdown::Write)?;
                Ok(n)
            }));
        }
        let mut total = 0;
        for worker in workers {
            total += frakti_guest_tool::join(worker)?;
        }
        Ok(total)
    })
}

fn host_clients(uds: &Path) -> Vec<JoinHandle<std::io::Result<()>>> {
    (0..STREAMS_EACH_WAY)
        .map(|i| {
            let uds = uds.to_path_buf();
            thread::spawn(move || {
                let stream = hybrid_connect(&uds, GUEST_PORT)?;
                send_and_check(stream, 1000 + i, BYTES_PER_STREAM)
            })
        })
        .collect()
}

fn echo_64_streams_both_ways() -> Result<(), Failed> {
    let tool = guest::guest_tool_binary()?;
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("vsock-test-initrd.cpio");
    guest::build_script_initrd_with(&guest_script(), &[(TOOL, &tool)], &initrd)?;
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display()))?;
    let host_server = host_echo_server(listener, STREAMS_EACH_WAY);
    let mut vm = TestVm::new(dir.path(), &initrd, 256)?;
    vm.command
        .args(["--log", "debug", "--vsock"])
        .arg(format!("cid={GUEST_CID},uds={}", uds.display()));
    vm.start()?;
    let started = Instant::now();
    let mut clients = None;
    vm.run_to_exit(Duration::from_secs(240), |line| {
        if line.contains(&format!("vsock echo server listening on {GUEST_PORT}")) {
            clients = Some(host_clients(&uds));
        }
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();

    let clients = clients.ok_or_else(|| vm.failure("the guest never listened"))?;
    for (i, client) in clients.into_iter().enumerate() {
        frakti_guest_tool::join(client).map_err(|e| vm.failure(format!("host stream {i}: {e}")))?;
    }
    if uds.exists() {
        return Err(format!("{} outlived the VMM", uds.display()).into());
    }
    let echoed = frakti_guest_tool::join(host_server)?;
    if echoed != STREAMS_EACH_WAY * BYTES_PER_STREAM {
        return Err(vm.failure(format!("host echo server moved {echoed} bytes")));
    }
    let out = read_log(&vm.console);
    for needle in [
        format!("vsock-echo-client ok streams={STREAMS_EACH_WAY}"),
        format!("vsock-echo-server ok connections={STREAMS_EACH_WAY}"),
    ] {
        if !out.contains(&needle) {
            return Err(vm.failure(format!("console lacks {needle:?}")));
        }
    }
    eprintln!(
        "vsock: {} streams, {} MiB checked in {seconds:.1} s (boot included)",
        2 * STREAMS_EACH_WAY,
        (2 * STREAMS_EACH_WAY * BYTES_PER_STREAM) >> 20
    );
    Ok(())
}
