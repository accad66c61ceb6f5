//! The host's part of the CRI benchmark: the busybox test image and a pause
//! image built here (frakti's image store tarred, OCI archives for
//! containerd), the binaries both runtimes need, and the L1 kernel's
//! modules containerd needs (overlayfs, bridge, veth). Each is an `(env var,
//! file)` pair: the lab copies the file into L1 and sets the variable.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, anyhow, bail, ensure};
use frakti_cri::image::{ImageStore, StoreConfig};

use crate::support::{self, images};

/// The image both runtimes run (the CRI e2e suite's).
pub const IMAGE: &str = "frakti.test/busybox:latest";
pub const IMAGE_BASE: &str = "frakti.test/busybox";
/// containerd's sandbox image: busybox whose Cmd sleeps for ever.
pub const PAUSE_IMAGE: &str = "frakti.test/pause:latest";
pub const PAUSE_BASE: &str = "frakti.test/pause";
/// busybox + `/bin/frakti-guest-tool` (its `blockio`), for the volume I/O
/// part.
pub const BLOCKIO_IMAGE: &str = "frakti.test/blockio:latest";
pub const BLOCKIO_BASE: &str = "frakti.test/blockio";

pub const FRAKTI_ENV: &str = "BENCH_CRI_FRAKTI";
/// frakti's image store holding [`IMAGE`], tarred.
pub const STORE_ENV: &str = "BENCH_CRI_STORE";
/// OCI archives (`ctr images import`) of the two images.
pub const BUSYBOX_OCI_ENV: &str = "BENCH_CRI_BUSYBOX_OCI";
pub const PAUSE_OCI_ENV: &str = "BENCH_CRI_PAUSE_OCI";
pub const BLOCKIO_OCI_ENV: &str = "BENCH_CRI_BLOCKIO_OCI";

/// containerd's side: (env var, program on PATH or absolute path, Debian
/// package).
pub const TOOLS: &[(&str, &str, &str)] = &[
    (CONTAINERD_ENV, "containerd", "containerd"),
    (CTR_ENV, "ctr", "containerd"),
    (SHIM_ENV, "containerd-shim-runc-v2", "containerd"),
    (RUNC_ENV, "runc", "runc"),
    (
        CNI_BRIDGE_ENV,
        "/usr/lib/cni/bridge",
        "containernetworking-plugins",
    ),
    (
        CNI_LOOPBACK_ENV,
        "/usr/lib/cni/loopback",
        "containernetworking-plugins",
    ),
    (
        CNI_HOST_LOCAL_ENV,
        "/usr/lib/cni/host-local",
        "containernetworking-plugins",
    ),
];
pub const CONTAINERD_ENV: &str = "BENCH_CRI_CONTAINERD";
pub const CTR_ENV: &str = "BENCH_CRI_CTR";
pub const SHIM_ENV: &str = "BENCH_CRI_SHIM";
pub const RUNC_ENV: &str = "BENCH_CRI_RUNC";
pub const CNI_BRIDGE_ENV: &str = "BENCH_CRI_CNI_BRIDGE";
pub const CNI_LOOPBACK_ENV: &str = "BENCH_CRI_CNI_LOOPBACK";
pub const CNI_HOST_LOCAL_ENV: &str = "BENCH_CRI_CNI_HOST_LOCAL";

/// Modules of the L1 kernel containerd needs and the lab does not load, in
/// load order (dependencies first), relative to `lib/modules/<v>/kernel`.
pub const MODULES: &[(&str, &str)] = &[
    ("BENCH_CRI_KMOD_LLC", "net/llc/llc.ko"),
    ("BENCH_CRI_KMOD_STP", "net/802/stp.ko"),
    ("BENCH_CRI_KMOD_BRIDGE", "net/bridge/bridge.ko"),
    ("BENCH_CRI_KMOD_VETH", "drivers/net/veth.ko"),
    ("BENCH_CRI_KMOD_OVERLAY", "fs/overlayfs/overlay.ko"),
];

/// The file the variable `name` names (set by the lab, or by `main` on a
/// host that runs the benchmark itself).
pub fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{name} is not set"))
}

