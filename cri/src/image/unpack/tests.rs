//! These run as root: they really chown, mknod and set xattrs.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tar::{EntryType, Header};

use super::*;

/// `setcap cap_net_raw+ep`: a v2 `vfs_cap_data`, effective, permitted bit 13.
const CAP_NET_RAW: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];
const MTIME: u64 = 1_600_000_000;

/// A layer under construction. Paths are written raw: the `tar` builder
/// refuses the `..` and absolute paths the malicious tests need.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn entry(
        &mut self,
        kind: EntryType,
        path: &str,
        link: &str,
        data: &[u8],
        edit: impl FnOnce(&mut Header),
    ) -> &mut Self {
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        edit(&mut header);
        header.set_cksum();
        self.0.append(&header, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.entry(EntryType::Regular, path, "", data, |_| {})
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(EntryType::Directory, path, "", b"", |_| {})
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(EntryType::Symlink, path, target, b"", |_| {})
    }

    fn hard_link(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(EntryType::Link, path, target, b"", |_| {})
    }

    /// A pax header for the next member.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.entry(
            EntryType::XHeader,
            "PaxHeaders/x",
            "",
            &pax_records(records),
            |_| {},
        )
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        // The length counts itself.
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        write!(data, "{len} {key}=").unwrap();
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    data
}

/// A tempdir holding `root` (the tree) and `outside`, which no layer may
/// touch.
struct Sandbox {
    _tmp: tempfile::TempDir,
    top: PathBuf,
    root: PathBuf,
    outside: PathBuf,
}

fn sandbox() -> Sandbox {
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().to_path_buf();
    let (root, outside) = (top.join("root"), top.join("outside"));
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    Sandbox {
        _tmp: tmp,
        top,
        root,
        outside,
    }
}

impl Sandbox {
    fn apply(&self, layer: &[u8]) -> Result<LayerStats, Error> {
        self.apply_with(layer, &Limits::default())
    }

    fn apply_with(&self, layer: &[u8], limits: &Limits) -> Result<LayerStats, Error> {
        apply_layer(&self.root, layer, Compression::None, limits)
    }

