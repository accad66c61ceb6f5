//! Device access for a container: cgroup v2 has no devices.allow file; the
//! kernel asks a BPF_PROG_TYPE_CGROUP_DEVICE program attached to the
//! cgroup instead (as runc and youki do). We build the program from the
//! OCI rules, load it and attach it to the container's cgroup without
//! BPF_F_ALLOW_OVERRIDE, so nothing below (a container creating cgroups of
//! its own) can loosen it.
//!
//! Rules (`Rule`) are those of the cgroup v1 devices controller that OCI
//! carries over, evaluated as a list where the last rule that matches
//! decides: everything is denied first, then come the devices every
//! container may use (runc's list: null, zero, full, random, urandom, tty,
//! console, ptmx, pts, net/tun, and mknod of any node), then the
//! container's own device nodes, then the spec's `linux.resources.devices`
//! (so a privileged container's `a *:* rwm` opens everything, and a block
//! device handed over read-only can deny its writes).
//!
//! An allow rule decides only for an access it covers whole (an O_RDWR open
//! under `allow r` falls through); a deny rule decides as soon as it covers
//! part of the access.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType};

use super::Error;

/// Access bits of `struct bpf_cgroup_dev_ctx` (BPF_DEVCG_ACC_*).
const MKNOD: u32 = 1;
const READ: u32 = 2;
const WRITE: u32 = 4;
/// Device types of the context (BPF_DEVCG_DEV_*).
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

/// Largest major and minor numbers of Linux's dev_t (12 and 20 bits).
pub const MAX_MAJOR: i64 = 0xfff;
pub const MAX_MINOR: i64 = 0xf_ffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    All,
    Char,
    Block,
}

/// One device rule; `None` numbers match any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

impl Rule {
    const fn char(major: u32, minor: Option<u32>, access: u32) -> Self {
        Self {
            allow: true,
            kind: Kind::Char,
            major: Some(major),
            minor,
            access,
        }
    }

    /// Whether this rule decides for a request, and how.
    fn decides(&self, kind: Kind, major: u32, minor: u32, access: u32) -> Option<bool> {
        let device = (self.kind == Kind::All || self.kind == kind)
            && self.major.is_none_or(|m| m == major)
            && self.minor.is_none_or(|m| m == minor);
        let covered = if self.allow {
            access & !self.access == 0
        } else {
            access & self.access != 0
        };
        (device && covered).then_some(self.allow)
    }
}

const RWM: u32 = READ | WRITE | MKNOD;
const RW: u32 = READ | WRITE;

/// What every container may use (runc's default list).
const DEFAULT_ALLOWED: [Rule; 12] = [
    Rule {
        allow: true,
        kind: Kind::Char,
        major: None,
        minor: None,
        access: MKNOD,
    },
    Rule {
        allow: true,
        kind: Kind::Block,
        major: None,
        minor: None,
        access: MKNOD,
    },
    Rule::char(1, Some(3), RWM),    // null
    Rule::char(1, Some(5), RWM),    // zero
    Rule::char(1, Some(7), RWM),    // full
    Rule::char(1, Some(8), RWM),    // random
    Rule::char(1, Some(9), RWM),    // urandom
    Rule::char(5, Some(0), RWM),    // tty
    Rule::char(5, Some(1), RW),     // console
    Rule::char(5, Some(2), RWM),    // ptmx
    Rule::char(136, None, RWM),     // pts/*
    Rule::char(10, Some(200), RWM), // net/tun
];

/// The rules for a container: deny all, the default list, its device
/// nodes, then the spec's rules.
pub fn rules(nodes: &[LinuxDevice], spec_rules: &[LinuxDeviceCgroup]) -> Result<Vec<Rule>, Error> {
    let mut rules = vec![Rule {
        allow: false,
        kind: Kind::All,
        major: None,
        minor: None,
        access: RWM,
    }];
    rules.extend(DEFAULT_ALLOWED);
    for (i, node) in nodes.iter().enumerate() {
        let field = |name: &str| format!("linux.devices[{i}].{name}");
        let kind = match node.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => Kind::Char,
            LinuxDeviceType::B => Kind::Block,
            // A FIFO is no device: the device rules do not see it.
            LinuxDeviceType::P => continue,
            LinuxDeviceType::A => {
                return Err(Error::Invalid(format!(
                    "{}: 'a' is no node type",
                    field("type")
                )));
            }
        };
        rules.push(Rule {
            allow: true,
            kind,
            major: Some(number(&field("major"), node.major(), MAX_MAJOR)?),
            minor: Some(number(&field("minor"), node.minor(), MAX_MINOR)?),
            access: RWM,
        });
    }
    for (i, rule) in spec_rules.iter().enumerate() {
        rules.push(from_oci(rule, &format!("linux.resources.devices[{i}]"))?);
    }
    Ok(rules)
}

