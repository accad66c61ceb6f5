//! OCI images built from scratch, without docker: the support writes an OCI
//! image layout directory itself (`oci-layout`, `index.json`,
//! `blobs/sha256/...`), with layers built as tar streams by the `tar` crate
//! (gzip, zstd or uncompressed), an image config, a manifest
//! (`application/vnd.oci.image.manifest.v1+json`) and, for multi-platform
//! images, an index. Everything is deterministic: building the same image
//! twice gives the same digests.
//!
//! Each builder writes its layout to `dir/NAME` and returns a [`BuiltImage`]
//! (layout dir, tag, manifest digest, image id = config digest, layer
//! descriptors). [`push`] copies it to a [`Registry`] with `skopeo`;
//! [`docker_save_tarball`] writes a `docker save` style archive.
//!
//! Each image also knows its *expected tree*: the filesystem that unpacking
//! its layers in order must give ([`PlatformImage::expected_tree`], computed
//! from the layer entries by the OCI layer rules: whiteouts, opaque dirs,
//! replacements, hardlinks). [`scan_tree`] reads a real directory into the
//! same form and [`ExpectedTree::assert_matches`] compares them.
//!
//! The builders (layout dir name, tag "latest"):
//! - [`busybox_image`] (`busybox`): one gzip layer with a static busybox.
//! - [`layered_image`] (`layered`): three layers (gzip, uncompressed, zstd)
//!   exercising whiteouts, opaque dirs, hardlinks, symlinks, setuid, file
//!   capabilities, ownership, devices, FIFOs and mtimes.
//! - [`big_layer_image`] (`big-N`: N MiB of random bytes),
//!   [`many_files_image`] (`many-N`: N small files).
//! - [`multi_arch_index`] (`multi-arch`: amd64 busybox + arm64 tiny image),
//!   [`arm64_only_index`] (`arm64-only`).
//!
//! [`build_image`] and [`build_index`] build any other image from
//! [`LayerSpec`]s and an [`ImageConfig`].
//!
//! Speed: the support is compiled unoptimized, where in-process sha256 and
//! deflate run at 10-20 MB/s; so layers with more than [`BIG`] (16 MiB) of
//! content are hashed by `sha256sum` and gzipped by `gzip -n -1`, and big
//! files are hashed by `sha256sum` (coreutils and gzip: always on Debian).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::registry::{Registry, sha256_digest, skopeo};
use super::{require_tool, run, try_run};

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MEDIA_TYPE_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MEDIA_TYPE_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The annotation that names a manifest in a layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The tag every builder gives its image.
pub const TAG: &str = "latest";
/// The mtime of every tar entry unless set otherwise.
pub const DEFAULT_MTIME: u64 = 1_600_000_000;
/// The fixed mtime of `data/old` in [`layered_image`].
pub const OLD_MTIME: u64 = 1_000_000_000;
/// `/etc/passwd` of the busybox base layer.
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          frakti:x:1000:1000:frakti:/tmp:/bin/sh\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// `/etc/group` of the busybox base layer.
pub const GROUP: &str = "root:x:0:\nfrakti:x:1000:\nnogroup:x:65534:\n";
/// The busybox applets linked in `/bin` of the busybox base layer.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "ls",
    "cat",
    "find",
    "stat",
    "id",
    "echo",
    "sleep",
    "env",
    "true",
    "sha256sum",
    "touch",
    "mkdir",
    "wc",
    "head",
];
/// `security.capability` of `data/cap` in [`layered_image`]: a
/// `vfs_cap_data` v2 (magic `VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE`)
/// with permitted = cap_net_raw (13), inheritable = none, i.e.
/// `setcap cap_net_raw+ep`.
pub const CAP_NET_RAW_EP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic_etc 0x02000001
    0x00, 0x20, 0x00, 0x00, // data[0].permitted = 1 << 13
    0x00, 0x00, 0x00, 0x00, // data[0].inheritable
    0x00, 0x00, 0x00, 0x00, // data[1].permitted
    0x00, 0x00, 0x00, 0x00, // data[1].inheritable
];

// ---------------------------------------------------------------------------
// Layer entries

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The OCI layer media type.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => MEDIA_TYPE_LAYER,
            Compression::Gzip => MEDIA_TYPE_LAYER_GZIP,
            Compression::Zstd => MEDIA_TYPE_LAYER_ZSTD,
        }
    }
}

/// A regular file's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Bytes(Vec<u8>),
    /// `len` deterministic pseudo-random (incompressible) bytes from `seed`,
    /// generated while writing: never held in memory.
    Random {
        seed: u64,
        len: u64,
    },
}

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::Random { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader of the content.
    pub fn reader(&self) -> Box<dyn Read + '_> {
        match self {
            Content::Bytes(b) => Box::new(&b[..]),
            Content::Random { seed, len } => Box::new(RandomReader::new(*seed, *len)),
        }
    }

    /// "sha256:<hex>" of the content.
    pub fn sha256(&self) -> String {
        sha256_of(&mut self.reader(), self.len())
    }
}

/// What a tar entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File(Content),
    Dir,
    Symlink(String),
    /// A hard link to another path (relative to the root, e.g. "data/keep").
    Hardlink(String),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