    fn path(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    /// The top holds only `root` and `outside`; `outside` holds `expected`.
    fn assert_outside(&self, expected: &[&str]) {
        assert_eq!(names(&self.top), ["outside", "root"]);
        assert_eq!(names(&self.outside), expected);
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn lstat(path: &Path) -> fs::Metadata {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let (path, name) = (
        CString::new(path.as_os_str().as_bytes()).unwrap(),
        CString::new(name).unwrap(),
    );
    let mut value = vec![0u8; 256];
    // SAFETY: `path` and `name` are NUL-terminated; `value` is a live buffer
    // of `value.len()` bytes the kernel writes at most that many bytes to.
    let len = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    let len = usize::try_from(len).ok()?;
    value.truncate(len);
    Some(value)
}

#[test]
fn files_dirs_symlinks_and_hard_links() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .file("./bin/busybox", b"#!busybox")
        .symlink("bin/sh", "/bin/busybox")
        .symlink("bin/dangling", "../nowhere/at/all")
        .hard_link("bin/ls", "bin/busybox");
    let stats = sb.apply(&t.finish()).unwrap();
    assert_eq!((stats.entries, stats.bytes, stats.whiteouts), (6, 29, 0));

    assert_eq!(
        fs::read(sb.path("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(lstat(&sb.path("etc/hosts")).mode() & 0o7777, 0o644);
    assert_eq!(lstat(&sb.path("etc")).mode() & 0o7777, 0o755);
    // The implicit parent of ./bin/busybox.
    assert!(lstat(&sb.path("bin")).is_dir());
    assert_eq!(
        fs::read_link(sb.path("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        fs::read_link(sb.path("bin/dangling")).unwrap(),
        Path::new("../nowhere/at/all")
    );
    let (busybox, ls) = (lstat(&sb.path("bin/busybox")), lstat(&sb.path("bin/ls")));
    assert_eq!(busybox.ino(), ls.ino());
    assert_eq!(busybox.nlink(), 2);

    // A second layer replaces a file and a symlink, and links a symlink.
    let mut t = Tar::new();
    t.file("etc/hosts", b"new")
        .file("bin/sh", b"not a link")
        .hard_link("bin/dangling2", "bin/dangling");
    sb.apply(&t.finish()).unwrap();
    assert_eq!(fs::read(sb.path("etc/hosts")).unwrap(), b"new");
    assert!(lstat(&sb.path("bin/sh")).is_file());
    let (a, b) = (
        lstat(&sb.path("bin/dangling")),
        lstat(&sb.path("bin/dangling2")),
    );
    assert!(b.file_type().is_symlink());
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn owners_setuid_and_capabilities_survive() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.entry(EntryType::Regular, "bin/su", "", b"su", |h| {
        h.set_mode(0o4755);
        h.set_uid(1000);
        h.set_gid(1000);
    })
    .pax(&[
        ("SCHILY.xattr.security.capability", &CAP_NET_RAW),
        ("uid", b"1000"),
        ("gid", b"1000"),
    ])
    .file("bin/ping", b"ping")
    .entry(EntryType::Directory, "tmp", "", b"", |h| h.set_mode(0o1777))
    .entry(EntryType::Symlink, "home", "", b"", |h| {
        h.set_link_name("/var/home").unwrap();
        h.set_uid(1001);
        h.set_gid(1002);
    })
    // Large ids only fit in pax records.
    .pax(&[("uid", b"3000000"), ("gid", b"3000001")])
    .file("big-ids", b"");
    sb.apply(&t.finish()).unwrap();

    let su = lstat(&sb.path("bin/su"));
    assert_eq!(
        (su.mode() & 0o7777, su.uid(), su.gid()),
        (0o4755, 1000, 1000)
    );
    let ping = lstat(&sb.path("bin/ping"));
    assert_eq!((ping.uid(), ping.gid()), (1000, 1000));
    assert_eq!(
        xattr(&sb.path("bin/ping"), "security.capability").unwrap(),
        CAP_NET_RAW
    );
    assert_eq!(lstat(&sb.path("tmp")).mode() & 0o7777, 0o1777);
    let home = lstat(&sb.path("home"));
    assert_eq!((home.uid(), home.gid()), (1001, 1002));
    let big = lstat(&sb.path("big-ids"));
    assert_eq!((big.uid(), big.gid()), (3_000_000, 3_000_001));
}

#[test]
fn xattr_namespaces() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.pax(&[
        ("SCHILY.xattr.user.note", b"hello\nworld"),
        ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ("SCHILY.xattr.system.nonsense", b"x"),
    ])
    .dir("data")
    .pax(&[("SCHILY.xattr.trusted.mark", &[0, 1, 10, 255])])
    .symlink("link", "data");
    sb.apply(&t.finish()).unwrap();
    assert_eq!(
        xattr(&sb.path("data"), "user.note").unwrap(),
        b"hello\nworld"
    );
    assert_eq!(xattr(&sb.path("data"), "trusted.overlay.opaque"), None);
    assert_eq!(xattr(&sb.path("data"), "system.nonsense"), None);
    // Set on the symlink itself, not on what it points to.
    assert_eq!(
        xattr(&sb.path("link"), "trusted.mark").unwrap(),
        [0, 1, 10, 255]
    );
    assert_eq!(xattr(&sb.path("data"), "trusted.mark"), None);
}

#[test]
fn devices_and_fifos() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.entry(EntryType::Char, "dev/null", "", b"", |h| {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_mode(0o666);
    })
    .entry(EntryType::Block, "dev/loop9", "", b"", |h| {
        h.set_device_major(7).unwrap();
        h.set_device_minor(9).unwrap();
        h.set_mode(0o660);
        h.set_gid(6);
    })
    .entry(EntryType::Fifo, "run/initctl", "", b"", |h| {
        h.set_mode(0o4600)
    });
    sb.apply(&t.finish()).unwrap();

    let null = lstat(&sb.path("dev/null"));
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let block = lstat(&sb.path("dev/loop9"));
    assert!(block.file_type().is_block_device());
    assert_eq!(
        (block.rdev(), block.gid()),
        (nix::sys::stat::makedev(7, 9), 6)
    );
    let fifo = lstat(&sb.path("run/initctl"));
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o4600);
}

#[test]
fn times_are_kept() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.entry(EntryType::Directory, "d", "", b"", |h| {
        h.set_mtime(1_500_000_000)
    })
    .entry(EntryType::Regular, "d/f", "", b"x", |h| {
        h.set_mtime(1_400_000_000)
    })
    .entry(EntryType::Symlink, "d/l", "f", b"", |h| {
        h.set_mtime(1_300_000_000)
    })
    .pax(&[("mtime", b"1200000000.25")])
    .file("d/precise", b"")
    .pax(&[("mtime", b"-1.25")])
    .file("d/old", b"")
    // Children added later change the directory: its time is set last.
    .file("d/late", b"");
    sb.apply(&t.finish()).unwrap();
    let time = |p: &str| {
        let m = lstat(&sb.path(p));
        ((m.mtime(), m.mtime_nsec()), (m.atime(), m.atime_nsec()))
    };
    assert_eq!(time("d"), ((1_500_000_000, 0), (1_500_000_000, 0)));
    assert_eq!(time("d/f"), ((1_400_000_000, 0), (1_400_000_000, 0)));
    assert_eq!(time("d/l").0, (1_300_000_000, 0));
    assert_eq!(time("d/precise").0, (1_200_000_000, 250_000_000));
    assert_eq!(time("d/old").0, (-2, 750_000_000));
}

#[test]
fn whiteouts_remove_files_and_dirs() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.file("etc/passwd", b"root")
        .file("var/cache/a/b", b"b")
        .file("keep", b"");
    sb.apply(&t.finish()).unwrap();

    let mut t = Tar::new();
    t.file(
        "etc/.wh.passwd",
        b"whiteouts carry no data, but skip it if they do",
    )
    .file("var/.wh.cache", b"")
    .file("nowhere/.wh.x", b"")
    .file(".wh..wh.plnk", b"")
    .file("etc/.wh..wh.aufs", b"");
    let stats = sb.apply(&t.finish()).unwrap();
    assert_eq!(stats.whiteouts, 3);
    assert_eq!(names(&sb.path("etc")), Vec::<String>::new());
    assert_eq!(names(&sb.path("var")), Vec::<String>::new());
    assert_eq!(names(&sb.root), ["etc", "keep", "var"]);
}

#[test]
fn opaque_whiteout_keeps_this_layers_entries_in_any_order() {
    for opaque_first in [false, true] {
        let sb = sandbox();
        let mut t = Tar::new();
        t.file("d/lower", b"")
            .file("d/sub/lower", b"")
            .file("d/gone/deep/lower", b"")
            .file("d/both/lower", b"")
            .file("other/lower", b"");
        sb.apply(&t.finish()).unwrap();

        let mut t = Tar::new();
        if opaque_first {
            t.file("d/.wh..wh..opq", b"");
        }
        t.file("d/new", b"").file("d/sub/new", b"").dir("d/both");
        if !opaque_first {
            t.file("d/.wh..wh..opq", b"");
        }
        t.file("d/after", b"");
        let stats = sb.apply(&t.finish()).unwrap();
        assert_eq!(stats.whiteouts, 1);
        assert_eq!(
            names(&sb.path("d")),
            ["after", "both", "new", "sub"],
            "opaque first: {opaque_first}"
        );
        assert_eq!(names(&sb.path("d/sub")), ["new"]);
        assert_eq!(names(&sb.path("d/both")), Vec::<String>::new());
        assert_eq!(names(&sb.path("other")), ["lower"]);
    }
}

#[test]
fn files_and_dirs_replace_each_other() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.file("a", b"file")
        .file("b/c/d", b"deep")
        .entry(EntryType::Directory, "keep", "", b"", |h| h.set_mode(0o700));
    t.file("keep/child", b"");
    sb.apply(&t.finish()).unwrap();

    let mut t = Tar::new();
    t.dir("a").file("a/x", b"").file("b", b"now a file");
    t.entry(EntryType::Directory, "keep", "", b"", |h| h.set_mode(0o751));
    sb.apply(&t.finish()).unwrap();
    assert_eq!(names(&sb.path("a")), ["x"]);
    assert_eq!(fs::read(sb.path("b")).unwrap(), b"now a file");
    // An existing directory stays, children and all, with new metadata.
    assert_eq!(names(&sb.path("keep")), ["child"]);
    assert_eq!(lstat(&sb.path("keep")).mode() & 0o7777, 0o751);
}

#[test]
fn the_root_entry_sets_the_roots_metadata() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.entry(EntryType::Directory, "./", "", b"", |h| {
        h.set_mode(0o750);
        h.set_uid(5);
    });
    sb.apply(&t.finish()).unwrap();
    let root = lstat(&sb.root);
    assert_eq!(
        (root.mode() & 0o7777, root.uid(), root.mtime()),
        (0o750, 5, MTIME as i64)
    );

