//! Image benchmark: pulling three images of different shapes from one local
//! registry (Debian's docker-registry on 127.0.0.1), frakti against
//! containerd 1.6, alternating, in one run. frakti's pull fetches the blobs,
//! unpacks the layers and builds one EROFS disk (`frakti image pull`);
//! containerd's fetches and unpacks into overlayfs snapshots
//! (`ctr images pull`). Every pull starts from an empty store.
//!
//! Measures, per pull: the CLI command's wall clock, and the bytes the store
//! then allocates on disk. Prints medians, p90s and ratios (frakti /
//! containerd). Runs as root (overlayfs mounts, image files' owners).

#[path = "../../cri/tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use frakti_lab::process::{ChildGuard, read_log};
use support::images::{self, BuiltImage, PushOptions};
use support::registry::Registry;

/// Image pull + unpack time and size on disk: frakti vs containerd (ratios).
#[derive(Debug, Parser)]
struct Args {
    /// Pulls of each image by each runtime, alternating.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Small files in the many-files image.
    #[arg(long, default_value_t = 5000)]
    files: usize,
    /// MiB of incompressible data in the big-layer image.
    #[arg(long, default_value_t = 256)]
    big_mib: u64,
}

/// containerd's namespace for the benchmark's images.
const NAMESPACE: &str = "bench";
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Where containerd 1.6 keeps blobs and unpacked layers under its root.
const CONTENT: &str = "io.containerd.content.v1.content";
const OVERLAYFS: &str = "io.containerd.snapshotter.v1.overlayfs";

fn main() -> ExitCode {
    frakti_bench::exit(run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let frakti_bin = frakti_bench::frakti_binary()?;
    for tool in ["containerd", "ctr"] {
        if support::find_tool(tool).is_none() {
            bail!("`{tool}` is not installed: apt-get install -y containerd");
        }
    }
    // Declared first, dropped last: the daemons and the registry are killed
    // before their directories go.
    let dir = tempfile::Builder::new()
        .prefix("frakti-bench-images")
        .tempdir()?;
    let registry = Registry::start(&dir.path().join("registry"), Default::default());
    eprintln!("bench: building and pushing the images (once)");
    let images = push_images(args, &dir.path().join("layouts"), &registry);
    let frakti = Frakti::start(&frakti_bin, &dir.path().join("frakti"), &registry.host())?;
    let containerd = Containerd::start(&dir.path().join("containerd"))?;
    let stores: [&dyn Store; 2] = [&frakti, &containerd];
    for store in stores {
        store.check_empty()?;
    }

    print_method(args, &containerd_version()?);
    for image in &images {
        eprintln!("bench: {}", image.label);
        let mut samples = [Samples::default(), Samples::default()];
        for i in 0..args.runs {
            // Alternate which goes first so drift hurts both alike.
            let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                pull_once(stores[which], &image.reference, &mut samples[which])?;
            }
        }
        report(image, &samples[0], &samples[1]);
    }
    Ok(ExitCode::SUCCESS)
}

/// An image in the registry, as both runtimes pull it.
struct BenchImage {
    label: String,
    /// "127.0.0.1:PORT/bench/NAME:latest".
    reference: String,
    /// Compressed layer bytes: what a pull fetches.
    fetch_bytes: u64,
}

/// Builds the three images (deterministic OCI layouts) and pushes them.
fn push_images(args: &Args, dir: &Path, registry: &Registry) -> Vec<BenchImage> {
    let built: [(String, BuiltImage); 3] = [
        ("busybox (1 layer)".into(), images::busybox_image(dir)),
        (
            format!("busybox + {} small files (2 layers)", args.files),
            images::many_files_image(dir, args.files),
        ),
        (
            format!(
                "busybox + one {} MiB incompressible file, gzip (2 layers)",
                args.big_mib
            ),
            images::big_layer_image(dir, args.big_mib),
        ),
    ];
    built
        .into_iter()
        .map(|(label, image)| {
            // The layout's directory name ("many-5000") is unique to each.
            let layout = image
                .layout
                .file_name()
                .unwrap_or_default()
                .to_string_lossy();
            let name = format!("bench/{layout}:latest");
            let pushed = images::push(&image, registry, &name, &PushOptions::default());
            BenchImage {
                label,
                reference: pushed.reference,
                fetch_bytes: image.host_image().layers.iter().map(|l| l.size).sum(),
            }
        })
        .collect()
}

