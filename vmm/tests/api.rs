//! The control API against hostile and slow clients, served by the API
//! thread under its production seccomp filter (a syscall it lacks kills
//! the test process), for a hand-written guest on the host's /dev/kvm.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use frakti_vmm::api::{self, ApiContext, http};
use frakti_vmm::arch::x86_64::boot::BootProtocol;
use frakti_vmm::arch::x86_64::layout::HIMEM_START;
use frakti_vmm::config::{SerialOutput, VmConfig};
use frakti_vmm::vm::{self, Outcome};
use vm_memory::{Bytes, GuestAddress};

/// Prints '.' forever on COM1.
const DOTS_FOREVER: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'.', 0xee, 0xeb, 0xfd];

/// A VM with its API on `dir/api.sock`, running on its own thread.
fn start_vm(dir: &Path) -> (PathBuf, std::thread::JoinHandle<Outcome>) {
    let config = VmConfig {
        vcpus: 1,
        memory_mib: 64,
        serial: SerialOutput::File(dir.join("console.log")),
        seccomp: true,
        ..VmConfig::with_kernel(PathBuf::from("/unused"))
    };
    let start = Instant::now();
    let vm = vm::build_with_loader(config, start, 1, |_, mem| {
        mem.write_slice(DOTS_FOREVER, GuestAddress(HIMEM_START))
            .expect("code fits in guest memory");
        Ok(BootProtocol::Pvh {
            entry: GuestAddress(HIMEM_START),
        })
    })
    .unwrap();
    let socket = dir.join("api.sock");
    let listener = api::bind(&socket).unwrap();
    let mut vm = vm;
    let (sender, inbox) = api::channel(ApiContext::of(&vm, start)).unwrap();
    vm.serve_api(inbox);
    api::spawn(listener, sender, true, vm.start_barrier()).unwrap();
    (socket, std::thread::spawn(move || vm.run().unwrap()))
}

/// Sends `raw`, reads the answer to the end; its status code and text.
fn exchange(socket: &Path, raw: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The server may answer (and close) before it has read everything.
    let _ = stream.write_all(raw);
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn get_vm(socket: &Path) -> (u16, String) {
    exchange(socket, b"GET /vm HTTP/1.1\r\nHost: vmm\r\n\r\n")
}

#[test]
fn hostile_and_slow_clients_neither_crash_nor_stall_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, runner) = start_vm(dir.path());
    let (status, text) = get_vm(&socket);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"state\":\"running\""), "{text}");

    // The Content-Length that used to wrap an addition and panic: beyond
    // what hyper represents, refused as too large (431); a large one it
    // does represent is over our body limit (413).
    let (status, text) = exchange(
        &socket,
        b"PUT /vm/shutdown HTTP/1.1\r\nHost: vmm\r\nContent-Length: 18446744073709551615\r\n\r\n{}",
    );
    assert_eq!(status, 431, "{text}");
    let (status, text) = exchange(
        &socket,
        b"PUT /vm/shutdown HTTP/1.1\r\nHost: vmm\r\nContent-Length: 18446744073709551000\r\n\r\n{}",
    );
    assert_eq!(status, 413, "{text}");
    let (status, text) = exchange(
        &socket,
        b"PUT /vm/shutdown HTTP/1.1\r\nHost: vmm\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    );
    assert_eq!(status, 400, "{text}");
    // A body over the limit, sent for real, and a head over it.
    let mut big = format!(
        "PUT /disks/vol0 HTTP/1.1\r\nHost: vmm\r\nContent-Length: {}\r\n\r\n",
        http::MAX_BODY_BYTES + 1
    )
    .into_bytes();
    big.resize(big.len() + http::MAX_BODY_BYTES + 1, b' ');
    assert_eq!(exchange(&socket, &big).0, 413);
    let long_head = format!(
        "GET /vm HTTP/1.1\r\nHost: vmm\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(http::MAX_HEAD_BYTES)
    );
    assert_eq!(exchange(&socket, long_head.as_bytes()).0, 431);
    assert_eq!(exchange(&socket, b"\x00\x01garbage\r\n\r\n").0, 400);
    assert_eq!(get_vm(&socket).0, 200, "the API survived all of that");

    // A slowloris client holds a connection with half a request: the
    // next request is answered at once, and the slow one is cut off.
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.write_all(b"GET /vm HTTP/1.1\r\nHo").unwrap();
    let asked = Instant::now();
    assert_eq!(get_vm(&socket).0, 200);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "GET /vm waited {:?} behind a slow client",
        asked.elapsed()
    );
    slow.set_read_timeout(Some(http::HEAD_TIMEOUT * 3)).unwrap();
    let mut rest = Vec::new();
    let cut = slow.read_to_end(&mut rest);
    assert!(cut.is_ok(), "the slow client was never cut off: {cut:?}");
    assert!(asked.elapsed() < http::HEAD_TIMEOUT * 3);

    // Connections over the limit are refused at once with 503.
    let held: Vec<UnixStream> = (0..http::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, text) = get_vm(&socket);
    assert_eq!(status, 503, "{text}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_vm(&socket).0 != 200 {
        assert!(Instant::now() < deadline, "the API never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The VMM thread acts on what the API thread parsed.
    let put = |path: &str| {
        exchange(
            &socket,
            format!("PUT {path} HTTP/1.1\r\nHost: vmm\r\n\r\n").as_bytes(),
        )
    };
    let (status, text) = put("/vm/pause");
    assert!(status == 200 && text.contains("\"paused\""), "{text}");
    assert!(get_vm(&socket).1.contains("\"state\":\"paused\""));
    let (status, text) = put("/vm/resume");
    assert!(status == 200 && text.contains("\"running\""), "{text}");
    let (status, text) = exchange(&socket, b"GET /metrics HTTP/1.1\r\nHost: vmm\r\n\r\n");
    assert!(
        status == 200
            && text.contains("\"vmm_rss_kib\"")
            && text.contains("\"console_dropped_bytes\":0"),
        "{text}"
    );

    let (status, text) = exchange(
        &socket,
        b"PUT /vm/shutdown HTTP/1.1\r\nHost: vmm\r\nContent-Length: 16\r\n\r\n{\"timeout_ms\":0}",
    );
    assert_eq!(status, 202, "{text}");
    match runner.join().unwrap() {
        Outcome::Stopped { .. } => {}
        other => panic!("unexpected outcome {other:?}"),
    }
    // The VMM's loop is over: the API says so instead of hanging.
    let (status, text) = get_vm(&socket);
    assert_eq!(status, 503, "{text}");
}