/// One entry of a layer's tar stream, written as is: whiteouts are plain
/// entries named `.wh.NAME` / `.wh..wh..opq` (see [`TarEntry::whiteout`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// Relative path, no leading "/" (e.g. "data/keep"; dirs without "/").
    pub path: String,
    pub node: Node,
    /// Permission bits incl. setuid/setgid/sticky (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// Extended attributes, written as PAX `SCHILY.xattr.NAME` records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl TarEntry {
    fn new(path: &str, node: Node, mode: u32) -> TarEntry {
        TarEntry {
            path: normalize(path),
            node,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            xattrs: Vec::new(),
        }
    }

    pub fn dir(path: &str, mode: u32) -> TarEntry {
        TarEntry::new(path, Node::Dir, mode)
    }

    pub fn file(path: &str, mode: u32, content: impl Into<Vec<u8>>) -> TarEntry {
        TarEntry::new(path, Node::File(Content::Bytes(content.into())), mode)
    }

    pub fn random_file(path: &str, mode: u32, seed: u64, len: u64) -> TarEntry {
        TarEntry::new(path, Node::File(Content::Random { seed, len }), mode)
    }

    pub fn symlink(path: &str, target: &str) -> TarEntry {
        TarEntry::new(path, Node::Symlink(target.to_string()), 0o777)
    }

    pub fn hardlink(path: &str, target: &str) -> TarEntry {
        TarEntry::new(path, Node::Hardlink(normalize(target)), 0o644)
    }

    pub fn char_device(path: &str, mode: u32, major: u32, minor: u32) -> TarEntry {
        TarEntry::new(path, Node::CharDevice(major, minor), mode)
    }

    pub fn block_device(path: &str, mode: u32, major: u32, minor: u32) -> TarEntry {
        TarEntry::new(path, Node::BlockDevice(major, minor), mode)
    }

    pub fn fifo(path: &str, mode: u32) -> TarEntry {
        TarEntry::new(path, Node::Fifo, mode)
    }

    /// The whiteout deleting `path` (and everything under it) from lower
    /// layers: an empty file `DIR/.wh.NAME`.
    pub fn whiteout(path: &str) -> TarEntry {
        let path = normalize(path);
        let (parent, name) = split(&path);
        TarEntry::file(&join(parent, &format!(".wh.{name}")), 0o644, Vec::new())
    }

    /// The marker making directory `dir` opaque (hiding what lower layers
    /// have in it): an empty file `DIR/.wh..wh..opq`.
    pub fn opaque(dir: &str) -> TarEntry {
        TarEntry::file(&join(&normalize(dir), ".wh..wh..opq"), 0o644, Vec::new())
    }

    pub fn owner(mut self, uid: u32, gid: u32) -> TarEntry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, mtime: u64) -> TarEntry {
        self.mtime = mtime;
        self
    }

    pub fn xattr(mut self, name: &str, value: &[u8]) -> TarEntry {
        self.xattrs.push((name.to_string(), value.to_vec()));
        self
    }
}

/// A layer to build: its entries in tar order and its compression.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub compression: Compression,
    pub entries: Vec<TarEntry>,
}

impl LayerSpec {
    pub fn new(compression: Compression, entries: Vec<TarEntry>) -> LayerSpec {
        LayerSpec {
            compression,
            entries,
        }
    }
}

/// A layer as written: its descriptor and diff id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub media_type: String,
    /// "sha256:..." of the blob (compressed bytes).
    pub digest: String,
    pub size: u64,
    /// "sha256:..." of the uncompressed tar (the config's rootfs.diff_ids).
    pub diff_id: String,
}

// ---------------------------------------------------------------------------
// Image config

/// What goes into an image config (besides rootfs and history).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageConfig {
    /// GOARCH style: "amd64", "arm64", ...
    pub architecture: String,
    pub os: String,
    pub variant: Option<String>,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub stop_signal: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl Default for ImageConfig {
    /// linux on the host's architecture, `PATH=/usr/bin:/bin`, `Cmd ["sh"]`.
    fn default() -> ImageConfig {
        ImageConfig {
            architecture: host_arch().to_string(),
            os: "linux".to_string(),
            variant: None,
            env: vec!["PATH=/usr/bin:/bin".to_string()],
            entrypoint: Vec::new(),
            cmd: vec!["sh".to_string()],
            user: None,
            working_dir: None,
            stop_signal: None,
            labels: BTreeMap::new(),
        }
    }
}

impl ImageConfig {
    fn to_json(&self, diff_ids: &[String]) -> Value {
        let mut config = serde_json::Map::new();
        config.insert("Env".into(), json!(self.env));
        if !self.entrypoint.is_empty() {
            config.insert("Entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            config.insert("Cmd".into(), json!(self.cmd));
        }
        if let Some(u) = &self.user {
            config.insert("User".into(), json!(u));
        }
        if let Some(w) = &self.working_dir {
            config.insert("WorkingDir".into(), json!(w));
        }
        if let Some(s) = &self.stop_signal {
            config.insert("StopSignal".into(), json!(s));
        }
        if !self.labels.is_empty() {
            config.insert("Labels".into(), json!(self.labels));
        }
        let created = "2024-01-01T00:00:00Z";
        let history: Vec<Value> = (0..diff_ids.len())
            .map(|i| json!({"created": created, "created_by": format!("frakti test support: layer {i}")}))
            .collect();
        let mut v = json!({
            "created": created,
            "architecture": self.architecture,
            "os": self.os,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

/// The host's architecture in GOARCH/OCI terms ("amd64", "arm64", ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

// ---------------------------------------------------------------------------
// Built images

/// One image manifest in a layout (the only one, or one of an index).
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    /// "sha256:..." of the manifest.
    pub manifest_digest: String,
    pub manifest_size: u64,
    /// "sha256:..." of the config blob: the image id.
    pub config_digest: String,
    /// The config JSON as written.
    pub config: Value,
    pub layers: Vec<LayerDescriptor>,
    /// What the layers were built from (for [`Self::expected_tree`]).
    pub layer_specs: Vec<LayerSpec>,
}

impl PlatformImage {
    /// The tree that unpacking the layers in order must give.
    pub fn expected_tree(&self) -> ExpectedTree {
        expected_tree(&self.layer_specs)
    }
}

/// An image (or index) written as an OCI layout, tagged [`BuiltImage::tag`].
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// Its tag in the layout (`index.json`'s ref name annotation).
    pub tag: String,
    /// [`MEDIA_TYPE_MANIFEST`] or [`MEDIA_TYPE_INDEX`].
    pub media_type: &'static str,
    /// "sha256:..." of the top-level manifest or index: what pulling by tag
    /// resolves to when pushed with OCI format.
    pub manifest_digest: String,
    /// The image manifests: one, or one per platform of an index.
    pub images: Vec<PlatformImage>,
}

impl BuiltImage {
    /// "oci:LAYOUT:TAG", skopeo's name for the image.
    pub fn oci_ref(&self) -> String {
        format!("oci:{}:{}", self.layout.display(), self.tag)
    }

    pub fn is_index(&self) -> bool {
        self.media_type == MEDIA_TYPE_INDEX
    }

    /// The image id (config digest): of the single manifest, or for an index
    /// of the linux image for the host architecture. Panics if an index has
    /// none.
    pub fn config_digest(&self) -> &str {
        &self.host_image().config_digest
    }

    /// The single image, or an index's linux image for the host architecture
    /// (what a pull on this host picks).
    pub fn host_image(&self) -> &PlatformImage {
        if !self.is_index() {
            return &self.images[0];
        }
        self.platform(host_arch()).unwrap_or_else(|| {
            panic!(
                "index {} has no linux/{} image",
                self.layout.display(),
                host_arch()
            )
        })
    }

    /// The linux image for `architecture` ("amd64", "arm64").
    pub fn platform(&self, architecture: &str) -> Option<&PlatformImage> {
        self.images
            .iter()
            .find(|i| i.os == "linux" && i.architecture == architecture)
    }

    /// The expected tree of [`Self::host_image`].
    pub fn expected_tree(&self) -> ExpectedTree {
        self.host_image().expected_tree()
    }
}

/// Writes an OCI layout at `dir/name` (replacing any) holding one image
/// manifest tagged [`TAG`].
pub fn build_image(
    dir: &Path,
    name: &str,
    config: &ImageConfig,
    layers: &[LayerSpec],
) -> BuiltImage {
    let layout = Layout::create(&dir.join(name));
    let image = layout.write_image(config, layers);
    let desc = json!({
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": image.manifest_digest,
        "size": image.manifest_size,
        "annotations": {REF_NAME: TAG},
    });
    layout.write_index_json(desc);
    BuiltImage {
        layout: layout.dir,
        tag: TAG.to_string(),
        media_type: MEDIA_TYPE_MANIFEST,
        manifest_digest: image.manifest_digest.clone(),
        images: vec![image],
    }
}

/// Writes an OCI layout at `dir/name` (replacing any) holding an image index
/// (tagged [`TAG`]) with one manifest per (config, layers), each with its
/// platform (os, architecture, variant) set from its config.
pub fn build_index(dir: &Path, name: &str, images: &[(ImageConfig, Vec<LayerSpec>)]) -> BuiltImage {
    let layout = Layout::create(&dir.join(name));
    let images: Vec<PlatformImage> = images
        .iter()
        .map(|(config, layers)| layout.write_image(config, layers))
        .collect();
    let manifests: Vec<Value> = images
        .iter()
        .map(|i| {
            let mut platform = json!({"architecture": i.architecture, "os": i.os});
            if let Some(v) = &i.variant {
                platform["variant"] = json!(v);
            }
            json!({
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": i.manifest_digest,
                "size": i.manifest_size,
                "platform": platform,
            })
        })
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": manifests,
    });
    let (digest, size) = layout.write_blob(&serde_json::to_vec(&index).expect("index json"));
    layout.write_index_json(json!({
        "mediaType": MEDIA_TYPE_INDEX,
        "digest": digest,
        "size": size,
        "annotations": {REF_NAME: TAG},
    }));
    BuiltImage {
        layout: layout.dir,
        tag: TAG.to_string(),
        media_type: MEDIA_TYPE_INDEX,
        manifest_digest: digest,
        images,
    }
}

struct Layout {
    dir: PathBuf,
    blobs: PathBuf,
}

impl Layout {
    fn create(dir: &Path) -> Layout {
        if dir.exists() {
            std::fs::remove_dir_all(dir).expect("remove the old layout");
        }
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("create the layout");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("write oci-layout");
        Layout {
            dir: dir.to_path_buf(),
            blobs,
        }
    }

