//! Container seccomp profiles: an OCI `linux.seccomp` compiled to BPF with
//! seccompiler, installed by the setup helper before the container's
//! process executes.
//!
//! A seccompiler filter has one action on match and one on mismatch, while
//! an OCI profile gives each syscall rule an action of its own. A profile
//! therefore becomes a stack of filters; the kernel runs every filter of
//! the stack and keeps the most restrictive answer:
//! - for each action A that a rule uses (other than the default action):
//!   calls matching a rule with action A → A, others → allow;
//! - the default filter: calls matching any of those rules → allow, others
//!   → the default action (no such filter when the default is allow).
//!
//! Only x86_64 syscalls pass: the architecture check of every filter kills
//! a process making 32-bit (i386) calls. The guest kernel has no compat
//! syscalls (IA32 and x32 emulation are off), so nothing is lost. Unknown
//! syscall names are skipped, as runc and libseccomp skip them, so that a
//! profile written for several kernels works.

use std::collections::BTreeMap;
use std::str::FromStr;

use nix::errno::Errno;
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad seccomp profile: {0}")]
    Invalid(String),
    #[error("bad seccomp profile: {0}")]
    Filter(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] Errno),
}

/// A compiled profile: filters in installation order, and the flags of
/// seccomp(2).
#[derive(Debug)]
pub struct Profile {
    filters: Vec<BpfProgram>,
    flags: libc::c_ulong,
}

/// The rules of one action: syscall number → alternatives, each a list of
/// conditions that must all hold (an empty list matches every call).
type Rules = BTreeMap<i64, Vec<Vec<SeccompCondition>>>;

/// Compiles an OCI profile.
pub fn compile(seccomp: &LinuxSeccomp) -> Result<Profile, Error> {
    if seccomp.listener_path().is_some() {
        return Err(Error::Invalid(
            "listenerPath (a seccomp notification agent) is not supported".into(),
        ));
    }
    let flags = filter_flags(seccomp.flags().as_deref().unwrap_or_default())?;
    let default = action(seccomp.default_action(), seccomp.default_errno_ret())?;
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    for syscall in seccomp.syscalls().iter().flatten() {
        let action = action(syscall.action(), syscall.errno_ret())?;
        if action == default {
            continue;
        }
        let conditions = conditions(syscall.args().as_deref().unwrap_or_default())?;
        let index = match by_action.iter().position(|(a, _)| *a == action) {
            Some(index) => index,
            None => {
                by_action.push((action, Rules::new()));
                by_action.len() - 1
            }
        };
        let rules = &mut by_action[index].1;
        for name in syscall.names() {
            match Sysno::from_str(name) {
                Ok(sysno) => add_rule(rules, i64::from(sysno.id()), &conditions),
                Err(_) => tracing::warn!(syscall = %name, "unknown syscall in a seccomp profile"),
            }
        }
    }

    let arch = TargetArch::x86_64;
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        let mut listed = Rules::new();
        for (_, rules) in &by_action {
            for (nr, alternatives) in rules {
                for conditions in alternatives {
                    add_rule(&mut listed, *nr, conditions);
                }
            }
        }
        filters.push(build(listed, default, SeccompAction::Allow, arch)?);
    }
    // Allow rules need no filter of their own: the default filter lets
    // their calls through.
    for (action, rules) in by_action {
        if !rules.is_empty() && action != SeccompAction::Allow {
            filters.push(build(rules, SeccompAction::Allow, action, arch)?);
        }
    }
    Ok(Profile { filters, flags })
}

/// Installs the profile on the calling thread (the single-threaded setup
/// helper). Without no_new_privs the thread needs CAP_SYS_ADMIN.
pub fn install(profile: &Profile) -> Result<(), Error> {
    for filter in &profile.filters {
        let program = libc::sock_fprog {
            len: u16::try_from(filter.len()).map_err(|_| Error::Install(Errno::E2BIG))?,
            // seccompiler's sock_filter is #[repr(C)] with the kernel's layout.
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `len` instructions
        // from `filter`, which `program` borrows for the call. The flags are
        // plain bits. seccompiler's own apply_filter cannot pass flags.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                profile.flags,
                &program as *const libc::sock_fprog,
            )
        };
        Errno::result(ret).map_err(Error::Install)?;
    }
    Ok(())
}

fn build(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, Error> {
    let mut compiled = BTreeMap::new();
    for (nr, alternatives) in rules {
        let rules = alternatives
            .into_iter()
            .filter(|c| !c.is_empty())
            .map(SeccompRule::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Filter)?;
        compiled.insert(nr, rules);
    }
    let filter = SeccompFilter::new(compiled, mismatch, matched, arch).map_err(Error::Filter)?;
    BpfProgram::try_from(filter).map_err(Error::Filter)
}

/// Adds one alternative for `nr`; an unconditional one replaces the rest.
fn add_rule(rules: &mut Rules, nr: i64, conditions: &[SeccompCondition]) {
    let alternatives = rules.entry(nr).or_default();
    let unconditional = |a: &Vec<Vec<SeccompCondition>>| a.iter().any(Vec::is_empty);
    if unconditional(alternatives) {
        return;
    }
    if conditions.is_empty() {
        *alternatives = vec![Vec::new()];
    } else if !alternatives.iter().any(|a| a == conditions) {
        alternatives.push(conditions.to_vec());
    }
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, Error> {
    let errno = errno.unwrap_or(libc::EPERM as u32);
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(Error::Invalid(
                "SCMP_ACT_NOTIFY needs a seccomp notification agent, which is not supported".into(),
            ));
        }
    })
}

