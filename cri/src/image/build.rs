//! From stored blobs to an image disk: the layers are decompressed, checked
//! against the config's `diff_ids`, applied in order onto a scratch tree,
//! and the tree becomes the image's read-only disk.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::content::{ContentStore, Digest};
use super::disk::{self, DiskFormat, ErofsCompression};
use super::records::Layer;
use super::unpack::{self, Compression, Limits};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer {digest}")]
    Unpack {
        digest: Digest,
        #[source]
        source: unpack::Error,
    },
    #[error("layer {digest}: uncompressed digest {actual} does not match the config's {expected}")]
    DiffId {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error(transparent)]
    Content(#[from] super::content::Error),
    #[error(transparent)]
    Disk(#[from] disk::Error),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Hashes what passes through: the uncompressed layer's digest.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn decompressed(file: fs::File, compression: Compression) -> io::Result<Box<dyn Read>> {
    let file = io::BufReader::new(file);
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
    })
}

/// Applies one stored layer onto `tree` and checks its diff_id.
fn apply(content: &ContentStore, layer: &Layer, tree: &Path) -> Result<(), Error> {
    let unpack_error = |source| Error::Unpack {
        digest: layer.digest.clone(),
        source,
    };
    let compression = unpack::compression_for(&layer.media_type).map_err(unpack_error)?;
    let file = content.open_blob(&layer.digest)?;
    let path = content.path(&layer.digest);
    let reader = decompressed(file, compression).map_err(|source| Error::Io {
        what: "cannot decompress",
        path: path.clone(),
        source,
    })?;
    let mut hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
    };
    unpack::apply_layer(tree, &mut hashing, Compression::None, &Limits::default())
        .map_err(unpack_error)?;
    // The tar's trailing zero blocks (and anything after) count too.
    io::copy(&mut hashing, &mut io::sink()).map_err(|source| Error::Io {
        what: "cannot read",
        path,
        source,
    })?;
    let actual = Digest::from_hasher(hashing.hasher);
    if actual != layer.diff_id {
        return Err(Error::DiffId {
            digest: layer.digest.clone(),
            expected: layer.diff_id.clone(),
            actual,
        });
    }
    Ok(())
}

/// Builds the disk for `layers` at `out` using `scratch` (removed after,
/// whatever happens). Returns the disk's size.
pub fn build_disk(
    content: &ContentStore,
    layers: &[Layer],
    format: DiskFormat,
    compression: ErofsCompression,
    scratch: &Path,
    out: &Path,
) -> Result<u64, Error> {
    let result = build_in(content, layers, (format, compression), scratch, out);
    if let Err(e) = fs::remove_dir_all(scratch) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %scratch.display(), "cannot remove scratch tree: {e}");
        }
    }
    if result.is_err() {
        let _ = fs::remove_file(out);
    }
    result
}

fn build_in(
    content: &ContentStore,
    layers: &[Layer],
    (format, compression): (DiskFormat, ErofsCompression),
    scratch: &Path,
    out: &Path,
) -> Result<u64, Error> {
    let tree = scratch.join("rootfs");
    fs::create_dir_all(&tree).map_err(|source| Error::Io {
        what: "cannot create",
        path: tree.clone(),
        source,
    })?;
    for layer in layers {
        apply(content, layer, &tree)?;
    }
    save_account_files(&tree, out);
    Ok(disk::build(format, compression, &tree, out)?)
}

/// The largest /etc/passwd or /etc/group kept for user lookups.
const MAX_ACCOUNT_FILE: u64 = 1024 * 1024;
/// The image's account files the runtime resolves users and groups in.
pub const ACCOUNT_FILES: [&str; 2] = ["passwd", "group"];

/// Moves the account files made beside a disk built at `partial` to
/// beside its committed path `out`.
pub fn commit_account_files(partial: &Path, out: &Path) -> io::Result<()> {
    for name in ACCOUNT_FILES {
        match fs::rename(partial.with_extension(name), out.with_extension(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Keeps the image's /etc/passwd and /etc/group beside its disk (as
/// `<disk stem>.passwd`, `.group`): CreateContainer resolves
/// `run_as_username` and the image's `User` in them without mounting the
/// disk. Only regular files (not symlinks out of the tree) up to 1 MiB.
fn save_account_files(tree: &Path, disk: &Path) {
    for name in ACCOUNT_FILES {
        let source = tree.join("etc").join(name);
        let fits = fs::symlink_metadata(&source)
            .is_ok_and(|m| m.file_type().is_file() && m.len() <= MAX_ACCOUNT_FILE);
        if fits {
            if let Err(e) = fs::copy(&source, disk.with_extension(name)) {
                tracing::warn!(file = %source.display(), "cannot keep the image's account file: {e}");
            }
        }
    }
}
