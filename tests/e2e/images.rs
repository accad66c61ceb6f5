//! Image disks in a real guest (issue 12): the host turns the layered test
//! image (whiteouts, opaque dirs, hard links, symlinks, setuid, a file
//! capability, owners, devices, a FIFO, mtimes; plus a layer holding
//! frakti-guest-tool) into an EROFS and an ext4 disk with frakti's image
//! store; the guest mounts each one read-only, a container lists it with
//! `frakti-guest-tool tree`, and the listing must be exactly the tree the
//! layers define.
//!
//! The disks are made on the host before the lab boots (`prepare`: mkfs
//! runs there) and reach the test through environment variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow, ensure};
use frakti_cri::image::disk::DiskFormat;
use frakti_cri::image::{ImageStore, StoreConfig};
use frakti_lab::vsock::AgentClient;
use frakti_proto::agent::v1 as pb;
use libtest_mimic::{Failed, Trial};
use serde_json::{Value, json};

use crate::agent::{Vm, read_all, spec, start, step, wait};
use crate::support::images::{
    self, Compression, ExpectedEntry, ExpectedTree, Kind, LayerSpec, TarEntry,
};

pub const EROFS_ENV: &str = "FRAKTI_TEST_IMAGE_EROFS";
pub const EXT4_ENV: &str = "FRAKTI_TEST_IMAGE_EXT4";
pub const TREE_ENV: &str = "FRAKTI_TEST_IMAGE_TREE";

pub fn tests() -> Vec<Trial> {
    vec![Trial::test(
        "images::layered_image_disks_hold_exactly_the_layers_tree",
        layered_image_disks_hold_exactly_the_layers_tree,
    )]
}

/// Host files the test needs, made in `dir`: `(env var, path)` each.
pub struct Prepared {
    pub files: Vec<(&'static str, PathBuf)>,
}

/// Builds the layered image (+ guest-tool), imports it into two image
/// stores (EROFS and ext4), and writes the expected tree as JSON lines.
pub fn prepare(dir: &Path, guest_tool: &Path) -> anyhow::Result<Prepared> {
    let tool = std::fs::read(guest_tool).with_context(|| guest_tool.display().to_string())?;
    let mut layers = images::layered_layers();
    layers.push(LayerSpec::new(
        Compression::Gzip,
        vec![TarEntry::file("bin/frakti-guest-tool", 0o755, tool)],
    ));
    let built = images::build_image(
        &dir.join("layouts"),
        "layered-tool",
        &images::ImageConfig::default(),
        &layers,
    );
    let tree = images::expected_tree(&layers);
    let lines: Vec<String> = tree
        .entries
        .values()
        .map(|e| entry_to_json(e).to_string())
        .collect();
    let tree_path = dir.join("expected-tree.jsonl");
    std::fs::write(&tree_path, lines.join("\n"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut files = vec![(TREE_ENV, tree_path)];
    for (format, env) in [(DiskFormat::Erofs, EROFS_ENV), (DiskFormat::Ext4, EXT4_ENV)] {
        let mut config = StoreConfig::new(&dir.join(format!("store-{}", format.fs_type())));
        config.disk_format = format;
        let store = ImageStore::open(config)?;
        let made = Instant::now();
        let record = runtime
            .block_on(store.import(&built.layout, Some("frakti.test/layered")))?
            .pop()
            .ok_or_else(|| anyhow!("nothing imported"))?;
        let disk = store.root().join("disks").join(&record.disk);
        eprintln!(
            "images: {} disk of the layered image: {} bytes, imported in {:.2} s",
            format.fs_type(),
            record.disk_size,
            made.elapsed().as_secs_f64()
        );
        files.push((env, disk));
    }
    Ok(Prepared { files })
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::CharDevice => "char",
        Kind::BlockDevice => "block",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> anyhow::Result<Vec<u8>> {
    ensure!(text.len() % 2 == 0, "odd hex {text}");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|e| anyhow!("hex {text}: {e}")))
        .collect()
}

/// The same JSON shape `frakti-guest-tool tree` prints.
fn entry_to_json(e: &ExpectedEntry) -> Value {
    json!({
        "path": e.path, "kind": kind_name(&e.kind), "mode": e.mode, "uid": e.uid, "gid": e.gid,
        "link": e.link, "size": e.size, "sha256": e.sha256, "rdev": e.rdev.map(|(a, b)| [a, b]),
        "mtime": e.mtime, "nlink": e.nlink, "hardlinks": e.hardlinks,
        "xattrs": e.xattrs.iter().map(|(k, v)| (k.clone(), hex(v))).collect::<BTreeMap<_, _>>(),
    })
}

fn entry_from_json(v: &Value) -> anyhow::Result<ExpectedEntry> {
    let text = |k: &str| v[k].as_str().map(String::from);
    let num = |k: &str| v[k].as_u64();
    let kind = match v["kind"].as_str().unwrap_or_default() {
        "file" => Kind::File,
        "dir" => Kind::Dir,
        "symlink" => Kind::Symlink,
        "char" => Kind::CharDevice,
        "block" => Kind::BlockDevice,
        "fifo" => Kind::Fifo,
        "socket" => Kind::Socket,
        other => return Err(anyhow!("unknown kind {other:?} in {v}")),
    };
    let small = |k: &str| {
        num(k)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| anyhow!("{k} in {v}"))
    };
    let mut xattrs = BTreeMap::new();
    if let Some(map) = v["xattrs"].as_object() {
        for (name, value) in map {
            // As scan_tree: labels the guest adds are not the image's.
            if name == "security.selinux" || name.starts_with("trusted.overlay.") {
                continue;
            }
            xattrs.insert(name.clone(), unhex(value.as_str().unwrap_or_default())?);
        }
    }
    Ok(ExpectedEntry {
        path: text("path").ok_or_else(|| anyhow!("no path in {v}"))?,
        mode: small("mode")?,
        uid: small("uid")?,
        gid: small("gid")?,
        link: text("link"),
        size: if kind == Kind::Dir { None } else { num("size") },
        sha256: text("sha256"),
        rdev: v["rdev"].as_array().and_then(|a| {
            Some((
                u32::try_from(a.first()?.as_u64()?).ok()?,
                u32::try_from(a.get(1)?.as_u64()?).ok()?,
            ))
        }),
        mtime: if kind == Kind::File {
            v["mtime"].as_i64()
        } else {
            None
        },
        nlink: if kind == Kind::Dir {
            None
        } else {
            num("nlink")
        },
        hardlinks: v["hardlinks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        xattrs,
        kind,
    })
}

fn parse_tree(text: &str, skip: &[&str]) -> anyhow::Result<ExpectedTree> {
    let mut tree = ExpectedTree::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("tree line {line:?}"))?;
        let entry = entry_from_json(&value)?;
        if skip
            .iter()
            .any(|s| entry.path == *s || entry.path.starts_with(&format!("{s}/")))
        {
            continue;
        }
        tree.entries.insert(entry.path.clone(), entry);
    }
    Ok(tree)
}

