//! A tar reader with bounded memory. The `tar` crate's iterator reads pax
//! and GNU long name headers into memory whatever size they declare (and
//! cannot honour a pax `size` in raw mode), so only its header field parsing
//! is used; members are walked here, reading them as Go's `archive/tar`
//! (which wrote and, in containerd, reads most layers) does.

use std::io::{self, Read, Write};
use std::path::Path;

use tar::Header;

use super::{Error, Limits};

const BLOCK: u64 = 512;
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// What an archive member makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Char,
    Block,
    Fifo,
}

/// A time as the archive gives it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// One archive member, its extension headers applied.
#[derive(Debug)]
pub(super) struct Member {
    pub kind: Kind,
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits, setuid/setgid/sticky included.
    pub mode: u32,
    pub mtime: Time,
    /// Major and minor, for devices.
    pub device: (u32, u32),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Extension headers read before the member they describe.
#[derive(Default)]
struct Pending {
    pax: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

pub(super) struct TarReader<R> {
    inner: R,
    max_extension: u64,
    max_total: u64,
    /// Bytes read from `inner` so far.
    total: u64,
    /// Data bytes of the current member not read yet, and its padding.
    remaining: u64,
    padding: u64,
    /// The current member's path, for messages.
    current: String,
    scratch: Vec<u8>,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, limits: &Limits) -> Self {
        TarReader {
            inner,
            max_extension: limits.max_extension_bytes,
            max_total: limits.max_total_bytes,
            total: 0,
            remaining: 0,
            padding: 0,
            current: String::new(),
            scratch: vec![0; 64 << 10],
        }
    }

    /// The next member, or `None` at the end of the archive. Skips what the
    /// caller did not read of the previous member's data.
    pub fn next_member(&mut self) -> Result<Option<Member>, Error> {
        self.skip_data()?;
        let mut pending = Pending::default();
        loop {
            let Some(header) = self.read_header()? else {
                if pending.pax.is_some()
                    || pending.long_name.is_some()
                    || pending.long_link.is_some()
                {
                    return Err(Error::Malformed("extension header without a member".into()));
                }
                return Ok(None);
            };
            let slot = match header.entry_type().as_byte() {
                b'x' => &mut pending.pax,
                b'L' => &mut pending.long_name,
                b'K' => &mut pending.long_link,
                // Global pax headers: read and ignored, as containerd does.
                b'g' => {
                    self.read_extension(&header)?;
                    pending = Pending::default();
                    continue;
                }
                _ => return self.member(&header, pending).map(Some),
            };
            if slot.is_some() {
                return Err(Error::Malformed(
                    "two extension headers of a kind for one member".into(),
                ));
            }
            *slot = Some(self.read_extension(&header)?);
        }
    }

    /// Copies the current member's data into `out`; returns its length.
    pub fn copy_data(&mut self, out: &mut impl Write, path: &Path) -> Result<u64, Error> {
        self.with_scratch(|this, buf| {
            let mut copied = 0u64;
            while this.remaining > 0 {
                let n = this.read_data(buf)?;
                out.write_all(&buf[..n])
                    .map_err(super::at(path, "writing"))?;
                copied = copied
                    .checked_add(n as u64)
                    .ok_or_else(|| this.truncated())?;
            }
            Ok(copied)
        })
    }

    /// Reads what follows the archive's end, up to the stream's end.
    pub fn drain(&mut self) -> Result<(), Error> {
        self.with_scratch(|this, buf| {
            while this.read_raw(buf)? > 0 {}
            Ok(())
        })
    }

