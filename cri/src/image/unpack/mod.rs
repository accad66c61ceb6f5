//! Applies OCI image layers (tar streams, in order) onto a directory to
//! build an image's root filesystem, as containerd does: whiteouts remove
//! what lower layers made; owners, modes, xattrs and times come from the tar.
//!
//! A layer is untrusted input. Nothing outside the root is ever touched:
//! every parent directory is resolved inside the tree (`openat2` with
//! `RESOLVE_IN_ROOT`), the final component is handled with *at() calls that
//! never follow it, and paths with `..` are refused. Memory and work stay
//! bounded by [`Limits`].

mod apply;
mod archive;
#[cfg(test)]
mod tests;
mod tree;

use std::io::{self, BufReader, Read};
use std::path::Path;

use self::apply::Applier;
use self::archive::TarReader;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer with this OCI or Docker media type.
pub fn compression_for(media_type: &str) -> Result<Compression, Error> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        other => Err(Error::UnsupportedMediaType(other.to_owned())),
    }
}

/// Bounds on what one layer may make the unpacker do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Archive members (files, directories, whiteouts, ...).
    pub max_entries: u64,
    /// One pax (local or global) or GNU long name/link header.
    pub max_extension_bytes: u64,
    /// An entry's path or link target.
    pub max_path_bytes: usize,
    /// The decompressed tar stream.
    pub max_total_bytes: u64,
    /// Paths of directories remembered until the layer's end (their times
    /// are set last, as adding children changes them).
    pub max_dir_path_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1 << 20,
            max_extension_bytes: 1 << 20,
            max_path_bytes: 4096,
            max_total_bytes: 64 << 30,
            max_dir_path_bytes: 256 << 20,
        }
    }
}

/// What applying one layer did.
#[derive(Debug, Default, Clone)]
pub struct LayerStats {
    /// Archive members read.
    pub entries: u64,
    /// File data written.
    pub bytes: u64,
    /// Whiteouts applied (opaque ones included).
    pub whiteouts: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("reading the layer")]
    Read(#[source] io::Error),
    #[error("malformed tar: {0}")]
    Malformed(String),
    #[error("layer exceeds the limit on {what} ({limit})")]
    Limit { what: &'static str, limit: u64 },
    #[error("{path:?}: refused: {reason}")]
    Refused { path: String, reason: &'static str },
    #[error("{path:?}: unsupported entry type {kind:?}")]
    UnsupportedType { path: String, kind: char },
    #[error("{path:?}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Applies one layer onto `root` (an existing directory). Never writes or
/// changes anything outside `root`. On error the tree is left part-applied.
/// Needs root privileges: it sets owners and makes device nodes.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    compression: Compression,
    limits: &Limits,
) -> Result<LayerStats, Error> {
    let mut applier = Applier::new(root, limits)?;
    let mut reader = TarReader::new(decompress(layer, compression)?, limits);
    while let Some(member) = reader.next_member()? {
        applier.apply(member, &mut reader)?;
    }
    // Read to the end: checks the compressed stream's trailer, and lets a
    // caller hashing the blob as it is read see all of it.
    reader.drain()?;
    applier.finish()
}

fn decompress<'a>(
    layer: impl Read + 'a,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, Error> {
    Ok(match compression {
        Compression::None => Box::new(BufReader::with_capacity(64 << 10, layer)),
        // Multi-member, as Go's gzip reader (which wrote most layers) is.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(layer)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(layer).map_err(Error::Read)?)
        }
    })
}

/// An error from an operation on `path` (as the layer names it).
fn at<E: Into<io::Error>>(path: &Path, op: &'static str) -> impl FnOnce(E) -> Error {
    move |source| Error::Io {
        path: path.display().to_string(),
        op,
        source: source.into(),
    }
}