    fn write_blob(&self, bytes: &[u8]) -> (String, u64) {
        let digest = sha256_digest(bytes);
        std::fs::write(self.blobs.join(&digest[7..]), bytes).expect("write blob");
        (digest, bytes.len() as u64)
    }

    fn write_index_json(&self, manifest: Value) {
        let index = json!({"schemaVersion": 2, "manifests": [manifest]});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .expect("write index.json");
    }

    fn write_layer(&self, spec: &LayerSpec) -> LayerDescriptor {
        let content: u64 = spec
            .entries
            .iter()
            .map(|e| match &e.node {
                Node::File(c) => c.len(),
                _ => 0,
            })
            .sum();
        if content > BIG && spec.compression != Compression::Zstd {
            return self.write_big_layer(spec);
        }
        let tmp = self.blobs.join(".layer.tmp");
        let file = BufWriter::with_capacity(1 << 20, File::create(&tmp).expect("create layer"));
        let mut blob_hash = Sha256::new();
        let mut diff_hash = Sha256::new();
        let size;
        {
            let blob = HashWriter::new(file, &mut blob_hash);
            let encoder = Encoder::new(blob, spec.compression);
            let mut tar = tar::Builder::new(HashWriter::new(encoder, &mut diff_hash));
            for e in &spec.entries {
                append_entry(&mut tar, e)
                    .unwrap_or_else(|err| panic!("tar entry {}: {err}", e.path));
            }
            let encoder = tar.into_inner().expect("finish tar").into_inner();
            let blob = encoder.finish().expect("finish compression");
            size = blob.written;
            blob.into_inner()
                .into_inner()
                .expect("flush layer")
                .sync_all()
                .ok();
        }
        let digest = format!("sha256:{:x}", blob_hash.finalize());
        std::fs::rename(&tmp, self.blobs.join(&digest[7..])).expect("rename layer");
        LayerDescriptor {
            media_type: spec.compression.media_type().to_string(),
            digest,
            size,
            diff_id: format!("sha256:{:x}", diff_hash.finalize()),
        }
    }

    /// A layer with more than [`BIG`] bytes of content: the tar is written
    /// by the tar crate, hashed with `sha256sum` and compressed with `gzip
    /// -n -1` (the support runs unoptimized: in-process sha256 and deflate
    /// do 10-20 MB/s).
    fn write_big_layer(&self, spec: &LayerSpec) -> LayerDescriptor {
        let tar_path = self.blobs.join(".layer.tar.tmp");
        {
            let file =
                BufWriter::with_capacity(1 << 20, File::create(&tar_path).expect("create layer"));
            let mut tar = tar::Builder::new(file);
            for e in &spec.entries {
                append_entry(&mut tar, e)
                    .unwrap_or_else(|err| panic!("tar entry {}: {err}", e.path));
            }
            tar.into_inner()
                .expect("finish tar")
                .into_inner()
                .expect("flush layer");
        }
        let diff_id = sha256_file(&tar_path);
        let blob = match spec.compression {
            Compression::None => tar_path,
            Compression::Gzip => {
                let gz = self.blobs.join(".layer.gz.tmp");
                require_tool("gzip", "gzip");
                run(Command::new("gzip")
                    .args(["-n", "-1", "-c"])
                    .arg(&tar_path)
                    .stdout(File::create(&gz).expect("create gz")));
                std::fs::remove_file(&tar_path).expect("remove tar");
                gz
            }
            Compression::Zstd => unreachable!("zstd layers are written in process"),
        };
        let digest = sha256_file(&blob);
        let size = blob.metadata().expect("stat layer").len();
        std::fs::rename(&blob, self.blobs.join(&digest[7..])).expect("rename layer");
        LayerDescriptor {
            media_type: spec.compression.media_type().to_string(),
            digest,
            size,
            diff_id,
        }
    }