/// Bytes a store allocates after a pull.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    /// The whole store (frakti's images/, containerd's root).
    total: u64,
    /// Fetched blobs (frakti's blobs/, containerd's content store).
    blobs: u64,
    /// The unpacked image (frakti's EROFS disk, containerd's snapshots).
    unpacked: u64,
}

#[derive(Default)]
struct Samples {
    secs: Vec<f64>,
    usage: Vec<Usage>,
    /// frakti only: from the last blob fetched to the image recorded (its
    /// daemon's log), i.e. unpacking and building the disk.
    after_fetch: Vec<f64>,
}

/// What the benchmark does with each runtime.
trait Store {
    fn name(&self) -> &'static str;
    /// Pulls and unpacks `reference` with the runtime's CLI; the seconds
    /// spent after the fetch, if the runtime says.
    fn pull(&self, reference: &str) -> anyhow::Result<Option<f64>>;
    fn usage(&self) -> anyhow::Result<Usage>;
    /// Removes the image and whatever it left (blobs, unpacked layers).
    fn remove(&self, reference: &str) -> anyhow::Result<()>;
    /// Fails unless nothing of any image is left.
    fn check_empty(&self) -> anyhow::Result<()>;
}

/// One timed pull into an empty store; leaves the store empty again.
fn pull_once(store: &dyn Store, reference: &str, samples: &mut Samples) -> anyhow::Result<()> {
    // Else the write-back of the previous pull's dirty pages would land in
    // this one.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let start = Instant::now();
    let after_fetch = store.pull(reference)?;
    let secs = start.elapsed().as_secs_f64();
    let usage = store.usage()?;
    if usage.blobs == 0 || usage.unpacked == 0 {
        bail!("{} pulled {reference} but stores {usage:?}", store.name());
    }
    store.remove(reference)?;
    store.check_empty()?;
    samples.secs.push(secs);
    samples.usage.push(usage);
    samples.after_fetch.extend(after_fetch);
    Ok(())
}

/// A `frakti daemon` with its own state dir, socket and certs.d.
struct Frakti {
    bin: PathBuf,
    dir: PathBuf,
    _daemon: ChildGuard,
}

