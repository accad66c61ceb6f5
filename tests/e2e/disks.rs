//! virtio-blk through frakti-vmm: the guest reads a read-only image and
//! cannot write it, writes a scratch disk the host then checks, and sees a
//! slot's backing file set, replaced and removed through the control API
//! while it runs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use frakti_lab::guest;
use frakti_lab::process::read_log;
use libtest_mimic::{Failed, Trial};

use crate::test_vm::TestVm;

pub fn tests() -> Vec<Trial> {
    vec![Trial::test(
        "disks::read_write_read_only_and_slot_swaps",
        read_write_read_only_and_slot_swaps,
    )]
}

/// Finds a disk by serial, as the agent will.
const GUEST_SCRIPT: &str = r#"
dev() { for d in /sys/block/vd*; do [ "$(cat $d/serial)" = "$1" ] && echo /dev/${d##*/}; done; }
size() { cat /sys/block/${1##*/}/size; }
# Reads the size before asking the host, so a fast answer is not missed.
ask_host_and_wait() {
    old=$(size $SLOT); i=0
    echo "@@ ready for slot $1"
    while [ "$(size $SLOT)" = "$old" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
}
read_head() { blockdev --flushbufs $1; dd if=$1 bs=13 count=1 2>/dev/null; echo; }
IMAGE=$(dev image); SCRATCH=$(dev scratch); SLOT=$(dev slot0)
echo "found image=$IMAGE scratch=$SCRATCH slot=$SLOT"
echo "image ro=$(cat /sys/block/${IMAGE##*/}/ro) size=$(size $IMAGE)"
echo "image says $(read_head $IMAGE)"
if echo overwrite | dd of=$IMAGE conv=fsync 2>/dev/null; then echo "ro write: allowed"; else echo "ro write: refused"; fi
printf guest-wrote-this | dd of=$SCRATCH bs=512 seek=1 conv=notrunc,fsync 2>/dev/null && echo "scratch written"
echo "slot size $(size $SLOT)"
ask_host_and_wait 1
echo "slot size $(size $SLOT) says $(read_head $SLOT)"
ask_host_and_wait 2
echo "slot size $(size $SLOT) says $(read_head $SLOT)"
ask_host_and_wait 3
echo "slot size $(size $SLOT) at the end"
"#;

fn disk_file(dir: &Path, name: &str, size: usize, head: &[u8]) -> std::io::Result<String> {
    let mut bytes = vec![0u8; size];
    bytes[..head.len()].copy_from_slice(head);
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(path.display().to_string())
}

fn api(socket: &Path, method: &str, path: &str, body: &str) -> Result<String, Failed> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("{method} {path}: {response}").into());
    }
    Ok(response)
}

fn read_write_read_only_and_slot_swaps() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("disk-test-initrd.cpio");
    guest::build_script_initrd(GUEST_SCRIPT, &initrd)?;
    let image = disk_file(dir.path(), "image.raw", 1 << 20, b"frakti-disk-A")?;
    let scratch = disk_file(dir.path(), "scratch.raw", 1 << 20, b"")?;
    let second = disk_file(dir.path(), "b.raw", 2 << 20, b"frakti-disk-B")?;
    let third = disk_file(dir.path(), "c.raw", 3 << 20, b"frakti-disk-C")?;
    let socket = dir.path().join("api.sock");
    let mut vm = TestVm::new(dir.path(), &initrd, 128)?;
    vm.command
        .args(["--disk", &format!("serial=image,path={image},ro")])
        .args(["--disk", &format!("serial=scratch,path={scratch}")])
        .args(["--disk", "serial=slot0"])
        .arg("--api-socket")
        .arg(&socket);
    vm.start()?;
    let mut swaps = 0;
    vm.run_to_exit(Duration::from_secs(120), |line| {
        let request = match line.trim() {
            "@@ ready for slot 1" => Some(("PUT", format!("{{\"path\": \"{second}\"}}"))),
            "@@ ready for slot 2" => Some(("PUT", format!("{{\"path\": \"{third}\"}}"))),
            "@@ ready for slot 3" => Some(("DELETE", String::new())),
            _ => None,
        };
        if let Some((method, body)) = request {
            api(&socket, method, "/disks/slot0", &body)?;
            swaps += 1;
        }
        Ok(())
    })?;

    let out = read_log(&vm.console);
    let expect = |needle: &str| -> Result<(), Failed> {
        if out.contains(needle) {
            Ok(())
        } else {
            Err(vm.failure(format!("console lacks {needle:?}")))
        }
    };
    expect("image ro=1 size=2048")?;
    expect("image says frakti-disk-A")?;
    expect("ro write: refused")?;
    expect("scratch written")?;
    expect("slot size 0")?;
    expect("slot size 4096 says frakti-disk-B")?;
    expect("slot size 6144 says frakti-disk-C")?;
    expect("slot size 0 at the end")?;
    if swaps != 3 {
        return Err(vm.failure(format!("{swaps} slot swaps, expected 3")));
    }
    let written = std::fs::read(&scratch)?;
    if &written[512..528] != b"guest-wrote-this" {
        return Err("the host does not see the guest's write on the scratch disk".into());
    }
    let image_bytes = std::fs::read(&image)?;
    if !image_bytes.starts_with(b"frakti-disk-A") {
        return Err("the read-only image was modified".into());
    }
    Ok(())
}