    fn write_image(&self, config: &ImageConfig, layers: &[LayerSpec]) -> PlatformImage {
        let descs: Vec<LayerDescriptor> = layers.iter().map(|l| self.write_layer(l)).collect();
        let diff_ids: Vec<String> = descs.iter().map(|d| d.diff_id.clone()).collect();
        let config_json = config.to_json(&diff_ids);
        let (config_digest, config_size) =
            self.write_blob(&serde_json::to_vec(&config_json).expect("config json"));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": config_digest, "size": config_size},
            "layers": descs.iter().map(|d| json!({
                "mediaType": d.media_type, "digest": d.digest, "size": d.size,
            })).collect::<Vec<_>>(),
        });
        let (manifest_digest, manifest_size) =
            self.write_blob(&serde_json::to_vec(&manifest).expect("manifest json"));
        PlatformImage {
            os: config.os.clone(),
            architecture: config.architecture.clone(),
            variant: config.variant.clone(),
            manifest_digest,
            manifest_size,
            config_digest,
            config: config_json,
            layers: descs,
            layer_specs: layers.to_vec(),
        }
    }
}

fn append_entry<W: Write>(tar: &mut tar::Builder<W>, e: &TarEntry) -> io::Result<()> {
    if !e.xattrs.is_empty() {
        let mut records = Vec::new();
        for (name, value) in &e.xattrs {
            records.extend(pax_record(&format!("SCHILY.xattr.{name}"), value));
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        let base = e.path.rsplit('/').next().unwrap_or("x");
        let base: String = base.chars().take(80).collect();
        h.set_path(format!("PaxHeaders/{base}"))?;
        h.set_mode(0o644);
        h.set_mtime(e.mtime);
        h.set_size(records.len() as u64);
        h.set_cksum();
        tar.append(&h, &records[..])?;
    }
    let mut h = tar::Header::new_ustar();
    h.set_mode(e.mode);
    h.set_uid(e.uid as u64);
    h.set_gid(e.gid as u64);
    h.set_mtime(e.mtime);
    h.set_size(0);
    match &e.node {
        Node::File(content) => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(content.len());
            tar.append_data(&mut h, &e.path, content.reader())
        }
        Node::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            tar.append_data(&mut h, format!("{}/", e.path), io::empty())
        }
        Node::Symlink(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            tar.append_link(&mut h, &e.path, target)
        }
        Node::Hardlink(target) => {
            h.set_entry_type(tar::EntryType::Link);
            tar.append_link(&mut h, &e.path, target)
        }
        Node::CharDevice(major, minor) | Node::BlockDevice(major, minor) => {
            h.set_entry_type(if matches!(e.node, Node::CharDevice(..)) {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            h.set_device_major(*major)?;
            h.set_device_minor(*minor)?;
            tar.append_data(&mut h, &e.path, io::empty())
        }
        Node::Fifo => {
            h.set_entry_type(tar::EntryType::Fifo);
            tar.append_data(&mut h, &e.path, io::empty())
        }
    }
}

/// One PAX extended header record: "LEN key=value\n", LEN counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while rest + len.to_string().len() != len {
        len = rest + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    assert_eq!(r.len(), len);
    r
}

/// Above this many bytes, hashing and gzip are done by `sha256sum` and
/// `gzip` (the support is built unoptimized).
pub const BIG: u64 = 16 << 20;

/// "sha256:<hex>" of the `len` bytes of `r`: in process, or with
/// `sha256sum` above [`BIG`].
pub fn sha256_of(r: &mut dyn Read, len: u64) -> String {
    if len <= BIG {
        let mut h = Sha256::new();
        io::copy(r, &mut HashWriter::new(io::sink(), &mut h)).expect("hash");
        return format!("sha256:{:x}", h.finalize());
    }
    require_tool("sha256sum", "coreutils");
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    io::copy(r, &mut child.stdin.take().unwrap()).expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    parse_sha256sum(&out.stdout)
}

fn sha256_file(path: &Path) -> String {
    let len = path.metadata().expect("stat").len();
    if len <= BIG {
        return sha256_of(&mut File::open(path).expect("open"), len);
    }
    require_tool("sha256sum", "coreutils");
    parse_sha256sum(&run(Command::new("sha256sum").arg(path)).stdout)
}

fn parse_sha256sum(out: &[u8]) -> String {
    let hex = String::from_utf8_lossy(out);
    let hex = hex.split_whitespace().next().unwrap_or("");
    assert_eq!(hex.len(), 64, "sha256sum printed {hex:?}");
    format!("sha256:{hex}")
}

struct HashWriter<'h, W> {
    inner: W,
    hasher: &'h mut Sha256,
    written: u64,
}

impl<'h, W> HashWriter<'h, W> {
    fn new(inner: W, hasher: &'h mut Sha256) -> Self {
        HashWriter {
            inner,
            hasher,
            written: 0,
        }
    }

    fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    fn new(w: W, c: Compression) -> Self {
        match c {
            Compression::None => Encoder::Plain(w),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::default(),
            )),
            Compression::Zstd => {
                Encoder::Zstd(zstd::stream::write::Encoder::new(w, 3).expect("zstd"))
            }
        }
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

/// Deterministic incompressible bytes: the little-endian words of an
/// xorshift64* stream seeded through splitmix64. The byte stream does not
/// depend on how it is read.
struct RandomReader {
    state: u64,
    remaining: u64,
    word: [u8; 8],
    used: usize,
}

impl RandomReader {
    fn new(seed: u64, len: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        RandomReader {
            state: z | 1,
            remaining: len,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.remaining) as usize;
        let mut i = 0;
        // The rest of a word a previous read split.
        while i < n && self.used < 8 {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let whole = (n - i) / 8;
        for chunk in buf[i..i + whole * 8].chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next_word());
        }
        i += whole * 8;
        if i < n {
            self.word = self.next_word();
            self.used = 0;
            while i < n {
                buf[i] = self.word[self.used];
                self.used += 1;
                i += 1;
            }
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// The builders

/// The host's static busybox (`/bin/busybox`, Debian package
/// `busybox-static`). Panics naming the package if it is missing or is the
/// dynamically linked one (which could not run in a bare image).
pub fn host_busybox() -> Vec<u8> {
    let path = Path::new("/bin/busybox");
    let bytes = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: install the Debian package `busybox-static` (apt-get install -y busybox-static)",
            path.display()
        )
    });
    assert!(
        !elf_has_interp(&bytes),
        "/bin/busybox is dynamically linked: install the Debian package `busybox-static` \
         (apt-get install -y busybox-static), which replaces `busybox`"
    );
    bytes
}