    fn with_scratch<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut [u8]) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = f(self, &mut scratch);
        self.scratch = scratch;
        result
    }

    /// Reads up to `buf.len()` bytes of the current member's data.
    fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let want = usize::try_from(self.remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let n = self.read_raw(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(self.truncated());
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// Skips the rest of the current member's data and its padding.
    fn skip_data(&mut self) -> Result<(), Error> {
        let mut left = self
            .remaining
            .checked_add(self.padding)
            .ok_or_else(|| self.truncated())?;
        self.with_scratch(|this, buf| {
            while left > 0 {
                let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                let n = this.read_raw(&mut buf[..want])?;
                if n == 0 {
                    return Err(this.truncated());
                }
                left -= n as u64;
            }
            Ok(())
        })?;
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    /// Every read goes through here, to count against `max_total_bytes`.
    fn read_raw(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let n = loop {
            match self.inner.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Read(e)),
            }
        };
        self.total = self.total.saturating_add(n as u64);
        if self.total > self.max_total {
            return Err(Error::Limit {
                what: "layer size",
                limit: self.max_total,
            });
        }
        Ok(n)
    }

    /// Fills `buf`; false if the stream ended before its first byte.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<bool, Error> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.read_raw(&mut buf[filled..])? {
                0 if filled == 0 => return Ok(false),
                0 => return Err(self.truncated()),
                n => filled += n,
            }
        }
        Ok(true)
    }

    /// The next header; `None` at an end-of-archive block or at the end of
    /// the stream (Go's reader accepts a stream ending between members).
    fn read_header(&mut self) -> Result<Option<Header>, Error> {
        let mut header = Header::new_old();
        if !self.read_full(header.as_mut_bytes())? || header.as_bytes().iter().all(|&b| b == 0) {
            return Ok(None);
        }
        check_sum(&header)?;
        Ok(Some(header))
    }

    /// An extension header's content, its size checked before reading.
    fn read_extension(&mut self, header: &Header) -> Result<Vec<u8>, Error> {
        let size = unsigned(numeric(&header.as_old().size)?)?;
        if size > self.max_extension {
            return Err(Error::Limit {
                what: "extension header size",
                limit: self.max_extension,
            });
        }
        let mut data = vec![0; usize::try_from(size).map_err(|_| bad_number())?];
        self.read_full(&mut data)?;
        self.padding = padding(size);
        self.skip_data()?;
        Ok(data)
    }

    fn member(&mut self, header: &Header, pending: Pending) -> Result<Member, Error> {
        let path = match pending.long_name {
            Some(name) => until_nul(name),
            None => header.path_bytes().into_owned(),
        };
        let link = match pending.long_link {
            Some(link) => until_nul(link),
            None => header
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default(),
        };
        let old = header.as_old();
        let mut member = Member {
            kind: Kind::File,
            path,
            link,
            uid: id(unsigned(numeric(&old.uid)?)?)?,
            gid: id(unsigned(numeric(&old.gid)?)?)?,
            mode: u32::try_from(unsigned(numeric(&old.mode)?)? & 0o7777)
                .map_err(|_| bad_number())?,
            mtime: Time {
                secs: numeric(&old.mtime)?,
                nanos: 0,
            },
            device: (0, 0),
            xattrs: Vec::new(),
        };
        let mut size = unsigned(numeric(&old.size)?)?;
        let mut sparse = false;
        if let Some(pax) = &pending.pax {
            let records = apply_pax(&mut member, pax)?;
            size = records.size.unwrap_or(size);
            sparse = records.sparse;
        }
        self.current = String::from_utf8_lossy(&member.path).into_owned();
        member.kind = match (header.entry_type().as_byte(), sparse) {
            (b'\0', false) if member.path.ends_with(b"/") => Kind::Dir,
            (b'0' | b'\0' | b'7', false) => Kind::File,
            (b'1', false) => Kind::HardLink,
            (b'2', false) => Kind::Symlink,
            (b'3', false) => Kind::Char,
            (b'4', false) => Kind::Block,
            (b'5', false) => Kind::Dir,
            (b'6', false) => Kind::Fifo,
            (flag, _) => {
                return Err(Error::UnsupportedType {
                    path: self.current.clone(),
                    kind: if sparse { 'S' } else { char::from(flag) },
                });
            }
        };
        if matches!(member.kind, Kind::Char | Kind::Block) {
            // Where ustar and GNU headers keep them (V7 headers have none).
            let (major, minor) = match (header.as_ustar(), header.as_gnu()) {
                (Some(ustar), _) => (&ustar.dev_major, &ustar.dev_minor),
                (_, Some(gnu)) => (&gnu.dev_major, &gnu.dev_minor),
                _ => {
                    return Err(Error::Malformed(format!(
                        "{}: device without numbers",
                        self.current
                    )));
                }
            };
            let device = |field: &[u8]| u32::try_from(numeric(field)?).map_err(|_| bad_number());
            member.device = (device(major)?, device(minor)?);
        }
        // Only regular files carry data; Go ignores the size of the others.
        self.remaining = if member.kind == Kind::File { size } else { 0 };
        self.padding = padding(self.remaining);
        Ok(member)
    }

    fn truncated(&self) -> Error {
        Error::Malformed(format!("truncated archive (at {:?})", self.current))
    }
}

/// What a pax header says beyond the member's own fields.
#[derive(Default)]
struct PaxRecords {
    size: Option<u64>,
    sparse: bool,
}

