//! `frakti-guest-tool tree ROOT`: one JSON line per path under ROOT (not
//! following symlinks) with what an image disk must preserve: kind, mode,
//! owner, link target, size, content hash, device numbers, mtime, link
//! count, hard-link group and xattrs. The lab compares a mounted image disk
//! with the tree the image's layers should give.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else {
        "socket"
    }
}

fn sha256(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("sha256:{hex}"))
}

/// The path's xattrs (not following symlinks), values hex-encoded.
fn xattrs(path: &Path) -> io::Result<BTreeMap<String, String>> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: c_path is NUL-terminated; names is a writable buffer of the
    // length passed.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = BTreeMap::new();
    let len = usize::try_from(len).map_err(io::Error::other)?;
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name).map_err(io::Error::other)?;
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: both strings are NUL-terminated; value is writable for
        // the length passed.
        let n = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = usize::try_from(n).map_err(io::Error::other)?;
        let hex: String = value[..n].iter().map(|b| format!("{b:02x}")).collect();
        out.insert(String::from_utf8_lossy(name).into_owned(), hex);
    }
    Ok(out)
}

/// Prints the tree under `root` to `out`, sorted by path.
pub fn print_tree(root: &Path, out: &mut impl Write) -> io::Result<()> {
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if std::fs::symlink_metadata(&path)?.is_dir() {
                stack.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths.sort();
    let mut inodes: HashMap<u64, Vec<String>> = HashMap::new();
    let mut lines = Vec::new();
    for path in &paths {
        let meta = std::fs::symlink_metadata(path)?;
        let rel = path
            .strip_prefix(root)
            .map_err(io::Error::other)?
            .to_string_lossy()
            .into_owned();
        let ft = meta.file_type();
        if !ft.is_dir() {
            inodes.entry(meta.ino()).or_default().push(rel.clone());
        }
        let mut line = serde_json::json!({
            "path": rel,
            "kind": kind(ft),
            "mode": meta.mode() & 0o7777,
            "uid": meta.uid(),
            "gid": meta.gid(),
            "mtime": meta.mtime(),
            "nlink": meta.nlink(),
            "ino": meta.ino(),
            "xattrs": xattrs(path)?,
        });
        if ft.is_symlink() {
            line["link"] = std::fs::read_link(path)?
                .to_string_lossy()
                .into_owned()
                .into();
            line["size"] = meta.len().into();
        } else if ft.is_file() {
            line["size"] = meta.len().into();
            line["sha256"] = sha256(path)?.into();
        } else if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            line["rdev"] = serde_json::json!([libc::major(rdev), libc::minor(rdev)]);
        }
        lines.push(line);
    }
    for line in &mut lines {
        let same: Vec<String> = line["ino"]
            .as_u64()
            .and_then(|ino| inodes.get(&ino))
            .map(|group| {
                group
                    .iter()
                    .filter(|p| Some(p.as_str()) != line["path"].as_str())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        line["hardlinks"] = same.into();
        writeln!(out, "{line}")?;
    }
    Ok(())
}