fn elf_has_interp(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false; // not a little-endian ELF64: let it be
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) == 3 // PT_INTERP
    })
}

/// The entries of the busybox base layer: `/bin/busybox` (static, 0755) and
/// symlinks `/bin/APPLET -> busybox` for [`BUSYBOX_APPLETS`]; dirs /dev
/// /etc /proc /sys /root (0700) /tmp (1777); `/etc/passwd` ([`PASSWD`]:
/// root 0, frakti 1000, nobody 65534) and `/etc/group` ([`GROUP`]).
pub fn busybox_entries() -> Vec<TarEntry> {
    let mut e = vec![
        TarEntry::dir("bin", 0o755),
        TarEntry::file("bin/busybox", 0o755, host_busybox()),
    ];
    for applet in BUSYBOX_APPLETS {
        e.push(TarEntry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    e.extend([
        TarEntry::dir("dev", 0o755),
        TarEntry::dir("etc", 0o755),
        TarEntry::file("etc/passwd", 0o644, PASSWD),
        TarEntry::file("etc/group", 0o644, GROUP),
        TarEntry::dir("proc", 0o555),
        TarEntry::dir("sys", 0o555),
        TarEntry::dir("root", 0o700),
        TarEntry::dir("tmp", 0o1777),
    ]);
    e
}

/// busybox (layout `dir/busybox`): one gzip layer of [`busybox_entries`];
/// config linux/host arch, `Env ["PATH=/usr/bin:/bin"]`, `Cmd ["sh"]`.
pub fn busybox_image(dir: &Path) -> BuiltImage {
    busybox_image_with(dir, "busybox", &ImageConfig::default())
}

/// Like [`busybox_image`] with another layout name and config (e.g. a
/// `User`, `StopSignal`, `Entrypoint`). The layer is the same blob.
pub fn busybox_image_with(dir: &Path, name: &str, config: &ImageConfig) -> BuiltImage {
    build_image(
        dir,
        name,
        config,
        &[LayerSpec::new(Compression::Gzip, busybox_entries())],
    )
}

/// The layers of [`layered_image`].
///
/// 1. gzip: the busybox base, and `data/keep` ("keep v1"), `data/gone`,
///    `data/dir/{a,b}`, `data/opq/{lower1,lower2}`.
/// 2. uncompressed: whiteout `data/.wh.gone`, whiteout of a dir
///    `data/.wh.dir`, opaque `data/opq/.wh..wh..opq` plus `data/opq/upper`;
///    `data/keep` rewritten ("keep v2") and hardlink `data/hard` ->
///    `data/keep` (in the same layer, as layer diffs carry them); symlinks
///    `data/rel -> keep` and `data/abs -> /data/keep`; `data/suid` 04755
///    root; `data/cap` with `security.capability` = [`CAP_NET_RAW_EP`];
///    `data/owned` 1000:1000 0640; char device `dev/null2` 1:3 0666; FIFO
///    `data/fifo` 0640; `data/old` with mtime [`OLD_MTIME`].
/// 3. zstd: `data/late`.
pub fn layered_layers() -> Vec<LayerSpec> {
    let mut l1 = busybox_entries();
    l1.extend([
        TarEntry::dir("data", 0o755),
        TarEntry::file("data/keep", 0o644, "keep v1\n"),
        TarEntry::file("data/gone", 0o644, "gone\n"),
        TarEntry::dir("data/dir", 0o755),
        TarEntry::file("data/dir/a", 0o644, "a\n"),
        TarEntry::file("data/dir/b", 0o644, "b\n"),
        TarEntry::dir("data/opq", 0o755),
        TarEntry::file("data/opq/lower1", 0o644, "lower1\n"),
        TarEntry::file("data/opq/lower2", 0o644, "lower2\n"),
    ]);
    let l2 = vec![
        TarEntry::dir("data", 0o755),
        TarEntry::whiteout("data/gone"),
        TarEntry::whiteout("data/dir"),
        TarEntry::dir("data/opq", 0o755),
        TarEntry::opaque("data/opq"),
        TarEntry::file("data/opq/upper", 0o644, "upper\n"),
        TarEntry::file("data/keep", 0o644, "keep v2\n"),
        TarEntry::hardlink("data/hard", "data/keep"),
        TarEntry::symlink("data/rel", "keep"),
        TarEntry::symlink("data/abs", "/data/keep"),
        TarEntry::file("data/suid", 0o4755, "#!/bin/sh\necho suid\n"),
        TarEntry::file("data/cap", 0o755, "#!/bin/sh\necho cap\n")
            .xattr("security.capability", &CAP_NET_RAW_EP),
        TarEntry::file("data/owned", 0o640, "owned by frakti\n").owner(1000, 1000),
        TarEntry::fifo("data/fifo", 0o640),
        TarEntry::file("data/old", 0o644, "old\n").mtime(OLD_MTIME),
        TarEntry::dir("dev", 0o755),
        TarEntry::char_device("dev/null2", 0o666, 1, 3),
    ];
    let l3 = vec![
        TarEntry::dir("data", 0o755),
        TarEntry::file("data/late", 0o644, "late\n"),
    ];
    vec![
        LayerSpec::new(Compression::Gzip, l1),
        LayerSpec::new(Compression::None, l2),
        LayerSpec::new(Compression::Zstd, l3),
    ]
}

/// The three-layer image of [`layered_layers`] (layout `dir/layered`);
/// config as [`busybox_image`]'s.
pub fn layered_image(dir: &Path) -> BuiltImage {
    build_image(dir, "layered", &ImageConfig::default(), &layered_layers())
}

/// busybox layer + a gzip layer holding one file `data/big` of `size_mib`
/// MiB of deterministic pseudo-random (incompressible) bytes (layout
/// `dir/big-SIZE`). Building takes about 10 s per 100 MiB here (gzip);
/// [`big_layer_image_with`] `Compression::None` is several times faster.
pub fn big_layer_image(dir: &Path, size_mib: u64) -> BuiltImage {
    big_layer_image_with(dir, size_mib, Compression::Gzip)
}

/// [`big_layer_image`] with the big layer compressed as `compression`
/// (layout `dir/big-SIZE` for gzip, `dir/big-SIZE-none` / `-zstd`).
pub fn big_layer_image_with(dir: &Path, size_mib: u64, compression: Compression) -> BuiltImage {
    let layers = [
        LayerSpec::new(Compression::Gzip, busybox_entries()),
        LayerSpec::new(
            compression,
            vec![
                TarEntry::dir("data", 0o755),
                TarEntry::random_file("data/big", 0o644, size_mib, size_mib << 20),
            ],
        ),
    ];
    let name = match compression {
        Compression::Gzip => format!("big-{size_mib}"),
        Compression::None => format!("big-{size_mib}-none"),
        Compression::Zstd => format!("big-{size_mib}-zstd"),
    };
    build_image(dir, &name, &ImageConfig::default(), &layers)
}

/// busybox layer + a gzip layer with `n` small files `many/dAA/dB/fNNNNNN`
/// (AA = i / 1000, B = i / 100 % 10: at most 100 files a dir) holding
/// "file N\n" (layout `dir/many-N`).
pub fn many_files_image(dir: &Path, n: usize) -> BuiltImage {
    let mut entries = vec![TarEntry::dir("many", 0o755)];
    let mut last_dirs = (usize::MAX, usize::MAX);
    for i in 0..n {
        let (a, b) = (i / 1000, i / 100 % 10);
        if last_dirs.0 != a {
            entries.push(TarEntry::dir(&format!("many/d{a:02}"), 0o755));
        }
        if last_dirs != (a, b) {
            entries.push(TarEntry::dir(&format!("many/d{a:02}/d{b}"), 0o755));
        }
        last_dirs = (a, b);
        entries.push(TarEntry::file(
            &format!("many/d{a:02}/d{b}/f{i:06}"),
            0o644,
            format!("file {i}\n"),
        ));
    }
    let layers = [
        LayerSpec::new(Compression::Gzip, busybox_entries()),
        LayerSpec::new(Compression::Gzip, entries),
    ];
    build_image(dir, &format!("many-{n}"), &ImageConfig::default(), &layers)
}

/// The arm64 image of the indexes: linux/arm64/v8, one gzip layer with
/// `hello` ("hello from arm64\n") and `etc/arch` ("arm64\n"), `Cmd
/// ["/hello"]`.
pub fn arm64_image_parts() -> (ImageConfig, Vec<LayerSpec>) {
    let config = ImageConfig {
        architecture: "arm64".to_string(),
        variant: Some("v8".to_string()),
        cmd: vec!["/hello".to_string()],
        ..ImageConfig::default()
    };
    let layer = LayerSpec::new(
        Compression::Gzip,
        vec![
            TarEntry::file("hello", 0o755, "hello from arm64\n"),
            TarEntry::dir("etc", 0o755),
            TarEntry::file("etc/arch", 0o644, "arm64\n"),
        ],
    );
    (config, vec![layer])
}

/// An index (layout `dir/multi-arch`) of linux/amd64 (the busybox image)
/// and linux/arm64/v8 ([`arm64_image_parts`]).
pub fn multi_arch_index(dir: &Path) -> BuiltImage {
    let amd64 = ImageConfig {
        architecture: "amd64".to_string(),
        ..ImageConfig::default()
    };
    build_index(
        dir,
        "multi-arch",
        &[
            (
                amd64,
                vec![LayerSpec::new(Compression::Gzip, busybox_entries())],
            ),
            arm64_image_parts(),
        ],
    )
}

/// An index (layout `dir/arm64-only`) with only the linux/arm64/v8 image: a
/// pull on an amd64 host must fail with "no matching platform".
pub fn arm64_only_index(dir: &Path) -> BuiltImage {
    build_index(dir, "arm64-only", &[arm64_image_parts()])
}

// ---------------------------------------------------------------------------
// Push and export

/// How to [`push`].
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Convert to a Docker schema 2 manifest (`skopeo copy --format v2s2`);
    /// else the layout's OCI manifest/index is pushed byte for byte
    /// (`--preserve-digests`). Layers and config are the same blobs either
    /// way (so the image id is too), but the manifest digest differs.
    pub docker_v2s2: bool,
    /// Push with these creds instead of the registry's own.
    pub creds: Option<(String, String)>,
    /// Push anonymously even if the registry has creds.
    pub anonymous: bool,
}

impl PushOptions {
    pub fn v2s2() -> PushOptions {
        PushOptions {
            docker_v2s2: true,
            ..PushOptions::default()
        }
    }
}

/// What [`push`] left in the registry.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// "127.0.0.1:PORT/NAME:TAG".
    pub reference: String,
    /// "127.0.0.1:PORT/NAME@sha256:...".
    pub digest_reference: String,
    /// Digest of the manifest/index the tag now resolves to.
    pub manifest_digest: String,
    /// Its media type.
    pub media_type: String,
}

