//! Builds initramfs images (newc cpio, optionally gzip): the guest's initrd
//! (agent as /init) and the lab's L1 initrd (busybox, QEMU, test payload).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use cpio::newc::{self, ModeFileType};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is larger than 4 GiB, the limit of a cpio entry", path.display())]
    TooLarge { path: PathBuf },
    #[error("cannot run ldd on {}", path.display())]
    Ldd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ldd cannot resolve libraries of {}: {detail}", path.display())]
    MissingLibrary { path: PathBuf, detail: String },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    HostFile { source: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
    CharDev { major: u32, minor: u32 },
}

/// An initramfs described as paths; parents are created implicitly.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

fn key(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl Initramfs {
    /// An empty image with `/dev/console`, which the kernel opens for PID 1's
    /// stdio before anything can mount devtmpfs.
    pub fn new() -> Initramfs {
        let mut image = Initramfs::default();
        image.char_dev("/dev/console", 5, 1);
        image
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entries.insert(key(path), Entry::Dir);
        self
    }

    pub fn host_file(&mut self, path: &str, source: &Path, mode: u32) -> &mut Self {
        let source = source.to_path_buf();
        self.entries
            .insert(key(path), Entry::HostFile { source, mode });
        self
    }

    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        let data = data.into();
        self.entries.insert(key(path), Entry::Bytes { data, mode });
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let target = target.to_string();
        self.entries.insert(key(path), Entry::Symlink { target });
        self
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.entries
            .insert(key(path), Entry::CharDev { major, minor });
        self
    }

    /// Adds a dynamically linked program at `path` and every shared library
    /// `ldd` lists for it at the library's own absolute path.
    pub fn program(&mut self, path: &str, source: &Path) -> Result<&mut Self, Error> {
        for lib in shared_libraries(source)? {
            let lib_path = lib.to_string_lossy().into_owned();
            self.host_file(&lib_path, &lib, 0o755);
        }
        Ok(self.host_file(path, source, 0o755))
    }

    /// Whether the image has an entry at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&key(path))
    }

    /// Writes the image as a newc cpio archive, gzip-compressed if `gzip`.
    pub fn write(&self, out: &Path, gzip: bool) -> Result<(), Error> {
        let write_err = |source| Error::Write {
            path: out.to_path_buf(),
            source,
        };
        let file = BufWriter::new(File::create(out).map_err(write_err)?);
        if gzip {
            let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            self.write_cpio(&mut encoder, out)?;
            encoder
                .finish()
                .map_err(write_err)?
                .flush()
                .map_err(write_err)
        } else {
            let mut file = file;
            self.write_cpio(&mut file, out)?;
            file.flush().map_err(write_err)
        }
    }

    fn write_cpio(&self, w: &mut impl Write, out: &Path) -> Result<(), Error> {
        let write_err = |source| Error::Write {
            path: out.to_path_buf(),
            source,
        };
        let mut ino = 1u32;
        let mut written_dirs = std::collections::BTreeSet::new();
        for (path, entry) in &self.entries {
            for parent in parents(path) {
                if written_dirs.insert(parent.to_string()) && !self.entries.contains_key(parent) {
                    ino += 1;
                    write_entry(w, parent, &Entry::Dir, ino)?;
                }
            }
            if matches!(entry, Entry::Dir) {
                written_dirs.insert(path.clone());
            }
            ino += 1;
            write_entry(w, path, entry, ino)?;
        }
        newc::trailer(w).map_err(write_err)?;
        Ok(())
    }
}

/// `a/b/c` → `a`, `a/b`.
fn parents(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

fn write_entry(w: &mut impl Write, path: &str, entry: &Entry, ino: u32) -> Result<(), Error> {
    let header = newc::Builder::new(path).ino(ino).nlink(1);
    let io_err = |source| Error::Write {
        path: PathBuf::from(path),
        source,
    };
    match entry {
        Entry::Dir => finish(
            header
                .mode(0o755)
                .nlink(2)
                .set_mode_file_type(ModeFileType::Directory),
            w,
            &[],
        )
        .map_err(io_err),
        Entry::Bytes { data, mode } => finish(
            header.mode(*mode).set_mode_file_type(ModeFileType::Regular),
            w,
            data,
        )
        .map_err(io_err),
        Entry::Symlink { target } => finish(
            header.mode(0o777).set_mode_file_type(ModeFileType::Symlink),
            w,
            target.as_bytes(),
        )
        .map_err(io_err),
        Entry::CharDev { major, minor } => finish(
            header
                .mode(0o600)
                .rdev_major(*major)
                .rdev_minor(*minor)
                .set_mode_file_type(ModeFileType::Char),
            w,
            &[],
        )
        .map_err(io_err),
        Entry::HostFile { source, mode } => {
            let read_err = |e| Error::Read {
                path: source.clone(),
                source: e,
            };
            let mut file = File::open(source).map_err(read_err)?;
            let len = file.metadata().map_err(read_err)?.len();
            let len = u32::try_from(len).map_err(|_| Error::TooLarge {
                path: source.clone(),
            })?;
            let header = header.mode(*mode).set_mode_file_type(ModeFileType::Regular);
            let mut writer = header.write(&mut *w, len);
            let copied = io::copy(&mut file, &mut writer).map_err(io_err)?;
            if copied != u64::from(len) {
                return Err(Error::Read {
                    path: source.clone(),
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, "file changed size"),
                });
            }
            writer.finish().map(drop).map_err(io_err)
        }
    }
}