/// Applies a pax header's records ("<len> <key>=<value>\n", `len` counting
/// the whole record; values may hold any byte, newlines included).
fn apply_pax(member: &mut Member, mut data: &[u8]) -> Result<PaxRecords, Error> {
    let bad = || Error::Malformed("malformed pax record".into());
    let mut records = PaxRecords::default();
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len = usize::try_from(number(&data[..space])?).map_err(|_| bad())?;
        if len <= space || len > data.len() {
            return Err(bad());
        }
        let (record, rest) = data.split_at(len);
        data = rest;
        let body = record[space + 1..].strip_suffix(b"\n").ok_or_else(bad)?;
        let equals = body.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let (key, value) = (&body[..equals], &body[equals + 1..]);
        match key {
            b"path" => member.path = value.to_vec(),
            b"linkpath" => member.link = value.to_vec(),
            b"size" => records.size = Some(number(value)?),
            b"uid" => member.uid = id(number(value)?)?,
            b"gid" => member.gid = id(number(value)?)?,
            b"mtime" => member.mtime = time(value).ok_or_else(bad)?,
            _ if key.starts_with(b"GNU.sparse.") => records.sparse = true,
            _ => {
                if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                    member.xattrs.push((name.to_vec(), value.to_vec()));
                }
            }
        }
    }
    Ok(records)
}

fn number(digits: &[u8]) -> Result<u64, Error> {
    std::str::from_utf8(digits)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Malformed("bad number in pax record".into()))
}

/// A pax time: decimal seconds, maybe negative, maybe with a fraction.
fn time(value: &[u8]) -> Option<Time> {
    let text = std::str::from_utf8(value).ok()?;
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = whole.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = fraction.bytes().chain(std::iter::repeat(b'0')).take(9);
    let nanos = digits.fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    if whole.starts_with('-') && nanos > 0 {
        // -1.25 is 1.25 s before the epoch: -2 s plus 0.75 s.
        return Some(Time {
            secs: secs.checked_sub(1)?,
            nanos: 1_000_000_000 - nanos,
        });
    }
    Some(Time { secs, nanos })
}

fn id(value: u64) -> Result<u32, Error> {
    u32::try_from(value).map_err(|_| Error::Malformed(format!("owner id {value} out of range")))
}

/// Accepts the unsigned sum (POSIX) or the signed one (old Sun tars).
fn check_sum(header: &Header) -> Result<(), Error> {
    let expected = unsigned(numeric(&header.as_old().cksum)?)?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in header.as_bytes().iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if expected == unsigned || i64::try_from(expected).is_ok_and(|e| e == signed) {
        return Ok(());
    }
    Err(Error::Malformed("header checksum mismatch".into()))
}

/// A GNU long name ends at its first NUL.
fn until_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    if let Some(end) = bytes.iter().position(|&b| b == 0) {
        bytes.truncate(end);
    }
    bytes
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// A numeric header field as Go reads it: octal text (empty is 0), or
/// big-endian two's complement base-256 when the top bit is set.
fn numeric(field: &[u8]) -> Result<i64, Error> {
    let Some(&first) = field.first() else {
        return Ok(0);
    };
    if first & 0x80 != 0 {
        let invert = if first & 0x40 != 0 { 0xff } else { 0 };
        let mut value = 0u64;
        for (i, &byte) in field.iter().enumerate() {
            let byte = if i == 0 {
                (byte ^ invert) & 0x7f
            } else {
                byte ^ invert
            };
            if value >> 56 != 0 {
                return Err(bad_number());
            }
            value = value << 8 | u64::from(byte);
        }
        let value = i64::try_from(value).map_err(|_| bad_number())?;
        return Ok(if invert != 0 { !value } else { value });
    }
    // Padded with spaces or NULs on either side.
    let pad = |b: &u8| *b == b' ' || *b == 0;
    let start = field.iter().position(|b| !pad(b)).unwrap_or(field.len());
    let end = field.iter().rposition(|b| !pad(b)).map_or(start, |i| i + 1);
    let text = &field[start..end];
    if text.is_empty() {
        return Ok(0);
    }
    if !text.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return Err(bad_number());
    }
    let text = std::str::from_utf8(text).map_err(|_| bad_number())?;
    i64::from_str_radix(text, 8).map_err(|_| bad_number())
}

fn unsigned(value: i64) -> Result<u64, Error> {
    u64::try_from(value).map_err(|_| bad_number())
}

fn bad_number() -> Error {
    Error::Malformed("bad number in a header".into())
}