fn from_oci(rule: &LinuxDeviceCgroup, field: &str) -> Result<Rule, Error> {
    let kind = match rule.typ().unwrap_or(LinuxDeviceType::A) {
        LinuxDeviceType::A => Kind::All,
        LinuxDeviceType::C | LinuxDeviceType::U => Kind::Char,
        LinuxDeviceType::B => Kind::Block,
        LinuxDeviceType::P => {
            return Err(Error::Invalid(format!(
                "{field}.type: 'p' (a FIFO) is not a device the device rules control"
            )));
        }
    };
    let wildcard = |value: Option<i64>, name: &str, max: i64| match value {
        None | Some(-1) => Ok(None),
        Some(v) => number(&format!("{field}.{name}"), v, max)
            .map(Some)
            .map_err(|e| Error::Invalid(format!("{e}, or -1 for any"))),
    };
    Ok(Rule {
        allow: rule.allow(),
        kind,
        major: wildcard(rule.major(), "major", MAX_MAJOR)?,
        minor: wildcard(rule.minor(), "minor", MAX_MINOR)?,
        access: access_bits(rule.access().as_deref(), field)?,
    })
}

/// A device number from 0 to `max` (dev_t's 12-bit majors and 20-bit
/// minors): anything else is refused, never wrapped into another device's.
pub fn number(field: &str, value: i64, max: i64) -> Result<u32, Error> {
    u32::try_from(value)
        .ok()
        .filter(|v| i64::from(*v) <= max)
        .ok_or_else(|| Error::Invalid(format!("{field}: {value} is out of range (0 to {max})")))
}

/// "rwm" letters to access bits; empty or absent means all (OCI).
fn access_bits(access: Option<&str>, field: &str) -> Result<u32, Error> {
    let access = access.unwrap_or("");
    if access.is_empty() {
        return Ok(RWM);
    }
    access.chars().try_fold(0, |bits, c| match c {
        'r' => Ok(bits | READ),
        'w' => Ok(bits | WRITE),
        'm' => Ok(bits | MKNOD),
        _ => Err(Error::Invalid(format!(
            "{field}.access: {access:?} must be letters of \"rwm\""
        ))),
    })
}

/// What the rules answer for one access: the last rule that decides wins.
/// The BPF program computes the same (see `program`); tests compare both.
pub fn allowed(rules: &[Rule], kind: Kind, major: u32, minor: u32, access: u32) -> bool {
    rules
        .iter()
        .rev()
        .find_map(|r| r.decides(kind, major, minor, access))
        .unwrap_or(false)
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes: class | operation | source.
const LDX_W: u8 = 0x01 | 0x60; // BPF_LDX | BPF_MEM | BPF_W
const MOV_REG: u8 = 0x07 | 0xb0 | 0x08; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV_IMM: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
const AND_IMM: u8 = 0x07 | 0x50; // BPF_ALU64 | BPF_AND | BPF_K
const RSH_IMM: u8 = 0x07 | 0x70; // BPF_ALU64 | BPF_RSH | BPF_K
const JEQ_IMM: u8 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const JNE_IMM: u8 = 0x05 | 0x50; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT

// Registers: r1 the context on entry; r3 type, r4 access, r5 major, r6
// minor; r7 scratch; r0 the answer.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const TYPE: u8 = 3;
const ACCESS: u8 = 4;
const MAJOR: u8 = 5;
const MINOR: u8 = 6;
const SCRATCH: u8 = 7;

/// The program: the rules from last to first, each a block that jumps to
/// the next one when it does not decide; deny when none does.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut code = vec![
        insn(LDX_W, R2, R1, 0, 0), // access_type = access << 16 | type
        insn(MOV_REG, TYPE, R2, 0, 0),
        insn(AND_IMM, TYPE, 0, 0, 0xffff),
        insn(MOV_REG, ACCESS, R2, 0, 0),
        insn(RSH_IMM, ACCESS, 0, 0, 16),
        insn(LDX_W, MAJOR, R1, 4, 0),
        insn(LDX_W, MINOR, R1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        code.extend(block(rule));
    }
    code.push(insn(MOV_IMM, R0, 0, 0, 0));
    code.push(insn(EXIT, 0, 0, 0, 0));
    code
}

