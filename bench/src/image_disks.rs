//! Image disk format: EROFS (uncompressed and lz4) against ext4 for the
//! same three images (tiny
//! busybox, many small files, one large layer), side by side in one run:
//! the host's build time (unpack + mkfs, through frakti's image store) and
//! disk size, and in a guest (inside the lab where the host needs it) the
//! time to mount the disk read-only, walk it (`find`) and read every file,
//! each disk in a fresh VM so every read is cold. Prints ratios
//! EROFS/ext4; the choice of the default format rests on it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use frakti_bench::{boot_until_line, frakti_command, median};
use frakti_cri::image::disk::{DiskFormat, ErofsCompression};
use frakti_cri::image::{ImageStore, StoreConfig};
use frakti_lab::guest::{self, GuestAssets};

#[path = "../../cri/tests/support/mod.rs"]
mod support;

/// EROFS vs ext4 image disks: build time, size, guest mount/walk/read.
#[derive(Debug, Parser)]
struct Args {
    /// Guest reads per disk (each in a new VM), alternating formats.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Files in the many-files image.
    #[arg(long, default_value_t = 5000)]
    files: usize,
    /// Size of the large layer's file, MiB.
    #[arg(long, default_value_t = 128)]
    big_mib: u64,
}

const IMAGES: [&str; 3] = ["busybox", "many-files", "big-layer"];
/// Variants compared: (name, format, EROFS compression); ext4 is last, the
/// reference of the ratios.
const VARIANTS: [(&str, DiskFormat, ErofsCompression); 3] = [
    ("erofs", DiskFormat::Erofs, ErofsCompression::None),
    ("erofs-lz4", DiskFormat::Erofs, ErofsCompression::Lz4),
    ("ext4", DiskFormat::Ext4, ErofsCompression::None),
];

/// Host-side figures written for the guest side (it runs in L1 as a new
/// process): one line per disk.
const FIGURES_ENV: &str = "FRAKTI_BENCH_DISK_FIGURES";

/// Mounts /dev/vda, walks it, reads every file, timed by the guest's clock.
const GUEST_SCRIPT: &str = r#"
mkdir -p /mnt
t0=$(cut -d' ' -f1 /proc/uptime)
mount -t "$(cat /sys/block/vda/serial)" -o ro /dev/vda /mnt || echo "@@ mount failed"
t1=$(cut -d' ' -f1 /proc/uptime)
n=$(find /mnt | wc -l)
t2=$(cut -d' ' -f1 /proc/uptime)
find /mnt -type f | xargs cat > /dev/null
t3=$(cut -d' ' -f1 /proc/uptime)
echo "@@ disk mount $t0 $t1 find $t2 read $t3 paths $n"
"#;

fn main() -> ExitCode {
    frakti_bench::exit(run(&Args::parse()))
}

/// One disk made on the host.
struct Disk {
    image: String,
    variant: String,
    format: DiskFormat,
    path: PathBuf,
    build_secs: f64,
    bytes: u64,
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let mut programs = vec![(guest::VMM_ENV, guest::vmm_binary()?)];
    // The host part runs once; in L1 the figures arrive as a file.
    if std::env::var_os(FIGURES_ENV).is_none() {
        let disks = build_disks(args, dir.path())?;
        let figures = dir.path().join("figures.txt");
        let mut text = String::new();
        for (i, d) in disks.iter().enumerate() {
            let env = disk_env(i);
            text.push_str(&format!(
                "{} {} {} {} {} {env}\n",
                d.image,
                d.variant,
                d.format.fs_type(),
                d.build_secs,
                d.bytes
            ));
            programs.push((leak(env), d.path.clone()));
        }
        std::fs::write(&figures, text)?;
        programs.push((FIGURES_ENV, figures));
    }
    if let Some(code) = frakti_bench::here_or_in_lab(&programs)? {
        return Ok(code);
    }
    for (env, path) in &programs {
        if std::env::var_os(env).is_none() {
            // SAFETY: single-threaded here; nothing reads the environment
            // concurrently.
            unsafe { std::env::set_var(env, path) };
        }
    }
    let disks = read_figures()?;
    let reads = guest_reads(args, &disks, dir.path())?;
    report(args, &disks, &reads);
    Ok(ExitCode::SUCCESS)
}

fn disk_env(i: usize) -> String {
    format!("FRAKTI_BENCH_DISK_{i}")
}

