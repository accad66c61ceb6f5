//! Turning the helper into the container's process: cwd, rlimits, user,
//! capabilities, no_new_privs, seccomp, exec.

use super::*;

/// A process ready to execute: everything applied but the exec itself.
pub(super) struct Prepared {
    path: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    /// A seccomp profile installed right before execve (no_new_privs).
    seccomp: Option<seccomp::Profile>,
}

impl Prepared {
    pub(super) fn exec(self) -> Result<Infallible, Error> {
        reset_signals();
        if let Some(profile) = &self.seccomp {
            seccomp::install(profile)?;
        }
        let Err(e) = nix::unistd::execve(&self.path, &self.args, &self.env);
        Err(Error::sys(format!(
            "cannot execute {}",
            self.path.to_string_lossy()
        ))(e))
    }
}

/// Signals as a fresh process expects them: none blocked (the agent blocks
/// its init signals), none ignored (Rust ignores SIGPIPE).
pub(super) fn reset_signals() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: installing SIG_DFL, no handler code involved.
            let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        }
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

pub(super) fn cstring(what: &str, s: impl AsRef<[u8]>) -> Result<CString, Error> {
    CString::new(s.as_ref()).map_err(|_| Error::Invalid(format!("{what} contains a NUL byte")))
}

pub(super) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `name` like execvp does, with the PATH of the process's env.
pub(super) fn find_executable(name: &str, env: &[String]) -> Result<PathBuf, Error> {
    let is_executable = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(Error::Invalid(format!("executable {name} not found")))
        };
    }
    let path_var = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path_var
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| Error::Invalid(format!("executable file '{name}' not found in $PATH")))
}

