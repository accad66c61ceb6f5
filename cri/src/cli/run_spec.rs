//! `frakti run`'s flags as docker spells them, parsed into CRI settings.

use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("--memory {0}: not a size (e.g. 512m, 2g, 1048576)")]
    Memory(String),
    #[error("--cpus {0}: not a positive number of CPUs (e.g. 0.5, 2)")]
    Cpus(String),
    #[error("-e {0}: a variable needs a name (NAME=VALUE, or NAME to pass ours on)")]
    Env(String),
    #[error("-v {0}: {1}")]
    Volume(String, &'static str),
    #[error("--device {0}: {1}")]
    Device(String, &'static str),
    #[error("-p {0}: {1}")]
    Port(String, &'static str),
    #[error("--volume-device {0}: {1}")]
    VolumeDevice(String, &'static str),
    #[error("-u {0}: a user is UID[:GID] or NAME[:GID] (GID numeric)")]
    User(String),
}

/// A size with docker's binary units: b, k, m, g (case-insensitive).
pub fn memory_bytes(text: &str) -> Result<i64, SpecError> {
    let error = || SpecError::Memory(text.to_string());
    let lower = text.trim().to_ascii_lowercase();
    // "100mb" is "100m", "10b" is 10.
    let body = match lower.strip_suffix('b') {
        Some(rest) if rest.ends_with(['k', 'm', 'g']) => rest,
        Some(rest) if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) => rest,
        _ => lower.as_str(),
    };
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        _ => (body, 0),
    };
    let value: i64 = digits.parse().map_err(|_| error())?;
    if value <= 0 {
        return Err(error());
    }
    value.checked_mul(1 << shift).ok_or_else(error)
}

/// CPUs as a CFS quota over a 100 ms period.
pub fn cpu_quota(text: &str) -> Result<(i64, i64), SpecError> {
    const PERIOD: i64 = 100_000;
    let cpus: f64 = text
        .trim()
        .parse()
        .map_err(|_| SpecError::Cpus(text.to_string()))?;
    if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
        return Err(SpecError::Cpus(text.to_string()));
    }
    // At least the kernel's 1 ms minimum quota.
    let quota = ((cpus * PERIOD as f64).round() as i64).max(1000);
    Ok((PERIOD, quota))
}

/// `NAME=VALUE`, or `NAME` for our own value (left out when we have none).
pub fn env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<cri::KeyValue>, SpecError> {
    let (key, value) = match text.split_once('=') {
        Some((key, value)) => (key, Some(value.to_string())),
        None => (text, lookup(text)),
    };
    if key.is_empty() {
        return Err(SpecError::Env(text.to_string()));
    }
    Ok(value.map(|value| cri::KeyValue {
        key: key.to_string(),
        value,
    }))
}

/// `HOST:CONTAINER[:ro|rw]`, the host path absolute or `.`-relative.
pub fn volume(text: &str, cwd: &Path) -> Result<cri::Mount, SpecError> {
    let error = |why| SpecError::Volume(text.to_string(), why);
    let parts: Vec<&str> = text.split(':').collect();
    let (host, container, mode) = match parts.as_slice() {
        [host, container] => (*host, *container, "rw"),
        [host, container, mode] => (*host, *container, *mode),
        _ => return Err(error("expected HOST:CONTAINER[:ro]")),
    };
    let readonly = match mode {
        "ro" => true,
        "rw" => false,
        _ => return Err(error("the mode is ro or rw")),
    };
    let host = host_path(host, cwd).ok_or_else(|| {
        error("named volumes are not supported: give an absolute or ./relative host path")
    })?;
    if !container.starts_with('/') {
        return Err(error("the container path must be absolute"));
    }
    Ok(cri::Mount {
        container_path: container.to_string(),
        host_path: host.to_string_lossy().into_owned(),
        readonly,
        ..Default::default()
    })
}

fn host_path(text: &str, cwd: &Path) -> Option<PathBuf> {
    if text.starts_with('/') {
        Some(PathBuf::from(text))
    } else if text == "." || text.starts_with("./") || text.starts_with("../") {
        Some(cwd.join(text))
    } else {
        None
    }
}

/// `DEVICE[:CONTAINER[:PERMISSIONS]]`, permissions of r, w and m.
pub fn device(text: &str) -> Result<cri::Device, SpecError> {
    let error = |why| SpecError::Device(text.to_string(), why);
    let parts: Vec<&str> = text.split(':').collect();
    let (host, container, permissions) = match parts.as_slice() {
        [host] => (*host, *host, "rwm"),
        [host, container] => (*host, *container, "rwm"),
        [host, container, permissions] => (*host, *container, *permissions),
        _ => return Err(error("expected DEVICE[:CONTAINER[:rwm]]")),
    };
    if !host.starts_with('/') || !container.starts_with('/') {
        return Err(error("device paths must be absolute"));
    }
    if permissions.is_empty() || !permissions.chars().all(|c| "rwm".contains(c)) {
        return Err(error("permissions are made of r, w and m"));
    }
    Ok(cri::Device {
        container_path: container.to_string(),
        host_path: host.to_string(),
        permissions: permissions.to_string(),
    })
}