/// Pushes `image` to `registry` as `name` ("repo:tag"; indexes with all
/// their images, `--all`) with `skopeo copy`, over TLS verified with the
/// registry's CA if it has one, with the registry's creds unless `opts` say
/// otherwise. Panics with skopeo's output on failure.
pub fn push(image: &BuiltImage, registry: &Registry, name: &str, opts: &PushOptions) -> Pushed {
    try_push(image, registry, name, opts).unwrap_or_else(|e| panic!("{e}"))
}

/// [`push`], returning skopeo's error output instead of panicking.
pub fn try_push(
    image: &BuiltImage,
    registry: &Registry,
    name: &str,
    opts: &PushOptions,
) -> Result<Pushed, String> {
    let creds = if opts.anonymous {
        None
    } else {
        match &opts.creds {
            Some((u, p)) => Some((u.as_str(), p.as_str())),
            None => registry.creds(),
        }
    };
    let mut cmd = skopeo();
    cmd.args(["copy", "--quiet", "--retry-times=2"]);
    if image.is_index() {
        cmd.arg("--all");
    }
    if opts.docker_v2s2 {
        cmd.args(["--format", "v2s2"]);
    } else {
        cmd.arg("--preserve-digests");
    }
    cmd.args(registry.skopeo_dest_args(creds))
        .arg(image.oci_ref())
        .arg(format!("docker://{}", registry.reference(name)));
    let out = try_run(&mut cmd);
    if !out.status.success() {
        return Err(format!(
            "push of {} to {} failed ({}): {}\n--- stderr:\n{}",
            image.oci_ref(),
            registry.reference(name),
            out.status,
            super::describe(&cmd),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let m = registry.manifest(name);
    let repo = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    };
    Ok(Pushed {
        reference: registry.reference(name),
        digest_reference: format!("{}@{}", registry.reference(repo), m.digest),
        manifest_digest: m.digest,
        media_type: m.media_type,
    })
}

/// Writes `image` as a `docker save` style archive (`docker-archive:`,
/// uncompressed layers, `manifest.json`, config `<hex>.json`) at `out`,
/// tagged `name_tag` ("repo:tag"), with `skopeo copy`. Returns `out`.
pub fn docker_save_tarball(image: &BuiltImage, out: &Path, name_tag: &str) -> PathBuf {
    if out.exists() {
        std::fs::remove_file(out).expect("remove the old archive");
    }
    run(skopeo()
        .args(["copy", "--quiet"])
        .arg(image.oci_ref())
        .arg(format!("docker-archive:{}:{name_tag}", out.display())));
    out.to_path_buf()
}

// ---------------------------------------------------------------------------
// Expected trees

/// A file's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// One path of an unpacked tree. In an expected entry, `None` fields are
/// not compared; [`scan_tree`] fills all that apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedEntry {
    /// Relative to the root, no leading "/" (e.g. "data/keep").
    pub path: String,
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky (`st_mode & 0o7777`;
    /// symlinks 0o777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A symlink's target.
    pub link: Option<String>,
    /// Regular files: content length; symlinks: target length. Dirs: None.
    pub size: Option<u64>,
    /// Regular files: "sha256:..." of the content.
    pub sha256: Option<String>,
    /// Devices: (major, minor).
    pub rdev: Option<(u32, u32)>,
    /// Seconds since the epoch. Expected for regular files only (dir
    /// mtimes change as they are filled; symlinks' are rarely kept).
    pub mtime: Option<i64>,
    /// Non-dirs: the link count within the tree.
    pub nlink: Option<u64>,
    /// The other paths that are the same inode (hard links), sorted.
    pub hardlinks: Vec<String>,
    /// Extended attributes (`security.selinux` and `trusted.overlay.*` left
    /// out).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A whole tree: path -> entry (the root itself is not listed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpectedTree {
    pub entries: BTreeMap<String, ExpectedEntry>,
}

impl ExpectedTree {
    pub fn get(&self, path: &str) -> Option<&ExpectedEntry> {
        self.entries.get(path)
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }

    pub fn paths(&self) -> Vec<&str> {
        self.entries.keys().map(|s| s.as_str()).collect()
    }

    /// The differences from `actual` (a scanned tree), one line each; empty
    /// if it matches (fields that are None in `self` are not compared).
    pub fn diff(&self, actual: &ExpectedTree) -> Vec<String> {
        let mut d = Vec::new();
        for path in self.entries.keys() {
            if !actual.entries.contains_key(path) {
                d.push(format!("missing: {path}"));
            }
        }
        for path in actual.entries.keys() {
            if !self.entries.contains_key(path) {
                d.push(format!("unexpected: {path}"));
            }
        }
        for (path, e) in &self.entries {
            let Some(a) = actual.entries.get(path) else {
                continue;
            };
            let mut field = |name: &str, ok: bool, want: String, got: String| {
                if !ok {
                    d.push(format!("{path}: {name}: expected {want}, got {got}"));
                }
            };
            field(
                "kind",
                e.kind == a.kind,
                format!("{:?}", e.kind),
                format!("{:?}", a.kind),
            );
            field(
                "mode",
                e.mode == a.mode,
                format!("{:o}", e.mode),
                format!("{:o}", a.mode),
            );
            field("uid", e.uid == a.uid, e.uid.to_string(), a.uid.to_string());
            field("gid", e.gid == a.gid, e.gid.to_string(), a.gid.to_string());
            field(
                "link",
                e.link == a.link,
                format!("{:?}", e.link),
                format!("{:?}", a.link),
            );
            if e.size.is_some() {
                field(
                    "size",
                    e.size == a.size,
                    format!("{:?}", e.size),
                    format!("{:?}", a.size),
                );
            }
            if e.sha256.is_some() {
                field(
                    "sha256",
                    e.sha256 == a.sha256,
                    format!("{:?}", e.sha256),
                    format!("{:?}", a.sha256),
                );
            }
            if e.rdev.is_some() {
                field(
                    "rdev",
                    e.rdev == a.rdev,
                    format!("{:?}", e.rdev),
                    format!("{:?}", a.rdev),
                );
            }
            if e.mtime.is_some() {
                field(
                    "mtime",
                    e.mtime == a.mtime,
                    format!("{:?}", e.mtime),
                    format!("{:?}", a.mtime),
                );
            }
            if e.nlink.is_some() {
                field(
                    "nlink",
                    e.nlink == a.nlink,
                    format!("{:?}", e.nlink),
                    format!("{:?}", a.nlink),
                );
            }
            field(
                "hardlinks",
                e.hardlinks == a.hardlinks,
                format!("{:?}", e.hardlinks),
                format!("{:?}", a.hardlinks),
            );
            field(
                "xattrs",
                e.xattrs == a.xattrs,
                format!("{:?}", e.xattrs),
                format!("{:?}", a.xattrs),
            );
        }
        d
    }

    /// Panics listing the differences if `actual` does not match.
    pub fn assert_matches(&self, actual: &ExpectedTree) {
        let d = self.diff(actual);
        assert!(
            d.is_empty(),
            "unpacked tree differs from the expected one:\n  {}",
            d.join("\n  ")
        );
    }
}

/// The tree that unpacking `layers` in order gives, by the OCI layer rules:
/// an entry replaces what was at its path (a dir over a dir only updates
/// its metadata); `DIR/.wh.NAME` deletes `DIR/NAME` and all under it;
/// `DIR/.wh..wh..opq` deletes what lower layers have under `DIR` (this
/// layer's entries stay, whatever their order); a hardlink is the same inode
/// as its target. Panics if an entry's parent dir does not exist (a spec
/// bug).
pub fn expected_tree(layers: &[LayerSpec]) -> ExpectedTree {
    struct State {
        e: ExpectedEntry,
        ino: u64,
        layer: usize,
    }
    fn remove_subtree(map: &mut BTreeMap<String, State>, path: &str) {
        map.remove(path);
        let prefix = format!("{path}/");
        let under: Vec<String> = map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in under {
            map.remove(&k);
        }
    }
    let mut map: BTreeMap<String, State> = BTreeMap::new();
    let mut next_ino = 1u64;
    for (i, layer) in layers.iter().enumerate() {
        for te in &layer.entries {
            let path = normalize(&te.path);
            let (parent, name) = split(&path);
            if name == ".wh..wh..opq" {
                let prefix = if parent.is_empty() {
                    String::new()
                } else {
                    format!("{parent}/")
                };
                map.retain(|k, v| !(k.starts_with(&prefix) && v.layer < i));
                continue;
            }
            if let Some(target) = name.strip_prefix(".wh.") {
                remove_subtree(&mut map, &join(parent, target));
                continue;
            }
            if !parent.is_empty() && !matches!(map.get(parent), Some(s) if s.e.kind == Kind::Dir) {
                panic!("layer {i}: {path}: parent dir {parent:?} not in the tree (layer spec bug)");
            }
            let xattrs: BTreeMap<String, Vec<u8>> = te.xattrs.iter().cloned().collect();
            if let Node::Hardlink(target) = &te.node {
                let t = map.get(target).unwrap_or_else(|| {
                    panic!("layer {i}: {path}: hardlink target {target} missing")
                });
                let (mut e, ino) = (t.e.clone(), t.ino);
                e.path = path.clone();
                remove_subtree(&mut map, &path);
                map.insert(path, State { e, ino, layer: i });
                continue;
            }
            if te.node == Node::Dir
                && let Some(s) = map.get_mut(&path)
                && s.e.kind == Kind::Dir
            {
                s.e.mode = te.mode;
                s.e.uid = te.uid;
                s.e.gid = te.gid;
                s.e.xattrs = xattrs;
                s.layer = i;
                continue;
            }
            let mut e = ExpectedEntry {
                path: path.clone(),
                kind: Kind::File,
                mode: te.mode,
                uid: te.uid,
                gid: te.gid,
                link: None,
                size: None,
                sha256: None,
                rdev: None,
                mtime: None,
                nlink: None,
                hardlinks: Vec::new(),
                xattrs,
            };
            match &te.node {
                Node::File(c) => {
                    e.size = Some(c.len());
                    e.sha256 = Some(c.sha256());
                    e.mtime = Some(te.mtime as i64);
                }
                Node::Dir => e.kind = Kind::Dir,
                Node::Symlink(t) => {
                    e.kind = Kind::Symlink;
                    e.mode = 0o777;
                    e.size = Some(t.len() as u64);
                    e.link = Some(t.clone());
                }
                Node::CharDevice(ma, mi) => {
                    e.kind = Kind::CharDevice;
                    e.rdev = Some((*ma, *mi));
                }
                Node::BlockDevice(ma, mi) => {
                    e.kind = Kind::BlockDevice;
                    e.rdev = Some((*ma, *mi));
                }
                Node::Fifo => e.kind = Kind::Fifo,
                Node::Hardlink(_) => unreachable!(),
            }
            remove_subtree(&mut map, &path);
            map.insert(
                path,
                State {
                    e,
                    ino: next_ino,
                    layer: i,
                },
            );
            next_ino += 1;
        }
    }
    let mut by_ino: HashMap<u64, Vec<String>> = HashMap::new();
    for (path, s) in &map {
        if s.e.kind != Kind::Dir {
            by_ino.entry(s.ino).or_default().push(path.clone());
        }
    }
    let entries = map
        .into_iter()
        .map(|(path, s)| {
            let mut e = s.e;
            if e.kind != Kind::Dir {
                let group = &by_ino[&s.ino];
                e.nlink = Some(group.len() as u64);
                e.hardlinks = group.iter().filter(|p| **p != path).cloned().collect();
            }
            (path, e)
        })
        .collect();
    ExpectedTree { entries }
}

/// Reads the tree under `root` (not following symlinks) into the form of
/// [`expected_tree`], every applicable field filled (files are hashed).
pub fn scan_tree(root: &Path) -> ExpectedTree {
    let mut entries = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for ent in rd {
            let ent = ent.expect("read_dir entry");
            let full = ent.path();
            let rel = full
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let md = std::fs::symlink_metadata(&full).expect("lstat");
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_file() {
                Kind::File
            } else if ft.is_char_device() {
                Kind::CharDevice
            } else if ft.is_block_device() {
                Kind::BlockDevice
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            };
            let rdev = md.rdev();
            let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
            let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
            let e = ExpectedEntry {
                path: rel.clone(),
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                link: (kind == Kind::Symlink).then(|| {
                    std::fs::read_link(&full)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                }),
                size: matches!(kind, Kind::File | Kind::Symlink).then_some(md.size()),
                sha256: (kind == Kind::File)
                    .then(|| sha256_of(&mut File::open(&full).expect("open"), md.size())),
                rdev: matches!(kind, Kind::CharDevice | Kind::BlockDevice)
                    .then_some((major as u32, minor as u32)),
                mtime: (kind != Kind::Dir).then_some(md.mtime()),
                nlink: (kind != Kind::Dir).then_some(md.nlink()),
                hardlinks: Vec::new(),
                xattrs: read_xattrs(&full),
            };
            if kind == Kind::Dir {
                stack.push(full);
            } else {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            entries.insert(rel, e);
        }
    }
    for group in inodes.values() {
        for p in group {
            let mut others: Vec<String> = group.iter().filter(|o| *o != p).cloned().collect();
            others.sort();
            entries.get_mut(p).unwrap().hardlinks = others;
        }
    }
    ExpectedTree { entries }
}

/// `path`'s extended attributes (not following symlinks), without
/// `security.selinux` and `trusted.overlay.*`.
pub fn read_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path with NUL");
    let mut names = vec![0u8; 4096];
    // SAFETY: cpath is NUL-terminated; names is a writable buffer of the
    // length passed.
    let n = unsafe { libc::llistxattr(cpath.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out; // none, or not supported here
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let key = String::from_utf8_lossy(name).into_owned();
        if key == "security.selinux" || key.starts_with("trusted.overlay.") {
            continue;
        }
        let cname = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: both names are NUL-terminated; value is a writable buffer
        // of the length passed.
        let len = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len >= 0 {
            value.truncate(len as usize);
            out.insert(key, value);
        }
    }
    out
}

fn normalize(path: &str) -> String {
    path.trim_start_matches("./").trim_matches('/').to_string()
}

fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}