impl Frakti {
    fn start(bin: &Path, dir: &Path, registry_host: &str) -> anyhow::Result<Frakti> {
        let hosts = dir.join("certs.d").join(registry_host);
        fs::create_dir_all(&hosts)?;
        fs::write(
            hosts.join("hosts.toml"),
            format!("server = \"http://{registry_host}\"\n"),
        )?;
        let log = dir.join("daemon.log");
        let mut command = Command::new(bin);
        command
            .arg("daemon")
            .arg("--listen")
            .arg(dir.join("frakti.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--certs-dir")
            .arg(dir.join("certs.d"))
            // No credentials from the node: the registry is anonymous.
            .arg("--docker-config")
            .arg(dir.join("no-docker-config.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let mut daemon = ChildGuard::spawn(&mut command).context("starting frakti daemon")?;
        wait_for_socket(&mut daemon, &dir.join("frakti.sock"), &log)?;
        Ok(Frakti {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            _daemon: daemon,
        })
    }

    fn cli(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--endpoint").arg(self.dir.join("frakti.sock"));
        c
    }

    fn images_dir(&self) -> PathBuf {
        self.dir.join("state/images")
    }
}

impl Store for Frakti {
    fn name(&self) -> &'static str {
        "frakti"
    }

    fn pull(&self, reference: &str) -> anyhow::Result<Option<f64>> {
        let log = self.dir.join("daemon.log");
        let offset = fs::metadata(&log)?.len() as usize;
        run_ok(self.cli().args(["image", "pull", reference]))?;
        let text = fs::read(&log)?;
        Ok(after_fetch_secs(&String::from_utf8_lossy(
            text.get(offset..).unwrap_or_default(),
        )))
    }

    fn usage(&self) -> anyhow::Result<Usage> {
        let root = self.images_dir();
        Ok(Usage {
            total: disk_usage(&root)?,
            blobs: disk_usage(&root.join("blobs"))?,
            unpacked: disk_usage(&root.join("disks"))?,
        })
    }

    fn remove(&self, reference: &str) -> anyhow::Result<()> {
        // Collects the image's blobs and disk before it answers.
        run_ok(self.cli().args(["image", "rm", reference])).map(drop)
    }

    fn check_empty(&self) -> anyhow::Result<()> {
        let left = files_under(&self.images_dir())?;
        if !left.is_empty() {
            bail!("frakti's store is not empty: {left:?}");
        }
        Ok(())
    }
}

/// Seconds from the last "blob fetched" line of a frakti daemon's log to
/// its "pulled" line (tracing's `2026-12-04T17:40:01.123456Z  INFO …`).
fn after_fetch_secs(log: &str) -> Option<f64> {
    // Seconds since midnight (UTC) of a line's timestamp.
    let time_of = |line: &str| -> Option<f64> {
        let clock = line.split_whitespace().next()?.split('T').nth(1)?;
        let mut hms = clock.trim_end_matches('Z').split(':');
        let (h, m, s): (f64, f64, f64) = (
            hms.next()?.parse().ok()?,
            hms.next()?.parse().ok()?,
            hms.next()?.parse().ok()?,
        );
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let fetched = log.lines().rfind(|l| l.contains(": blob fetched "))?;
    let pulled = log.lines().find(|l| l.contains(": pulled "))?;
    let secs = time_of(pulled)? - time_of(fetched)?;
    // Across midnight.
    Some(if secs < 0.0 { secs + 86_400.0 } else { secs })
}

/// A containerd with its own root, state and socket; only what pulls need.
struct Containerd {
    dir: PathBuf,
    daemon: ChildGuard,
}

impl Containerd {
    fn start(dir: &Path) -> anyhow::Result<Containerd> {
        fs::create_dir_all(dir)?;
        let config = dir.join("config.toml");
        fs::write(&config, containerd_config(dir)?)?;
        let log = dir.join("containerd.log");
        let mut command = Command::new("containerd");
        command
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let mut daemon = ChildGuard::spawn(&mut command).context("starting containerd")?;
        wait_for_socket(&mut daemon, &dir.join("containerd.sock"), &log)?;
        Ok(Containerd {
            dir: dir.to_path_buf(),
            daemon,
        })
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["--namespace", NAMESPACE]);
        c
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// `ctr content ls -q`: digests of the blobs left.
    fn content(&self) -> anyhow::Result<Vec<String>> {
        let out = run_ok(self.ctr().args(["content", "ls", "-q"]))?;
        Ok(out.split_whitespace().map(str::to_string).collect())
    }

    /// `ctr snapshots ls`: keys of the snapshots left.
    fn snapshots(&self) -> anyhow::Result<Vec<String>> {
        let out = run_ok(self.ctr().args(["snapshots", "ls"]))?;
        Ok(out
            .lines()
            .skip(1) // KEY PARENT KIND
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }
}

impl Store for Containerd {
    fn name(&self) -> &'static str {
        "containerd"
    }

    fn pull(&self, reference: &str) -> anyhow::Result<Option<f64>> {
        run_ok(
            self.ctr()
                .args(["images", "pull", "--plain-http", reference]),
        )?;
        Ok(None)
    }

    fn usage(&self) -> anyhow::Result<Usage> {
        let root = self.root();
        Ok(Usage {
            total: disk_usage(&root)?,
            blobs: disk_usage(&root.join(CONTENT))?,
            unpacked: disk_usage(&root.join(OVERLAYFS))?,
        })
    }

    fn remove(&self, reference: &str) -> anyhow::Result<()> {
        // --sync: the garbage collection runs before ctr returns.
        run_ok(self.ctr().args(["images", "rm", "--sync", reference]))?;
        // Whatever the collection kept goes explicitly, children first (a
        // snapshot with children cannot be removed): a few rounds.
        for _ in 0..10 {
            let (content, snapshots) = (self.content()?, self.snapshots()?);
            if content.is_empty() && snapshots.is_empty() {
                return Ok(());
            }
            eprintln!(
                "bench: containerd kept {} blobs and {} snapshots after removal; removing them",
                content.len(),
                snapshots.len()
            );
            if !content.is_empty() {
                let _ = run_ok(self.ctr().args(["content", "rm"]).args(&content));
            }
            for key in snapshots.iter().rev() {
                let _ = run_ok(self.ctr().args(["snapshots", "rm", key]));
            }
        }
        bail!("containerd still holds content or snapshots after removing {reference}")
    }

    fn check_empty(&self) -> anyhow::Result<()> {
        let images = run_ok(self.ctr().args(["images", "ls", "-q"]))?;
        let (content, snapshots) = (self.content()?, self.snapshots()?);
        if !images.trim().is_empty() || !content.is_empty() || !snapshots.is_empty() {
            bail!(
                "containerd is not empty: images {images:?}, content {content:?}, \
                 snapshots {snapshots:?}"
            );
        }
        // And on disk, not only in its metadata.
        let root = self.root();
        for dir in [
            root.join(CONTENT).join("blobs"),
            root.join(CONTENT).join("ingest"),
            root.join(OVERLAYFS).join("snapshots"),
        ] {
            let left = files_under(&dir)?;
            if !left.is_empty() {
                bail!("containerd left files: {left:?}");
            }
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        // A containerd killed mid-unpack may leave a mount in its root;
        // removing the temp dir must not reach through it.
        frakti_bench::unmount_under(&self.dir);
    }
}

/// containerd's config: everything under `dir`; plugins that pulls do not
/// need and that fail or touch the host are off.
fn containerd_config(dir: &Path) -> anyhow::Result<String> {
    let q = |p: PathBuf| serde_json::to_string(&p.display().to_string());
    Ok(format!(
        r#"version = 2
root = {root}
state = {state}
# Do not touch the benchmark's own OOM score.
oom_score = 0
# cri: not needed, and fails on this host's cgroup v1 / oom_score_adj
# restrictions; opt: would create /opt/containerd; the others only log
# failures at start. overlayfs (the default snapshotter) stays.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {socket}
"#,
        root = q(dir.join("root"))?,
        state = q(dir.join("state"))?,
        socket = q(dir.join("containerd.sock"))?,
    ))
}

/// "1.6.20~ds1" from `containerd --version`.
fn containerd_version() -> anyhow::Result<String> {
    let out = run_ok(Command::new("containerd").arg("--version"))?;
    Ok(out.split_whitespace().nth(2).unwrap_or("?").to_string())
}

/// Waits until the daemon accepts connections on `socket`.
fn wait_for_socket(daemon: &mut ChildGuard, socket: &Path, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while UnixStream::connect(socket).is_err() {
        if let Some(status) = daemon.try_wait()? {
            bail!("daemon exited ({status}):\n{}", read_log(log));
        }
        if Instant::now() > deadline {
            bail!(
                "no socket {} within {START_TIMEOUT:?}:\n{}",
                socket.display(),
                read_log(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs `cmd` to completion; its stdout, or an error with all its output.
fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", support::describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}{}",
            support::describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Bytes allocated under `path` as `du -s` counts them (st_blocks * 512,
/// each inode once, directories included, not crossing into other
/// filesystems); 0 if it does not exist. The same for both runtimes.
fn disk_usage(path: &Path) -> io::Result<u64> {
    let root = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let dev = root.dev();
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![(path.to_path_buf(), root)];
    while let Some((p, m)) = stack.pop() {
        if m.dev() != dev {
            continue;
        }
        if seen.insert(m.ino()) {
            total += m.blocks() * 512;
        }
        if m.is_dir() {
            for entry in fs::read_dir(&p)? {
                let entry = entry?;
                stack.push((entry.path(), entry.metadata()?));
            }
        }
    }
    Ok(total)
}

/// Everything but directories under `dir` (none if it does not exist).
fn files_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    Ok(files)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted
        .get(rank.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// One of [`Usage`]'s numbers.
type UsageField = fn(&Usage) -> u64;

fn median_usage(usage: &[Usage], field: UsageField) -> f64 {
    let values: Vec<f64> = usage.iter().map(|u| field(u) as f64).collect();
    percentile(&values, 50.0)
}

fn print_method(args: &Args, containerd: &str) {
    println!(
        "image pull from a local registry (docker-registry, 127.0.0.1): frakti vs containerd {containerd}"
    );
    println!(
        "  frakti: `frakti image pull` = fetch + unpack + one EROFS disk (mkfs.erofs); \
         containerd: `ctr images pull --plain-http` = fetch + unpack into overlayfs snapshots"
    );
    println!(
        "  noise: {} pulls per image each, alternating which goes first; each into an empty store \
         (image removed + GC'd, checked empty) after a sync; medians and p90s",
        args.runs
    );
    println!(
        "  time = the CLI command's wall clock; on disk = allocated bytes (st_blocks) of frakti's \
         images/ vs containerd's root, after the pull"
    );
}

fn report(image: &BenchImage, frakti: &Samples, containerd: &Samples) {
    const MIB: f64 = 1024.0 * 1024.0;
    println!();
    println!(
        "{}: {:.2} MiB to fetch",
        image.label,
        image.fetch_bytes as f64 / MIB
    );
    println!(
        "  {:<26} {:>12} {:>12} {:>18}",
        "", "frakti", "containerd", "frakti/containerd"
    );
    for (name, p) in [("pull time median", 50.0), ("pull time p90", 90.0)] {
        let (ours, theirs) = (percentile(&frakti.secs, p), percentile(&containerd.secs, p));
        println!(
            "  {name:<26} {:>10.3} s {:>10.3} s {:>17.2}x",
            ours,
            theirs,
            ours / theirs
        );
    }
    if !frakti.after_fetch.is_empty() {
        let ours = percentile(&frakti.after_fetch, 50.0);
        println!(
            "  {:<26} {ours:>10.3} s {:>12} ({:.0}% of frakti's pull)",
            "  frakti unpack + disk",
            "",
            100.0 * ours / percentile(&frakti.secs, 50.0)
        );
    }
    let sizes: [(&str, UsageField); 3] = [
        ("on disk", |u| u.total),
        ("  blobs / content store", |u| u.blobs),
        ("  EROFS disk / snapshots", |u| u.unpacked),
    ];
    for (name, field) in sizes {
        let ours = median_usage(&frakti.usage, field);
        let theirs = median_usage(&containerd.usage, field);
        println!(
            "  {name:<26} {:>8.2} MiB {:>8.2} MiB {:>17.2}x",
            ours / MIB,
            theirs / MIB,
            ours / theirs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![1u8; 64 * 1024]).unwrap();
        let once = disk_usage(dir.path()).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        assert_eq!(disk_usage(dir.path()).unwrap(), once);
        assert!(once >= 64 * 1024);
        assert_eq!(disk_usage(&dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn files_under_skips_directories() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        assert!(files_under(dir.path()).unwrap().is_empty());
        fs::write(dir.path().join("blobs/sha256/x"), b"x").unwrap();
        assert_eq!(files_under(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn time_after_the_fetch_comes_from_the_daemon_log() {
        let log = "\
2026-12-04T23:59:58.500000Z  INFO frakti_cri::image::pull: blob fetched image=a digest=sha256:1 bytes=1
2026-12-04T23:59:59.000000Z  INFO frakti_cri::image::pull: blob fetched image=a digest=sha256:2 bytes=2
2026-12-05T00:00:01.250000Z  INFO frakti_cri::image::pull: pulled image=a id=sha256:3 disk_size=4
";
        assert_eq!(after_fetch_secs(log), Some(2.25));
        assert_eq!(after_fetch_secs("no pull here"), None);
    }

    #[test]
    fn percentiles() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 90.0), 5.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