    let mut t = Tar::new();
    t.file(".", b"");
    assert!(matches!(sb.apply(&t.finish()), Err(Error::Refused { .. })));
}

#[test]
fn long_names_and_pax_sizes() {
    let sb = sandbox();
    let long = format!("{}/file", "d".repeat(150));
    let long_target = format!("{}/target", "t".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    // GNU headers: the builder writes ././@LongLink members.
    let mut header = Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    b.append_data(&mut header, &long, &b"long"[..]).unwrap();
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Symlink);
    b.append_link(&mut header, "link", &long_target).unwrap();
    let mut t = Tar(b);
    // As Go writes files over 8 GiB: size 0 in the header, the real one in pax.
    t.pax(&[
        ("size", b"5"),
        ("path", long.replace("file", "pax").as_bytes()),
    ]);
    let mut header = Header::new_ustar();
    header.set_path("short").unwrap();
    header.set_size(0);
    header.set_cksum();
    t.0.append(&header, &b"12345"[..]).unwrap();
    t.file("after", b"ok");
    sb.apply(&t.finish()).unwrap();

    assert_eq!(fs::read(sb.root.join(&long)).unwrap(), b"long");
    assert_eq!(
        fs::read_link(sb.path("link")).unwrap(),
        Path::new(&long_target)
    );
    assert_eq!(
        fs::read(sb.root.join(long.replace("file", "pax"))).unwrap(),
        b"12345"
    );
    assert_eq!(fs::read(sb.path("after")).unwrap(), b"ok");
    assert!(!exists(&sb.path("short")));
}