/// Everything the benchmark needs, made or found under `dir`; `nested`:
/// it will run in the lab, so the L1 kernel's modules go too.
pub fn prepare(dir: &Path, nested: bool) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let mut files = vec![(FRAKTI_ENV, frakti_bench::frakti_binary()?)];
    for (env, tool, package) in TOOLS {
        let Some(path) = support::find_tool(tool) else {
            bail!("`{tool}` is not installed: apt-get install -y {package}");
        };
        files.push((*env, path));
    }
    for tool in ["tar", "busybox"] {
        ensure!(
            support::find_tool(tool).is_some(),
            "`{tool}` is not installed (apt-get install -y {tool})"
        );
    }
    eprintln!("bench: building the busybox and pause images");
    let layouts = dir.join("layouts");
    let busybox = images::busybox_image(&layouts);
    let pause_config = images::ImageConfig {
        cmd: vec!["sleep".into(), "2147483647".into()],
        ..Default::default()
    };
    let pause = images::busybox_image_with(&layouts, "pause", &pause_config);
    let tool = fs::read(frakti_lab::guest::guest_tool_binary()?)?;
    let blockio = images::build_image(
        &layouts,
        "blockio",
        &images::ImageConfig::default(),
        &[
            images::LayerSpec::new(images::Compression::Gzip, images::busybox_entries()),
            images::LayerSpec::new(
                images::Compression::Gzip,
                vec![images::TarEntry::file("bin/frakti-guest-tool", 0o755, tool)],
            ),
        ],
    );
    files.push((
        frakti_lab::guest::MKE2FS_ENV,
        frakti_lab::guest::mke2fs_binary()?,
    ));

    // frakti's store, filled here (mkfs.erofs runs on the host), as the
    // CRI e2e suite's harness prepares it.
    let store_root = dir.join("cri-store");
    let store = ImageStore::open(StoreConfig::new(&store_root))?;
    let imports = async {
        store.import(&busybox.layout, Some(IMAGE_BASE)).await?;
        store.import(&blockio.layout, Some(BLOCKIO_BASE)).await
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(imports)
        .context("importing the busybox and blockio images into frakti's store")?;
    drop(store);
    let store_tar = dir.join("cri-store.tar");
    tar(&store_root, &store_tar)?;
    files.push((STORE_ENV, store_tar));

    for (env, image, name) in [
        (BUSYBOX_OCI_ENV, &busybox, "busybox-oci.tar"),
        (PAUSE_OCI_ENV, &pause, "pause-oci.tar"),
        (BLOCKIO_OCI_ENV, &blockio, "blockio-oci.tar"),
    ] {
        let archive = dir.join(name);
        tar(&image.layout, &archive)?;
        files.push((env, archive));
    }
    if nested {
        files.extend(l1_modules()?);
    }
    Ok(files)
}

/// `tar -C dir -cf out .`
fn tar(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let status = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .context("cannot run tar")?;
    ensure!(
        status.success(),
        "tar of {} failed ({status})",
        dir.display()
    );
    Ok(())
}

/// [`MODULES`] of the lab's L1 kernel, taken once from its Debian package
/// (`apt-get download`, as the lab fetches the kernel) into
/// `$FRAKTI_CACHE/bench-cri/<package>/`. A module the kernel has built in
/// is left out.
fn l1_modules() -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let cache = frakti_lab::cache_dir();
    let package = frakti_lab::l1::L1Kernel::ensure(&cache)?.package;
    let dir = cache.join("bench-cri").join(&package);
    // Written last: lists the modules kept.
    let manifest = dir.join("modules.list");
    if !manifest.is_file() {
        eprintln!(
            "bench: fetching modules of {package} (overlay, bridge, veth) for containerd in L1"
        );
        let staging = cache.join("bench-cri").join(format!("{package}.partial"));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)?;
        run(Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&staging))?;
        let deb = fs::read_dir(&staging)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let root = staging.join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        let version_dir = fs::read_dir(root.join("lib/modules"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .next()
            .with_context(|| format!("{package} has no lib/modules/<version>"))?;
        let builtin = fs::read_to_string(version_dir.join("modules.builtin")).unwrap_or_default();
        let mut kept = String::new();
        for (_, module) in MODULES {
            let source = version_dir.join("kernel").join(module);
            if !source.is_file() {
                if builtin.lines().any(|l| l == format!("kernel/{module}")) {
                    continue;
                }
                bail!("{package} has no {module}, neither as a module nor built in");
            }
            let name = module_file(module);
            fs::copy(&source, staging.join(name))?;
            kept.push_str(&format!("{name}\n"));
        }
        fs::remove_dir_all(&root)?;
        fs::remove_file(&deb)?;
        fs::write(staging.join("modules.list"), kept)?;
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&staging, &dir)?;
    }
    let kept = fs::read_to_string(&manifest)?;
    Ok(MODULES
        .iter()
        .filter(|(_, module)| kept.lines().any(|l| l == module_file(module)))
        .map(|(env, module)| (*env, dir.join(module_file(module))))
        .collect())
}

/// "net/llc/llc.ko" → "llc.ko".
fn module_file(module: &str) -> &str {
    module.rsplit('/').next().unwrap_or(module)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", support::describe(cmd)))?;
    ensure!(
        out.status.success(),
        "{} failed ({}): {}",
        support::describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
