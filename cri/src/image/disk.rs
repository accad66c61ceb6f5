//! An image's unpacked tree becomes one read-only filesystem image that
//! pod VMs attach as a virtio-blk disk: EROFS by default (read-only by
//! design, compressed, sized by itself; see docs/performance.md), or
//! ext4 (`mkfs.ext4 -d`, sized from the tree).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown disk format '{0}' (erofs or ext4)")]
    UnknownFormat(String),
    #[error("unknown EROFS compression '{0}' (none, lz4 or lz4hc)")]
    UnknownCompression(String),
    #[error("cannot run {program} (is {package} installed?)")]
    Spawn {
        program: String,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("the tree is too large for an ext4 image")]
    TooLarge,
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// EROFS data compression. None by default: building is as fast as
/// copying (lz4hc took 77 s for 128 MiB of incompressible data, lz4 3.7 s,
/// none 0.3 s) and the guest reads without decompressing; the layers'
/// compressed blobs stay in the content store anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErofsCompression {
    #[default]
    None,
    Lz4,
    Lz4hc,
}

impl FromStr for ErofsCompression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(ErofsCompression::None),
            "lz4" => Ok(ErofsCompression::Lz4),
            "lz4hc" => Ok(ErofsCompression::Lz4hc),
            other => Err(Error::UnknownCompression(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Erofs,
    Ext4,
}

impl DiskFormat {
    /// The filesystem type the guest mounts it with.
    pub fn fs_type(self) -> &'static str {
        match self {
            DiskFormat::Erofs => "erofs",
            DiskFormat::Ext4 => "ext4",
        }
    }
}

impl FromStr for DiskFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "erofs" => Ok(DiskFormat::Erofs),
            "ext4" => Ok(DiskFormat::Ext4),
            other => Err(Error::UnknownFormat(other.to_string())),
        }
    }
}

/// What a tree holds: sizes for the ext4 image and for ImageFsInfo.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeUsage {
    pub inodes: u64,
    /// Bytes in 4 KiB blocks, as a filesystem would allocate them.
    pub block_bytes: u64,
}

/// Walks `root` without following symlinks.
pub fn tree_usage(root: &Path) -> Result<TreeUsage, Error> {
    let mut usage = TreeUsage::default();
    let mut linked = std::collections::HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        usage.inodes += 1;
        usage.block_bytes = usage.block_bytes.saturating_add(4096);
        let entries = fs::read_dir(&dir).map_err(io_error("cannot list", &dir))?;
        for entry in entries {
            let entry = entry.map_err(io_error("cannot list", &dir))?;
            let meta = entry
                .metadata()
                .map_err(io_error("cannot stat", &entry.path()))?;
            if meta.is_dir() {
                pending.push(entry.path());
                continue;
            }
            // Hard links share blocks; count each inode once.
            if meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.inodes += 1;
            usage.block_bytes = usage
                .block_bytes
                .saturating_add(meta.len().div_ceil(4096) * 4096);
        }
    }
    Ok(usage)
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// Builds the disk for `tree` at `out` (overwritten). Returns its size.
pub fn build(
    format: DiskFormat,
    compression: ErofsCompression,
    tree: &Path,
    out: &Path,
) -> Result<u64, Error> {
    let _ = fs::remove_file(out);
    match format {
        DiskFormat::Erofs => build_erofs(compression, tree, out)?,
        DiskFormat::Ext4 => build_ext4(tree, out)?,
    }
    let meta = fs::metadata(out).map_err(io_error("cannot stat", out))?;
    Ok(meta.len())
}

fn build_erofs(compression: ErofsCompression, tree: &Path, out: &Path) -> Result<(), Error> {
    let mut command = Command::new("mkfs.erofs");
    // Per-file mtimes kept, as in the layers.
    command.args(["--quiet", "--preserve-mtime"]);
    match compression {
        ErofsCompression::None => {}
        ErofsCompression::Lz4 => {
            command.arg("-zlz4");
        }
        ErofsCompression::Lz4hc => {
            command.arg("-zlz4hc");
        }
    }
    command.arg(out).arg(tree);
    run(command, "erofs-utils")
}