/// One rule's block. Jumps are filled in once its length is known: each
/// skips to the end of the block.
fn block(rule: &Rule) -> Vec<Insn> {
    // (opcode, register, immediate) of each "skip unless" test.
    let mut tests: Vec<(u8, u8, i32)> = Vec::new();
    match rule.kind {
        Kind::All => {}
        Kind::Char => tests.push((JNE_IMM, TYPE, DEV_CHAR)),
        Kind::Block => tests.push((JNE_IMM, TYPE, DEV_BLOCK)),
    }
    // Majors and minors fit an i32 (checked at parsing).
    if let Some(major) = rule.major {
        tests.push((JNE_IMM, MAJOR, major as i32));
    }
    if let Some(minor) = rule.minor {
        tests.push((JNE_IMM, MINOR, minor as i32));
    }
    let (mask, skip_if) = if rule.allow {
        // Skip when the access asks for a bit the rule lacks.
        ((!rule.access & RWM) as i32, JNE_IMM)
    } else {
        // Skip when the access and the rule share no bit.
        (rule.access as i32, JEQ_IMM)
    };
    // tests, then mov + and + access test, then mov r0 + exit.
    let len = tests.len() + 5;
    let mut code = Vec::with_capacity(len);
    let skip = |at: usize| i16::try_from(len - at - 1).unwrap_or(i16::MAX);
    for (op, reg, imm) in tests {
        code.push(insn(op, reg, 0, skip(code.len()), imm));
    }
    code.push(insn(MOV_REG, SCRATCH, ACCESS, 0, 0));
    code.push(insn(AND_IMM, SCRATCH, 0, 0, mask));
    code.push(insn(skip_if, SCRATCH, 0, skip(code.len()), 0));
    code.push(insn(MOV_IMM, R0, 0, 0, i32::from(rule.allow)));
    code.push(insn(EXIT, 0, 0, 0, 0));
    code
}

/// Runs instructions `program` emits as the kernel would, for a context
/// `[access << 16 | type, major, minor]`: the tests and the fuzz target
/// compare it with [`allowed`]. Panics on anything `program` never emits.
#[cfg(any(test, feature = "fuzzing"))]
pub fn run_program(code: &[Insn], ctx: [u32; 3]) -> u64 {
    let mut reg = [0u64; 11];
    let mut pc = 0usize;
    let imm = |i: &Insn| i64::from(i.imm) as u64;
    loop {
        let i = code[pc];
        pc += 1;
        let (dst, src) = (usize::from(i.regs & 0xf), usize::from(i.regs >> 4));
        let jump = |taken: bool| match taken {
            true => usize::try_from(i.off).expect("forward jumps only"),
            false => 0,
        };
        match i.code {
            LDX_W => {
                assert_eq!(src, usize::from(R1), "loads from the context only");
                reg[dst] = u64::from(ctx[usize::try_from(i.off / 4).expect("a context field")]);
            }
            MOV_REG => reg[dst] = reg[src],
            MOV_IMM => reg[dst] = imm(&i),
            AND_IMM => reg[dst] &= imm(&i),
            RSH_IMM => reg[dst] >>= i.imm,
            JEQ_IMM => pc += jump(reg[dst] == imm(&i)),
            JNE_IMM => pc += jump(reg[dst] != imm(&i)),
            EXIT => return reg[0],
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
}

/// The context's access bits and device types, for callers of
/// [`run_program`].
pub const ACCESS_READ: u32 = READ;
pub const ACCESS_WRITE: u32 = WRITE;
pub const ACCESS_MKNOD: u32 = MKNOD;
pub const TYPE_BLOCK: u32 = DEV_BLOCK as u32;
pub const TYPE_CHAR: u32 = DEV_CHAR as u32;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The head of `union bpf_attr` for BPF_PROG_LOAD.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The head of `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] head of union
    // bpf_attr for `cmd`, and the size passed is its size; the kernel reads
    // (and for a load's log, writes through pointers set by the caller to
    // live buffers) nothing beyond.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Loads the program for `rules`; a verifier refusal carries its log.
fn load(rules: &[Rule]) -> Result<OwnedFd, Error> {
    let code = program(rules);
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(code.len())
            .map_err(|_| Error::Invalid(format!("{} device rules are too many", rules.len())))?,
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: u32::try_from(log.len()).unwrap_or(u32::MAX),
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    attr.prog_name[..7].copy_from_slice(b"devices");
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new fd we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(source) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(Error::Devices {
                what: format!(
                    "the device program was refused ({} rules): {}",
                    rules.len(),
                    String::from_utf8_lossy(&log[..end]).trim()
                ),
                source,
            })
        }
    }
}

/// Loads the program for `rules` and attaches it to the cgroup at `dir`.
/// The cgroup keeps the program: the fds close here.
pub fn attach(dir: &Path, rules: &[Rule]) -> Result<(), Error> {
    let program = load(rules)?;
    let cgroup = std::fs::File::open(dir).map_err(|source| Error::Devices {
        what: format!("cannot open {}", dir.display()),
        source,
    })?;
    let mut attr = ProgAttach {
        target_fd: fd_u32(&cgroup),
        attach_bpf_fd: fd_u32(&program),
        attach_type: BPF_CGROUP_DEVICE,
        // No BPF_F_ALLOW_OVERRIDE/MULTI: cgroups below cannot add theirs.
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map_err(|source| Error::Devices {
        what: format!("cannot attach the device program to {}", dir.display()),
        source,
    })?;
    Ok(())
}

fn fd_u32(fd: &impl AsRawFd) -> u32 {
    // An open fd is never negative.
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