fn conditions(args: &[LinuxSeccompArg]) -> Result<Vec<SeccompCondition>, Error> {
    args.iter()
        .map(|arg| {
            let index = u8::try_from(arg.index()).unwrap_or(u8::MAX);
            let (op, value) = match arg.op() {
                LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
                LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
                LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
                LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
                LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
                LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
                // libseccomp: (arg & value) == valueTwo.
                LinuxSeccompOperator::ScmpCmpMaskedEq => (
                    SeccompCmpOp::MaskedEq(arg.value()),
                    arg.value_two().unwrap_or(0),
                ),
            };
            SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
                .map_err(|e| Error::Invalid(format!("argument {}: {e}", arg.index())))
        })
        .collect()
}

fn filter_flags(flags: &[LinuxSeccompFilterFlag]) -> Result<libc::c_ulong, Error> {
    let mut bits = 0;
    for flag in flags {
        bits |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // The helper has a single thread: nothing to synchronise.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(Error::Invalid(
                    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV applies to notification agents, \
                     which are not supported"
                        .into(),
                ));
            }
        };
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("test profile")
    }

    fn compiled(json: &str) -> Profile {
        compile(&profile(json)).expect("compiles")
    }

    fn getppid_errno() -> i32 {
        // SAFETY: getppid has no arguments.
        errno_of(unsafe { libc::syscall(libc::SYS_getppid) })
    }

    /// Runs `body` in a forked child with `profile` installed; returns
    /// the child's wait status. The child only makes raw syscalls.
    fn in_child(profile: &Profile, body: fn() -> i32) -> nix::sys::wait::WaitStatus {
        // SAFETY: the child installs filters that are already built (no
        // allocation) and makes raw syscalls before _exit.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code = match install(profile) {
                    Ok(()) => body(),
                    Err(_) => 99,
                };
                // SAFETY: _exit ends the forked child without running the
                // parent's destructors.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("waitpid")
            }
        }
    }

    fn errno_of(ret: libc::c_long) -> i32 {
        if ret >= 0 { 0 } else { Errno::last_raw() }
    }

    fn lseek_whence(whence: libc::c_long) -> i32 {
        // SAFETY: lseek on an invalid descriptor; no memory involved.
        errno_of(unsafe { libc::syscall(libc::SYS_lseek, -1, 0, whence) })
    }

    #[test]
    fn default_errno_with_an_allow_list() {
        // What runtimes' default profiles look like: deny unless listed.
        let profile = compiled(
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["lseek", "exit", "exit_group", "no_such_call"],
                              "action": "SCMP_ACT_ALLOW"}]}"#,
        );
        let status = in_child(&profile, || {
            let denied = getppid_errno();
            let allowed = lseek_whence(0);
            if denied == libc::EPERM && allowed == libc::EBADF {
                0
            } else {
                1
            }
        });
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(status.pid().unwrap(), 0)
        );
    }

    #[test]
    fn each_rule_gets_its_own_action_and_arguments_select() {
        let profile = compiled(
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                  {"names": ["lseek"], "action": "SCMP_ACT_ERRNO", "errnoRet": 74,
                   "args": [{"index": 2, "value": 3, "op": "SCMP_CMP_EQ"}]},
                  {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}"#,
        );
        assert_eq!(profile.filters.len(), 2, "one filter per errno value");
        let status = in_child(&profile, || {
            let getppid = getppid_errno();
            let seek_data = lseek_whence(3);
            let seek_set = lseek_whence(0);
            let ok =
                getppid == libc::ENOSYS && seek_data == libc::EBADMSG && seek_set == libc::EBADF;
            if ok { 0 } else { 1 }
        });
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{status:?}"
        );
    }

    #[test]
    fn a_kill_rule_kills_with_sigsys() {
        let profile = compiled(
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        let status = in_child(&profile, || {
            getppid_errno();
            0
        });
        assert!(
            matches!(
                status,
                nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "{status:?}"
        );
    }

    #[test]
    fn an_allow_all_profile_installs_nothing() {
        let profile = compiled(
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}"#,
        );
        assert!(profile.filters.is_empty());
    }

    #[test]
    fn unsupported_or_malformed_profiles_are_refused() {
        for (json, expected) in [
            (r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#, "SCMP_ACT_NOTIFY"),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"}"#,
                "listenerPath",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                  "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]}"#,
                "argument 6",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO",
                    "flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]}"#,
                "WAIT_KILLABLE_RECV",
            ),
        ] {
            let error = compile(&profile(json)).expect_err(json).to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