pub(super) fn rlimit_resource(typ: PosixRlimitType) -> libc::__rlimit_resource_t {
    match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

pub(super) fn cap_set(
    names: &Option<oci_spec::runtime::Capabilities>,
) -> Result<Option<HashSet<caps::Capability>>, Error> {
    let Some(names) = names else { return Ok(None) };
    let mut set = HashSet::new();
    for name in names {
        let text = format!("CAP_{name}");
        let cap = caps::Capability::from_str(&text)
            .map_err(|_| Error::Invalid(format!("unknown capability {text}")))?;
        set.insert(cap);
    }
    Ok(Some(set))
}

pub(super) fn caps_error(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> Error {
    move |e| Error::Io {
        what: what.into(),
        source: io::Error::other(e.to_string()),
    }
}

/// Applies everything but the exec. A process of a container in a user
/// namespace enters it after its rlimits (raising a hard limit needs guest
/// root) and before its ids, capabilities and seccomp filter, which then
/// all apply inside it.
pub(super) fn prepare_process(
    process: &Process,
    seccomp: Option<&LinuxSeccomp>,
    userns: Option<&Userns>,
) -> Result<Prepared, Error> {
    let profile = seccomp.map(seccomp::compile).transpose()?;
    let args = process.args().clone().unwrap_or_default();
    let Some(arg0) = args.first() else {
        return Err(Error::Invalid("process.args is empty".into()));
    };
    let env = process.env().clone().unwrap_or_default();
    let cwd = process.cwd();
    nix::unistd::chdir(cwd).map_err(|e| {
        Error::Invalid(format!(
            "cannot change to the working directory {}: {e}",
            cwd.display()
        ))
    })?;
    for rlimit in process.rlimits().iter().flatten() {
        let limit = libc::rlimit {
            rlim_cur: rlimit.soft(),
            rlim_max: rlimit.hard(),
        };
        // SAFETY: setrlimit reads one rlimit from a valid pointer.
        Errno::result(unsafe { libc::setrlimit(rlimit_resource(rlimit.typ()), &limit) })
            .map_err(Error::sys(format!("cannot set {:?}", rlimit.typ())))?;
    }
    nix::unistd::setsid().map_err(Error::sys("setsid"))?;
    if process.terminal() == Some(true) {
        // SAFETY: TIOCSCTTY on our stdin (the PTY slave); no memory.
        Errno::result(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })
            .map_err(Error::sys("cannot make the terminal the controlling one"))?;
    }
    if let Some(userns) = userns {
        userns.enter()?;
    }
    let user = process.user();
    if let Some(umask) = user.umask() {
        nix::sys::stat::umask(Mode::from_bits_truncate(umask));
    }
    let path = find_executable(arg0, &env)?;

    // The seccomp filter goes on as runc puts it: with no_new_privs last,
    // right before execve; without, installing it takes CAP_SYS_ADMIN, so
    // before the change of user and capabilities, whose syscalls (and the
    // init's last words with the agent) the profile must then allow.
    let no_new_privs = process.no_new_privileges() == Some(true);
    let mut seccomp_at_exec = None;
    if let Some(profile) = profile {
        if no_new_privs {
            seccomp_at_exec = Some(profile);
        } else {
            seccomp::install(&profile)?;
        }
    }

    // Capabilities around the change of user, as runc does: drop the
    // bounding set first, keep the permitted set across setuid, then set
    // the final sets. A cap the agent itself lacks cannot be granted, so
    // each set is limited to the agent's bounding set.
    let available = caps::read(None, caps::CapSet::Bounding).map_err(caps_error("read caps"))?;
    let capabilities = process.capabilities().clone();
    let wanted = |f: fn(
        &oci_spec::runtime::LinuxCapabilities,
    ) -> &Option<oci_spec::runtime::Capabilities>|
     -> Result<Option<HashSet<caps::Capability>>, Error> {
        match &capabilities {
            Some(c) => Ok(cap_set(f(c))?.map(|s| s.intersection(&available).copied().collect())),
            None => Ok(None),
        }
    };
    let bounding = wanted(|c| c.bounding())?;
    let effective = wanted(|c| c.effective())?;
    let permitted = wanted(|c| c.permitted())?;
    let inheritable = wanted(|c| c.inheritable())?;
    let ambient = wanted(|c| c.ambient())?;
    if let Some(bounding) = &bounding {
        for cap in available.difference(bounding) {
            caps::drop(None, caps::CapSet::Bounding, *cap)
                .map_err(caps_error("drop bounding cap"))?;
        }
    }
    // SAFETY: prctl with integer arguments only.
    Errno::result(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) })
        .map_err(Error::sys("PR_SET_KEEPCAPS"))?;
    let gids: Vec<nix::unistd::Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).map_err(Error::sys("setgroups"))?;
    nix::unistd::setresgid(user.gid().into(), user.gid().into(), user.gid().into())
        .map_err(Error::sys(format!("cannot set gid {}", user.gid())))?;
    nix::unistd::setresuid(user.uid().into(), user.uid().into(), user.uid().into())
        .map_err(Error::sys(format!("cannot set uid {}", user.uid())))?;
    // SAFETY: as above.
    Errno::result(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) })
        .map_err(Error::sys("PR_SET_KEEPCAPS"))?;
    if capabilities.is_some() {
        let empty = HashSet::new();
        caps::set(
            None,
            caps::CapSet::Effective,
            effective.as_ref().unwrap_or(&empty),
        )
        .map_err(caps_error("cannot set the effective capabilities"))?;
        caps::set(
            None,
            caps::CapSet::Inheritable,
            inheritable.as_ref().unwrap_or(&empty),
        )
        .map_err(caps_error("cannot set the inheritable capabilities"))?;
        caps::set(
            None,
            caps::CapSet::Permitted,
            permitted.as_ref().unwrap_or(&empty),
        )
        .map_err(caps_error("cannot set the permitted capabilities"))?;
        caps::clear(None, caps::CapSet::Ambient)
            .map_err(caps_error("cannot clear ambient caps"))?;
        for cap in ambient.iter().flatten() {
            caps::raise(None, caps::CapSet::Ambient, *cap)
                .map_err(caps_error("cannot raise an ambient capability"))?;
        }
    } else if user.uid() != 0 {
        // Like execve for a non-root user: no capabilities.
        caps::clear(None, caps::CapSet::Effective).map_err(caps_error("clear caps"))?;
        caps::clear(None, caps::CapSet::Permitted).map_err(caps_error("clear caps"))?;
    }
    if no_new_privs {
        // SAFETY: prctl with integer arguments only.
        Errno::result(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
            .map_err(Error::sys("PR_SET_NO_NEW_PRIVS"))?;
    }
    Ok(Prepared {
        path: cstring("the executable path", path.as_os_str().as_bytes())?,
        args: args
            .iter()
            .map(|a| cstring("an argument", a))
            .collect::<Result<_, _>>()?,
        env: env
            .iter()
            .map(|e| cstring("an environment variable", e))
            .collect::<Result<_, _>>()?,
        seccomp: seccomp_at_exec,
    })
}