/// `[IP:]HOSTPORT:PORT[/tcp|udp|sctp]`.
pub fn port(text: &str) -> Result<cri::PortMapping, SpecError> {
    let error = |why| SpecError::Port(text.to_string(), why);
    let (ports, protocol) = match text.rsplit_once('/') {
        Some((ports, "tcp")) => (ports, cri::Protocol::Tcp),
        Some((ports, "udp")) => (ports, cri::Protocol::Udp),
        Some((ports, "sctp")) => (ports, cri::Protocol::Sctp),
        Some(_) => return Err(error("the protocol is tcp, udp or sctp")),
        None => (text, cri::Protocol::Tcp),
    };
    let (host_ip, host, container) = match ports.rsplitn(3, ':').collect::<Vec<_>>().as_slice() {
        [container, host] => ("", *host, *container),
        [container, host, ip] => (*ip, *host, *container),
        _ => return Err(error("expected [IP:]HOSTPORT:PORT")),
    };
    let number = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).map(i32::from);
    let (Some(host_port), Some(container_port)) = (number(host), number(container)) else {
        return Err(error("ports are numbers from 1 to 65535"));
    };
    if !host_ip.is_empty() && host_ip.parse::<std::net::IpAddr>().is_err() {
        return Err(error("not an IP address before the host port"));
    }
    Ok(cri::PortMapping {
        protocol: protocol as i32,
        container_port,
        host_port,
        host_ip: host_ip.to_string(),
    })
}

/// `DEVICE:CONTAINER[:FSTYPE]` of `--volume-device`: a block device (or
/// filesystem image) whose filesystem is mounted in the VM (ext4 unless
/// said).
pub fn volume_device(text: &str) -> Result<(PathBuf, String, String), SpecError> {
    let error = |why| SpecError::VolumeDevice(text.to_string(), why);
    let parts: Vec<&str> = text.split(':').collect();
    let (device, container, fs_type) = match parts.as_slice() {
        [device, container] => (*device, *container, "ext4"),
        [device, container, fs_type] => (*device, *container, *fs_type),
        _ => return Err(error("expected DEVICE:CONTAINER[:FSTYPE]")),
    };
    if !device.starts_with('/') || !container.starts_with('/') {
        return Err(error("paths must be absolute"));
    }
    Ok((
        PathBuf::from(device),
        container.to_string(),
        fs_type.to_string(),
    ))
}

/// `-u`: the user and group settings of the container's security context.
pub fn user(text: &str, context: &mut cri::LinuxContainerSecurityContext) -> Result<(), SpecError> {
    let error = || SpecError::User(text.to_string());
    let (user, group) = match text.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (text, None),
    };
    if user.is_empty() {
        return Err(error());
    }
    match user.parse::<i64>() {
        Ok(uid) if uid >= 0 => context.run_as_user = Some(cri::Int64Value { value: uid }),
        Ok(_) => return Err(error()),
        Err(_) => context.run_as_username = user.to_string(),
    }
    if let Some(group) = group {
        let gid = group
            .parse::<i64>()
            .ok()
            .filter(|g| *g >= 0)
            .ok_or_else(error)?;
        context.run_as_group = Some(cri::Int64Value { value: gid });
    }
    Ok(())
}

/// A name for a container without `--name`: the image's last path
/// component and 6 random hex digits (`busybox-3f9a1c`).
pub fn generated_name(image: &str, random: &str) -> String {
    let base = image
        .rsplit('/')
        .next()
        .unwrap_or(image)
        .split(['@', ':'])
        .next()
        .unwrap_or_default();
    let base: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let base = if base.is_empty() {
        "frakti"
    } else {
        base.as_str()
    };
    format!("{base}-{}", &random[..random.len().min(6)])
}