#[test]
fn gzip_and_zstd_layers() {
    let mut t = Tar::new();
    t.file("hello", b"compressed");
    let tar = t.finish();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&tar).unwrap();
    let gzip = gzip.finish().unwrap();
    let zstd = zstd::encode_all(&tar[..], 3).unwrap();
    for (compression, blob) in [(Compression::Gzip, gzip), (Compression::Zstd, zstd)] {
        let sb = sandbox();
        apply_layer(&sb.root, &blob[..], compression, &Limits::default()).unwrap();
        assert_eq!(fs::read(sb.path("hello")).unwrap(), b"compressed");
        // A corrupt stream fails.
        let mut bad = blob.clone();
        let middle = bad.len() / 2;
        bad[middle] ^= 0xff;
        bad.truncate(bad.len() - 4);
        assert!(apply_layer(&sb.root, &bad[..], compression, &Limits::default()).is_err());
    }
}

#[test]
fn media_types() {
    let cases = [
        ("application/vnd.oci.image.layer.v1.tar", Compression::None),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::Zstd,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            Compression::None,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
            Compression::Zstd,
        ),
        (
            "application/vnd.docker.image.rootfs.diff.tar",
            Compression::None,
        ),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            Compression::Gzip,
        ),
        (
            "application/vnd.docker.image.rootfs.diff.tar.zstd",
            Compression::Zstd,
        ),
    ];
    for (media_type, expected) in cases {
        assert_eq!(
            compression_for(media_type).unwrap(),
            expected,
            "{media_type}"
        );
    }
    let err = compression_for("application/vnd.oci.image.layer.v1.tar+lz4").unwrap_err();
    assert!(matches!(err, Error::UnsupportedMediaType(t) if t.ends_with("lz4")));
}

// Malicious layers. Each checks that nothing outside the root changed.

#[test]
fn absolute_paths_stay_inside() {
    let sb = sandbox();
    let target = format!("{}/abs", sb.outside.display());
    let mut t = Tar::new();
    t.file(&target, b"x")
        .file("/etc/shadow", b"y")
        .file("//././/twice", b"z");
    sb.apply(&t.finish()).unwrap();
    sb.assert_outside(&[]);
    assert_eq!(
        fs::read(sb.root.join(target.trim_start_matches('/'))).unwrap(),
        b"x"
    );
    assert_eq!(fs::read(sb.path("etc/shadow")).unwrap(), b"y");
    assert_eq!(fs::read(sb.path("twice")).unwrap(), b"z");
}

#[test]
fn dot_dot_is_refused() {
    for path in ["../outside/x", "a/../../outside/x", "a/..", ".."] {
        let sb = sandbox();
        sb.assert_outside(&[]);
        let mut t = Tar::new();
        t.file(path, b"escape");
        let err = sb.apply(&t.finish()).unwrap_err();
        assert!(
            matches!(&err, Error::Refused { path: p, .. } if p == path),
            "{err}"
        );
        sb.assert_outside(&[]);
        assert_eq!(names(&sb.root), Vec::<String>::new());
    }
    // In a link target too, and in a pax path.
    let sb = sandbox();
    let mut t = Tar::new();
    t.hard_link("passwd", "../../etc/passwd");
    assert!(matches!(sb.apply(&t.finish()), Err(Error::Refused { .. })));
    let mut t = Tar::new();
    t.pax(&[("path", b"x/../../../outside/y")])
        .file("innocent", b"");
    assert!(matches!(sb.apply(&t.finish()), Err(Error::Refused { .. })));
    sb.assert_outside(&[]);
    assert_eq!(names(&sb.root), Vec::<String>::new());
}