fn env_path(var: &str) -> Result<PathBuf, Failed> {
    std::env::var_os(var).map(PathBuf::from).ok_or_else(|| {
        format!("{var} is not set: the suite's main prepares the image disks").into()
    })
}

fn layered_image_disks_hold_exactly_the_layers_tree() -> Result<(), Failed> {
    let erofs = env_path(EROFS_ENV)?;
    let ext4 = env_path(EXT4_ENV)?;
    let expected = std::fs::read_to_string(env_path(TREE_ENV)?)?;
    let expected = parse_tree(&expected, &[]).map_err(|e| format!("{e:#}"))?;
    let dir = tempfile::tempdir()?;
    let mut vm = Vm::boot_with_disks(dir.path(), &[("erofs", &erofs), ("ext4", &ext4)])?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(drive(&mut vm, &expected))
        .map_err(|e| format!("{e:#}\n{}", vm.diagnostics()).into())
}

async fn drive(vm: &mut Vm, expected: &ExpectedTree) -> anyhow::Result<()> {
    let mut client = vm.agent().await?;
    let c = &mut client;
    for format in ["erofs", "ext4"] {
        let t = Instant::now();
        let listing = list_disk(c, format).await?;
        // mkfs.ext4 makes lost+found; it is the filesystem's, not the image's.
        let skip: &[&str] = if format == "ext4" {
            &["lost+found"]
        } else {
            &[]
        };
        let actual = parse_tree(&listing, skip)?;
        let diff = expected.diff(&actual);
        ensure!(
            diff.is_empty(),
            "{format} disk differs from the layers' tree:\n  {}",
            diff.join("\n  ")
        );
        eprintln!(
            "  {format}: {} paths as the layers define them (modes, owners, links, hashes, xattrs, mtimes) in {:.2} s",
            actual.entries.len(),
            t.elapsed().as_secs_f64()
        );
    }
    vm.shutdown(c).await
}

/// Mounts the disk read-only in the guest and lists it from a container
/// whose root is the same disk (its guest-tool) with the mount bound in.
async fn list_disk(c: &mut AgentClient, format: &str) -> anyhow::Result<String> {
    step(
        "MountDisk",
        c.mount_disk(pb::MountDiskRequest {
            disk_id: format.into(),
            serial: format.into(),
            fs_type: format.into(),
            read_only: true,
            ..Default::default()
        }),
    )
    .await?;
    let mut s = spec(&["/bin/frakti-guest-tool", "tree", "/image"]);
    s["mounts"] = json!([
        {"destination": "/image", "type": "bind", "source": format!("/run/frakti/disks/{format}"), "options": ["rbind", "ro"]}
    ]);
    let id = format!("tree-{format}");
    let request = pb::CreateContainerRequest {
        container_id: id.clone(),
        oci_spec_json: serde_json::to_vec(&s)?,
        rootfs: Some(pb::Rootfs {
            source: Some(pb::rootfs::Source::DiskId(format.into())),
            writable_overlay: true,
            ..Default::default()
        }),
        devices: vec![],
    };
    step("CreateContainer", c.create_container(request)).await?;
    start(c, &id).await?;
    let out = read_all(c, &id, "", pb::OutputStream::Stdout).await?;
    let status = wait(c, &id, "").await?;
    ensure!(status.exit_code == 0, "tree in {format}: {status:?}\n{out}");
    step(
        "RemoveContainer",
        c.remove_container(pb::RemoveContainerRequest {
            container_id: id,
            grace_period_secs: 0,
        }),
    )
    .await?;
    Ok(out)
}