fn finish(header: newc::Builder, w: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(io::Error::other)?;
    let mut writer = header.write(w, len);
    writer.write_all(data)?;
    writer.finish().map(drop)
}

/// The shared libraries (and the ELF interpreter) a program needs, by `ldd`.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, Error> {
    let output = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|source| Error::Ldd {
            path: program.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let detail = String::from_utf8_lossy(&output.stderr).trim().to_string();
        // ldd exits 1 for static programs and plain files (said on stdout
        // or stderr): they need nothing.
        let not_dynamic = |s: &str| s.contains("not a dynamic executable");
        if not_dynamic(&text) || not_dynamic(&detail) || detail.is_empty() {
            return Ok(Vec::new());
        }
        return Err(Error::MissingLibrary {
            path: program.to_path_buf(),
            detail,
        });
    }
    parse_ldd(&text).map_err(|detail| Error::MissingLibrary {
        path: program.to_path_buf(),
        detail,
    })
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("=> not found") {
            return Err(line.to_string());
        }
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Reads a whole archive back as (path, mode, size) triples, for checks.
pub fn list(archive: &Path) -> io::Result<Vec<(String, u32, u32)>> {
    let file = File::open(archive)?;
    let mut magic = [0u8; 2];
    io::Read::read_exact(&mut File::open(archive)?, &mut magic)?;
    let mut reader: Box<dyn io::Read> = if magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(io::BufReader::new(file))
    };
    let mut entries = Vec::new();
    loop {
        let entry_reader = newc::Reader::new(reader)?;
        let entry = entry_reader.entry();
        if entry.is_trailer() {
            return Ok(entries);
        }
        entries.push((entry.name().to_string(), entry.mode(), entry.file_size()));
        reader = Box::new(entry_reader.finish()?);
    }
}

/// Makes the directory for `path`'s file, for callers writing images.
pub fn create_parent(path: &Path) -> Result<(), Error> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            fs::create_dir_all(dir).map_err(|source| Error::Write {
                path: dir.to_path_buf(),
                source,
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn archive_has_parents_devices_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initrd.gz");
        let mut image = Initramfs::new();
        image
            .bytes("/init", "#!/bin/sh\n", 0o755)
            .bytes("/usr/share/x/data", vec![7u8; 5], 0o644)
            .symlink("/bin/sh", "busybox")
            .dir("/proc");
        image.write(&out, true).unwrap();
        let entries = list(&out).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "proc",
                "usr",
                "usr/share",
                "usr/share/x",
                "usr/share/x/data"
            ]
        );
        let mode = |name: &str| entries.iter().find(|e| e.0 == name).unwrap().1;
        assert_eq!(mode("dev/console") & 0o170000, 0o020000);
        assert_eq!(mode("bin/sh") & 0o170000, 0o120000);
        assert_eq!(mode("init"), 0o100755);
        assert_eq!(mode("usr/share") & 0o170000, 0o040000);
        let size = |name: &str| entries.iter().find(|e| e.0 == name).unwrap().2;
        assert_eq!(size("usr/share/x/data"), 5);
    }

    #[test]
    fn programs_bring_their_libraries() {
        let mut image = Initramfs::new();
        image.program("/bin/ls", Path::new("/bin/ls")).unwrap();
        assert!(image.contains("/bin/ls"));
        assert!(image.contains("/lib64/ld-linux-x86-64.so.2"));
    }

    #[test]
    fn missing_host_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = Initramfs::new();
        image.host_file("/x", Path::new("/nonexistent/file"), 0o644);
        let err = image.write(&dir.path().join("out"), false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/file"), "{err}");
    }
}