/// Whether `name` may name a container (it becomes the VM's hostname too):
/// 1-63 of [a-zA-Z0-9_.-], starting with an alphanumeric, as docker's.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The nameservers, search domains and options of a resolv.conf, without
/// loopback nameservers (a host's local resolver is not the VM's), as
/// docker does.
pub fn dns_from_resolv_conf(text: &str) -> cri::DnsConfig {
    let mut dns = cri::DnsConfig::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words
                    .next()
                    .and_then(|w| w.parse::<std::net::IpAddr>().ok())
                {
                    if !ip.is_loopback() {
                        dns.servers.push(ip.to_string());
                    }
                }
            }
            Some("search") | Some("domain") => dns.searches = words.map(String::from).collect(),
            Some("options") => dns.options.extend(words.map(String::from)),
            _ => {}
        }
    }
    dns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cpus_parse_as_docker_spells_them() {
        assert_eq!(memory_bytes("512m"), Ok(512 << 20));
        assert_eq!(memory_bytes("2G"), Ok(2 << 30));
        assert_eq!(memory_bytes("64k"), Ok(64 << 10));
        assert_eq!(memory_bytes("1048576"), Ok(1 << 20));
        assert_eq!(memory_bytes("100mb"), Ok(100 << 20));
        assert_eq!(memory_bytes("10b"), Ok(10));
        for bad in ["", "m", "-1m", "0", "1.5g", "9999999999999g", "12x", "b"] {
            assert!(memory_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(cpu_quota("0.5"), Ok((100_000, 50_000)));
        assert_eq!(cpu_quota("2"), Ok((100_000, 200_000)));
        assert_eq!(cpu_quota("0.001"), Ok((100_000, 1000)));
        for bad in ["0", "-1", "nan", "inf", "x", "5000"] {
            assert!(cpu_quota(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_takes_ours_for_a_bare_name() {
        let ours = |k: &str| (k == "HOME").then(|| "/root".to_string());
        assert_eq!(env("A=b=c", ours).unwrap().unwrap().value, "b=c");
        assert_eq!(env("A=", ours).unwrap().unwrap().value, "");
        assert_eq!(env("HOME", ours).unwrap().unwrap().value, "/root");
        assert_eq!(env("UNSET", ours).unwrap(), None);
        assert!(env("=x", ours).is_err());
    }

    #[test]
    fn volumes_devices_and_ports() {
        let cwd = Path::new("/work");
        let m = volume("/data:/d:ro", cwd).unwrap();
        assert_eq!(
            (m.host_path.as_str(), m.container_path.as_str(), m.readonly),
            ("/data", "/d", true)
        );
        assert_eq!(volume("./x:/x", cwd).unwrap().host_path, "/work/./x");
        assert!(
            volume("named:/x", cwd)
                .unwrap_err()
                .to_string()
                .contains("named volumes")
        );
        assert!(volume("/a:rel", cwd).is_err());
        assert!(volume("/a:/b:rx", cwd).is_err());
        assert!(volume("/a", cwd).is_err());

        let d = device("/dev/loop0").unwrap();
        assert_eq!(
            (d.container_path.as_str(), d.permissions.as_str()),
            ("/dev/loop0", "rwm")
        );
        assert_eq!(device("/dev/sdb:/dev/xvda:r").unwrap().permissions, "r");
        assert!(device("/dev/sdb:/dev/x:rwx").is_err());
        assert!(device("sdb").is_err());

        let (dev, ctr, fs) = volume_device("/dev/loop3:/data").unwrap();
        assert_eq!(
            (dev, ctr.as_str(), fs.as_str()),
            (PathBuf::from("/dev/loop3"), "/data", "ext4")
        );
        assert_eq!(volume_device("/img:/d:xfs").unwrap().2, "xfs");
        for bad in ["/dev/x", "dev:/d", "/dev/x:d", "/a:/b:c:d"] {
            assert!(volume_device(bad).is_err(), "{bad}");
        }

        let p = port("8080:80").unwrap();
        assert_eq!((p.host_port, p.container_port, p.protocol), (8080, 80, 0));
        let p = port("127.0.0.1:53:5353/udp").unwrap();
        assert_eq!(
            (p.host_ip.as_str(), p.host_port, p.protocol),
            ("127.0.0.1", 53, 1)
        );
        for bad in ["80", "0:80", "70000:80", "a:80", "1:2/icmp", "nope:1:2"] {
            assert!(port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn users_names_and_dns() {
        let mut ctx = cri::LinuxContainerSecurityContext::default();
        user("1000:100", &mut ctx).unwrap();
        assert_eq!(
            (
                ctx.run_as_user.unwrap().value,
                ctx.run_as_group.unwrap().value
            ),
            (1000, 100)
        );
        let mut ctx = cri::LinuxContainerSecurityContext::default();
        user("nobody", &mut ctx).unwrap();
        assert_eq!(ctx.run_as_username, "nobody");
        for bad in ["", ":1", "1:x", "-5", "1:-1"] {
            assert!(
                user(bad, &mut cri::LinuxContainerSecurityContext::default()).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            generated_name("registry.k8s.io/e2e/busybox:1.29@sha256:ab", "0123456789"),
            "busybox-012345"
        );
        assert_eq!(generated_name(":::", "abcdef"), "frakti-abcdef");
        assert!(valid_name("web-1.a_b"));
        for bad in ["", "-x", "a/b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
        let dns = dns_from_resolv_conf(
            "# c\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch a.b c\noptions ndots:2 edns0\n",
        );
        assert_eq!(dns.servers, ["10.0.0.2"]);
        assert_eq!(dns.searches, ["a.b", "c"]);
        assert_eq!(dns.options, ["ndots:2", "edns0"]);
    }
}