#[test]
fn symlinks_resolve_inside_the_root() {
    let sb = sandbox();
    let outside = sb.outside.to_str().unwrap();
    let absolute = format!("/../..{outside}");
    let mut t = Tar::new();
    t.symlink("etc", &absolute)
        .file("etc/passwd", b"inside")
        .symlink("rel", "../../../outside")
        .file("rel/x", b"inside too")
        .symlink("abs", outside)
        .dir("abs/sub")
        .file("abs/sub/y", b"");
    sb.apply(&t.finish()).unwrap();
    sb.assert_outside(&[]);
    let inside = sb.root.join(outside.trim_start_matches('/'));
    assert_eq!(fs::read(inside.join("passwd")).unwrap(), b"inside");
    assert_eq!(fs::read(sb.path("outside/x")).unwrap(), b"inside too");
    assert!(lstat(&inside.join("sub/y")).is_file());
    // The links themselves stay as written.
    assert_eq!(fs::read_link(sb.path("etc")).unwrap(), Path::new(&absolute));

    // Missing targets are made where the kernel would resolve them.
    let mut t = Tar::new();
    t.dir("a/b")
        .symlink("a/b/up", "../../c/./d")
        .file("a/b/up/file", b"")
        .symlink("a/top", "../../../../..")
        .file("a/top/y/z", b"")
        .symlink("a/chain", "b/up/e")
        .file("a/chain/f", b"")
        .symlink("loop", "loop/x")
        .file("loop/y", b"");
    let err = sb.apply(&t.finish()).unwrap_err();
    assert!(err.to_string().contains("loop/y"), "{err}");
    assert!(lstat(&sb.path("c/d/file")).is_file());
    assert!(lstat(&sb.path("y/z")).is_file());
    assert!(lstat(&sb.path("c/d/e/f")).is_file());
    sb.assert_outside(&[]);
}

#[test]
fn a_symlink_in_the_final_component_is_replaced_not_followed() {
    let sb = sandbox();
    fs::write(sb.outside.join("target"), b"host").unwrap();
    let target = sb.outside.join("target");
    let outside_mode = lstat(&sb.outside).mode();
    let mut t = Tar::new();
    t.symlink("f", target.to_str().unwrap())
        .symlink("d", sb.outside.to_str().unwrap());
    sb.apply(&t.finish()).unwrap();

    let mut t = Tar::new();
    t.file("f", b"layer")
        .dir("d")
        .entry(EntryType::Directory, "d", "", b"", |h| h.set_mode(0o700));
    t.file("d/new", b"");
    sb.apply(&t.finish()).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"host");
    assert_eq!(fs::read(sb.path("f")).unwrap(), b"layer");
    assert!(lstat(&sb.path("d")).is_dir());
    sb.assert_outside(&["target"]);
    assert_eq!(lstat(&sb.outside).mode(), outside_mode);
}

#[test]
fn hard_links_resolve_inside_the_root() {
    let sb = sandbox();
    fs::write(sb.outside.join("secret"), b"host").unwrap();
    let outside = sb.outside.to_str().unwrap();
    let mut t = Tar::new();
    t.symlink("esc", outside).hard_link("h", "esc/secret");
    let err = sb.apply(&t.finish()).unwrap_err();
    assert!(
        matches!(&err, Error::Refused { reason, .. } if reason.contains("missing")),
        "{err}"
    );
    assert_eq!(lstat(&sb.outside.join("secret")).nlink(), 1);

    // With a file at the same place inside the root, that one is linked.
    let inside = format!("{}/secret", outside.trim_start_matches('/'));
    let mut t = Tar::new();
    t.file(&inside, b"inside")
        .hard_link("h", "esc/secret")
        .hard_link("h2", "/esc/secret");
    sb.apply(&t.finish()).unwrap();
    let ino = lstat(&sb.root.join(&inside)).ino();
    assert_eq!(lstat(&sb.path("h")).ino(), ino);
    assert_eq!(lstat(&sb.path("h2")).ino(), ino);
    assert_eq!(lstat(&sb.outside.join("secret")).nlink(), 1);
    sb.assert_outside(&["secret"]);

    // Directories and the root cannot be linked.
    let mut t = Tar::new();
    t.dir("dir").hard_link("to-dir", "dir");
    assert!(matches!(sb.apply(&t.finish()), Err(Error::Refused { .. })));
    let mut t = Tar::new();
    t.hard_link("to-root", "/");
    assert!(matches!(sb.apply(&t.finish()), Err(Error::Refused { .. })));
}