fn build_ext4(tree: &Path, out: &Path) -> Result<(), Error> {
    let usage = tree_usage(tree)?;
    // Data blocks + 256-byte inodes + metadata slack (bitmaps, group
    // descriptors, directory growth): 10 % and 16 MiB.
    let inodes = usage
        .inodes
        .saturating_add(usage.inodes / 10)
        .saturating_add(64);
    let bytes = usage
        .block_bytes
        .checked_add(inodes.checked_mul(256).ok_or(Error::TooLarge)?)
        .and_then(|b| b.checked_add(b / 10))
        .and_then(|b| b.checked_add(16 << 20))
        .ok_or(Error::TooLarge)?;
    let file = fs::File::create(out).map_err(io_error("cannot create", out))?;
    file.set_len(bytes.div_ceil(4096) * 4096)
        .map_err(io_error("cannot size", out))?;
    drop(file);
    let mut command = Command::new("mkfs.ext4");
    command
        .args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0"])
        .args(["-O", "^has_journal,^resize_inode"])
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(out);
    run(command, "e2fsprogs")
}

fn run(mut command: Command, package: &'static str) -> Result<(), Error> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            package,
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    stderr.push_str(&String::from_utf8_lossy(&output.stdout));
    let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
    Err(Error::Failed {
        program,
        status: output.status.to_string(),
        stderr: tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tree(dir: &Path) -> PathBuf {
        let root = dir.join("tree");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/file"), vec![7u8; 10_000]).unwrap();
        fs::hard_link(root.join("a/file"), root.join("a/link")).unwrap();
        std::os::unix::fs::symlink("file", root.join("a/sym")).unwrap();
        root
    }

    #[test]
    fn usage_counts_blocks_and_inodes_once_per_hard_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = sample_tree(dir.path());
        let usage = tree_usage(&root).unwrap();
        // root, a, a/b (dirs) + file (+link once) + sym
        assert_eq!(usage.inodes, 5);
        assert_eq!(usage.block_bytes, 3 * 4096 + 12288 + 4096);
    }

    #[test]
    fn formats_parse() {
        assert_eq!("erofs".parse::<DiskFormat>().unwrap(), DiskFormat::Erofs);
        assert_eq!("ext4".parse::<DiskFormat>().unwrap().fs_type(), "ext4");
        assert!("xfs".parse::<DiskFormat>().is_err());
        assert_eq!(
            "lz4".parse::<ErofsCompression>().unwrap(),
            ErofsCompression::Lz4
        );
        assert!("gzip".parse::<ErofsCompression>().is_err());
    }

    /// Both formats build from a real tree (mkfs.erofs and mkfs.ext4 are
    /// test dependencies: erofs-utils, e2fsprogs); the guest side is
    /// checked by the lab tests. `dump.erofs`/`debugfs` confirm contents.
    #[test]
    fn both_formats_build_and_hold_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = sample_tree(dir.path());
        let erofs = dir.path().join("d.erofs");
        for compression in [ErofsCompression::None, ErofsCompression::Lz4] {
            let size = build(DiskFormat::Erofs, compression, &root, &erofs).unwrap();
            assert!(size > 0 && size % 4096 == 0, "erofs size {size}");
        }
        let ext4 = dir.path().join("d.ext4");
        build(DiskFormat::Ext4, ErofsCompression::None, &root, &ext4).unwrap();
        let out = Command::new("debugfs")
            .args(["-R", "stat /a/file"])
            .arg(&ext4)
            .output()
            .expect("debugfs (e2fsprogs)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Size: 10000"), "{text}");
        assert!(text.contains("Links: 2"), "{text}");
    }

    #[test]
    fn a_failing_mkfs_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-tree");
        let err = build(
            DiskFormat::Erofs,
            ErofsCompression::None,
            &missing,
            &dir.path().join("x"),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{err}");
    }
}
