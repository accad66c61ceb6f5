//! `make demo`: Frakti as a user meets it. A small image is built here
//! (busybox-static in one layer, as an OCI image layout tar), the daemon is
//! started (in the lab's L1 when this host cannot boot a Linux guest), the
//! image imported with `frakti image import`, and a container run in a VM
//! of its own with `frakti run`: its output and how long the VM and the
//! container took to start are printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The `frakti` binary.
pub const FRAKTI_ENV: &str = "FRAKTI_BIN";
/// mkfs.erofs, which the daemon runs to turn the image into a disk.
pub const MKFS_EROFS_ENV: &str = "FRAKTI_MKFS_EROFS";
/// The demo image (an OCI image layout tar).
pub const IMAGE_ENV: &str = "FRAKTI_DEMO_IMAGE";
/// The name the image is imported under.
pub const IMAGE_NAME: &str = "demo/busybox";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{what} is missing at {path}: {hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("`frakti {args}` failed ({status}): {stderr}")]
    Command {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the daemon did not serve within 60 s; its log:\n{0}")]
    NoDaemon(String),
}

fn file_or(
    env: &str,
    default: PathBuf,
    what: &'static str,
    hint: &'static str,
) -> Result<PathBuf, Error> {
    let path = std::env::var_os(env).map_or(default, PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Missing { what, path, hint })
    }
}

/// `frakti` as the Makefile builds it for the demo (release).
pub fn frakti_binary() -> Result<PathBuf, Error> {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/frakti");
    file_or(
        FRAKTI_ENV,
        default,
        "the frakti binary",
        "run `cargo build --release -p frakti-cri` (make demo does)",
    )
}

pub fn mkfs_erofs_binary() -> Result<PathBuf, Error> {
    file_or(
        MKFS_EROFS_ENV,
        PathBuf::from("/usr/bin/mkfs.erofs"),
        "mkfs.erofs",
        "install erofs-utils (scripts/deps.sh)",
    )
}

/// Writes the demo image, busybox-static with the applet links a shell
/// needs, as an OCI image layout tar at `dir/busybox-oci.tar`.
pub fn build_image(dir: &Path) -> Result<PathBuf, Error> {
    let busybox = file_or(
        "FRAKTI_BUSYBOX",
        PathBuf::from("/bin/busybox"),
        "busybox",
        "install busybox-static",
    )?;
    let mut layer = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    let bytes = std::fs::read(&busybox)?;
    header.set_size(bytes.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    layer.append_data(&mut header, "bin/busybox", bytes.as_slice())?;
    for applet in [
        "sh", "echo", "cat", "ls", "uname", "sleep", "stty", "id", "hostname",
    ] {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_mode(0o777);
        link.set_cksum();
        layer.append_link(&mut link, format!("bin/{applet}"), "busybox")?;
    }
    let layer = layer.into_inner()?;
    let layer_digest = sha256(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    })
    .to_string();
    let config_digest = sha256(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_digest}"), "size": layer.len()}],
    })
    .to_string();
    let manifest_digest = sha256(manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{manifest_digest}"), "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    })
    .to_string();
    let path = dir.join("busybox-oci.tar");
    let mut out = tar::Builder::new(std::fs::File::create(&path)?);
    let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.append_data(&mut header, name, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", index.as_bytes())?;
    add(&format!("blobs/sha256/{layer_digest}"), &layer)?;
    add(&format!("blobs/sha256/{config_digest}"), config.as_bytes())?;
    add(
        &format!("blobs/sha256/{manifest_digest}"),
        manifest.as_bytes(),
    )?;
    out.into_inner()?.sync_all()?;
    Ok(path)
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The daemon of the demo; killed (and its state removed) on drop.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The paths the demo needs where it runs (here, or in L1).
pub struct Programs {
    pub frakti: PathBuf,
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub mkfs_erofs: PathBuf,
    pub image: PathBuf,
}

/// Runs the demo here (this host boots Linux guests).
pub fn run_here(programs: &Programs) -> Result<(), Error> {
    let daemon = start_daemon(programs)?;
    let socket = daemon.dir.path().join("frakti.sock");
    let frakti = |args: &[&str]| frakti(&programs.frakti, &socket, args);
    let imported = frakti(&[
        "image",
        "import",
        &programs.image.to_string_lossy(),
        "--name",
        IMAGE_NAME,
    ])?;
    print!(
        "$ frakti image import busybox-oci.tar --name {IMAGE_NAME}\n{}",
        text(&imported.stdout)
    );
    let image = format!("{IMAGE_NAME}:latest");
    let script = "echo hello from a frakti VM; echo kernel $(uname -r), hostname $(hostname)";

    println!("$ frakti run -d --name hello {image} sh -c '{script}'");
    let started = Instant::now();
    frakti(&["run", "-d", "--name", "hello", &image, "sh", "-c", script])?;
    let start_time = started.elapsed();
    let logs = frakti(&["logs", "-f", "hello"])?;
    print!("{}", text(&logs.stdout));
    frakti(&["rm", "-f", "hello"])?;
    println!(
        "pod VM + container started in {:.2} s (`frakti run -d`: VM boot, agent ready, container created and started)",
        start_time.as_secs_f64()
    );

    println!("$ frakti run --rm {image} echo and gone");
    let started = Instant::now();
    let out = frakti(&["run", "--rm", &image, "echo", "and gone"])?;
    print!("{}", text(&out.stdout));
    println!(
        "`frakti run --rm` took {:.2} s end to end (start, run, VM removal)",
        started.elapsed().as_secs_f64()
    );
    let left = frakti(&["ps", "-a", "-q", "--pods"])?;
    if !left.stdout.is_empty() {
        println!("left behind: {}", text(&left.stdout));
    }
    drop(daemon);
    Ok(())
}

fn start_daemon(programs: &Programs) -> Result<Daemon, Error> {
    let dir = tempfile::Builder::new()
        .prefix("frakti-demo")
        .tempdir_in("/tmp")?;
    // The daemon finds mkfs.erofs on its PATH.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin)?;
    std::os::unix::fs::symlink(&programs.mkfs_erofs, bin.join("mkfs.erofs"))?;
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let log = std::fs::File::create(dir.path().join("daemon.log"))?;
    let socket = dir.path().join("frakti.sock");
    let child = Command::new(&programs.frakti)
        .env("PATH", path)
        .arg("daemon")
        .arg("--listen")
        .arg(&socket)
        .arg("--root")
        .arg(dir.path().join("r"))
        .arg("--kernel")
        .arg(&programs.kernel)
        .arg("--initrd")
        .arg(&programs.initrd)
        .arg("--vmm")
        .arg(&programs.vmm)
        .args(["--network", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let daemon = Daemon { child, dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    while frakti(&programs.frakti, &socket, &["ps", "-q"]).is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(daemon.dir.path().join("daemon.log"))?;
            return Err(Error::NoDaemon(log));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "$ frakti daemon --network none …   (serving on {})",
        socket.display()
    );
    std::io::stdout().flush()?;
    Ok(daemon)
}

fn frakti(bin: &Path, socket: &Path, args: &[&str]) -> Result<Output, Error> {
    let output = Command::new(bin)
        .arg("--endpoint")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(Error::Command {
            args: args.join(" "),
            status: output.status,
            stderr: text(&output.stderr),
        });
    }
    Ok(output)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