/// Environment names live for the whole run.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn build_disks(args: &Args, dir: &Path) -> anyhow::Result<Vec<Disk>> {
    use support::images::{self, Compression};
    let layouts = dir.join("layouts");
    let built = [
        images::busybox_image(&layouts),
        images::many_files_image(&layouts, args.files),
        images::big_layer_image_with(&layouts, args.big_mib, Compression::Gzip),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut disks = Vec::new();
    for (name, image) in IMAGES.iter().zip(&built) {
        for (variant, format, compression) in VARIANTS {
            let mut config = StoreConfig::new(&dir.join(format!("store-{name}-{variant}")));
            config.disk_format = format;
            config.erofs_compression = compression;
            let store = ImageStore::open(config)?;
            let started = Instant::now();
            let record = runtime
                .block_on(store.import(&image.layout, Some("bench.local/image")))?
                .pop()
                .context("nothing imported")?;
            disks.push(Disk {
                image: name.to_string(),
                variant: variant.to_string(),
                format,
                path: store.root().join("disks").join(&record.disk),
                build_secs: started.elapsed().as_secs_f64(),
                bytes: record.disk_size,
            });
        }
    }
    Ok(disks)
}

fn read_figures() -> anyhow::Result<Vec<Disk>> {
    let path = std::env::var_os(FIGURES_ENV).context("no figures")?;
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [image, variant, format, secs, bytes, env] = f.as_slice() else {
                bail!("bad figures line {line:?}");
            };
            Ok(Disk {
                image: image.to_string(),
                variant: variant.to_string(),
                format: format.parse()?,
                build_secs: secs.parse()?,
                bytes: bytes.parse()?,
                path: std::env::var_os(env)
                    .map(PathBuf::from)
                    .with_context(|| format!("{env} unset"))?,
            })
        })
        .collect()
}

/// Guest seconds (mount, find, read) per disk, medians over the runs.
fn guest_reads(args: &Args, disks: &[Disk], dir: &Path) -> anyhow::Result<Vec<[f64; 3]>> {
    let guest_assets = GuestAssets::locate()?;
    let vmm = guest::vmm_binary()?;
    let initrd = dir.join("read-initrd.cpio");
    guest::build_script_initrd(GUEST_SCRIPT, &initrd)?;
    let mut samples: Vec<Vec<[f64; 3]>> = vec![Vec::new(); disks.len()];
    for run in 0..args.runs {
        // Alternate which format of each image goes first.
        let mut order: Vec<usize> = (0..disks.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let disk = &disks[i];
            let console = dir.join(format!("console-{i}-{run}.log"));
            let mut command = frakti_command(&vmm, &guest_assets.kernel, &initrd, &console);
            command.arg("--disk").arg(format!(
                "serial={},path={},ro",
                disk.format.fs_type(),
                disk.path.display()
            ));
            samples[i].push(read_once(&mut command, &console)?);
        }
    }
    Ok(samples
        .into_iter()
        .map(|s| {
            let of = |k: usize| median(&mut s.iter().map(|x| x[k]).collect::<Vec<_>>());
            [of(0), of(1), of(2)]
        })
        .collect())
}

/// Boots, waits for the guest's result line: (mount, find, read) seconds.
fn read_once(command: &mut Command, console: &Path) -> anyhow::Result<[f64; 3]> {
    let line = boot_until_line(command, console, "@@ ")?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> anyhow::Result<f64> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("guest said {line:?}"))
    };
    // "@@ disk mount t0 t1 find t2 read t3 paths n"
    let (t0, t1, t2, t3) = (num(3)?, num(4)?, num(6)?, num(8)?);
    Ok([t1 - t0, t2 - t1, t3 - t2])
}

fn report(args: &Args, disks: &[Disk], reads: &[[f64; 3]]) {
    println!(
        "image disks, EROFS (mkfs.erofs, uncompressed and -zlz4) vs ext4 (mkfs.ext4 -d), same layers; guest times are medians of {} cold boots:",
        args.runs
    );
    println!(
        "  {:<11} {:<9} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "image", "format", "build s", "size MiB", "mount s", "find s", "read s"
    );
    for (d, r) in disks.iter().zip(reads) {
        println!(
            "  {:<11} {:<9} {:>9.2} {:>10.1} {:>9.2} {:>9.2} {:>9.2}",
            d.image,
            d.variant,
            d.build_secs,
            d.bytes as f64 / (1 << 20) as f64,
            r[0],
            r[1],
            r[2]
        );
    }
    println!("ratios to ext4 (below 1: smaller or faster):");
    let n = VARIANTS.len();
    for (group, reads) in disks.chunks(n).zip(reads.chunks(n)) {
        let (Some(ext4), Some(ext4_reads)) = (group.last(), reads.last()) else {
            continue;
        };
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        for (d, r) in group.iter().zip(reads).take(n - 1) {
            println!(
                "  {:<11} {:<9} build {:.2}x  size {:.2}x  mount+find+read {:.2}x",
                d.image,
                d.variant,
                ratio(d.build_secs, ext4.build_secs),
                ratio(d.bytes as f64, ext4.bytes as f64),
                ratio(r.iter().sum(), ext4_reads.iter().sum()),
            );
        }
    }
}