#[test]
fn huge_extension_headers_fail_without_reading_them() {
    for kind in [
        EntryType::XHeader,
        EntryType::GNULongName,
        EntryType::XGlobalHeader,
    ] {
        let sb = sandbox();
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        header.set_path("huge").unwrap();
        header.set_size(10 << 30);
        header.set_cksum();
        let layer = header.as_bytes().to_vec();
        let start = Instant::now();
        let err = sb.apply(&layer).unwrap_err();
        assert!(matches!(err, Error::Limit { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    // One really over the limit fails too.
    let sb = sandbox();
    let mut t = Tar::new();
    t.pax(&[("comment", &vec![b'x'; 2 << 20])]).file("f", b"");
    assert!(matches!(sb.apply(&t.finish()), Err(Error::Limit { .. })));
    assert_eq!(names(&sb.root), Vec::<String>::new());
    sb.assert_outside(&[]);
}

#[test]
fn broken_archives_fail() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.file("a", &[7; 2000]);
    let mut truncated = t.finish();
    truncated.truncate(1024);
    assert!(matches!(sb.apply(&truncated), Err(Error::Malformed(_))));

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(matches!(sb.apply(&garbage), Err(Error::Malformed(_))));

    let mut t = Tar::new();
    t.pax(&[("path", b"x")]);
    let mut dangling = t.finish();
    dangling.truncate(1024);
    assert!(sb.apply(&dangling).is_err());

    let mut bad_record = Tar::new();
    bad_record
        .entry(EntryType::XHeader, "p", "", b"99 path=x\n", |_| {})
        .file("f", b"");
    assert!(matches!(
        sb.apply(&bad_record.finish()),
        Err(Error::Malformed(_))
    ));
    sb.assert_outside(&[]);
}

#[test]
fn limits_are_enforced() {
    let sb = sandbox();
    let mut t = Tar::new();
    for i in 0..5 {
        t.file(&format!("f{i}"), b"12345678");
    }
    let layer = t.finish();
    let limit = |limits: Limits| sb.apply_with(&layer, &limits).unwrap_err();
    let err = limit(Limits {
        max_entries: 3,
        ..Limits::default()
    });
    assert!(
        matches!(
            err,
            Error::Limit {
                what: "entries",
                ..
            }
        ),
        "{err}"
    );
    let err = limit(Limits {
        max_total_bytes: 2048,
        ..Limits::default()
    });
    assert!(
        matches!(
            err,
            Error::Limit {
                what: "layer size",
                ..
            }
        ),
        "{err}"
    );
    let err = limit(Limits {
        max_path_bytes: 1,
        ..Limits::default()
    });
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    let mut t = Tar::new();
    t.dir("ab").dir("cd");
    let limits = Limits {
        max_dir_path_bytes: 3,
        ..Limits::default()
    };
    let err = sb.apply_with(&t.finish(), &limits).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Limit {
                what: "directory path bytes",
                ..
            }
        ),
        "{err}"
    );
    sb.assert_outside(&[]);
}

#[test]
fn unsupported_and_invalid_entries_fail() {
    let sb = sandbox();
    let mut t = Tar::new();
    t.entry(EntryType::GNUSparse, "sparse", "", b"", |_| {});
    let err = sb.apply(&t.finish()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedType { kind: 'S', .. }),
        "{err}"
    );
    let mut t = Tar::new();
    t.pax(&[("GNU.sparse.major", b"1")]).file("sparse", b"");
    assert!(matches!(
        sb.apply(&t.finish()),
        Err(Error::UnsupportedType { .. })
    ));
    for name in ["d/.wh...", "d/.wh..", "d/.wh."] {
        let mut t = Tar::new();
        t.file("d/x", b"").file(name, b"");
        let err = sb.apply(&t.finish()).unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{name}: {err}");
    }
    assert_eq!(names(&sb.path("d")), ["x"]);
    sb.assert_outside(&[]);
}
