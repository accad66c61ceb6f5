//! Fuzz targets of frakti-agent's parsers of hostile input, as plain
//! functions (the cargo-fuzz targets call them; `cargo test` runs them over
//! the seeds below on stable Rust):
//!
//! - [`device_rules`]: OCI device rules (`linux.resources.devices`, as an
//!   API client may write them) to the device cgroup program: refused or
//!   compiled, and the program answers as the rules do.
//! - [`in_root_paths`]: an image's symlinks (any target) and a path to
//!   resolve in a container's root, creating what is missing: whatever is
//!   found or made is inside the root, nothing outside is touched.
//! - [`user_namespace`]: a spec's uid/gid mappings and a mount's options
//!   for a container in a user namespace: refused, or a mapping the kernel
//!   takes whose every id maps where its range says, and options whose
//!   owners are mapped ids.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use frakti_agent::cgroup::devices::{
    self, ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE, Kind, TYPE_BLOCK, TYPE_CHAR,
};
use frakti_agent::idmap::{self, IdMap};
use frakti_agent::init::in_root::{Create, Root};
use frakti_proto::id_ranges::to_host;
use oci_spec::runtime::LinuxDeviceCgroup;

/// Input: JSON of a list of OCI device rules.
pub fn device_rules(data: &[u8]) {
    let Ok(spec_rules) = serde_json::from_slice::<Vec<LinuxDeviceCgroup>>(data) else {
        return;
    };
    let Ok(rules) = devices::rules(&[], &spec_rules) else {
        return;
    };
    let code = devices::program(&rules);
    // Prologue + deny, and at most 8 instructions per rule.
    assert!(
        code.len() <= 9 + 8 * rules.len(),
        "{} instructions",
        code.len()
    );
    // Probe the devices the rules name and a few others.
    let mut numbers = vec![(1, 3), (5, 1), (136, 0), (254, 0), (7, 0)];
    numbers.extend(
        rules
            .iter()
            .map(|r| (r.major.unwrap_or(0), r.minor.unwrap_or(0))),
    );
    for (major, minor) in numbers {
        for (kind, context_type) in [(Kind::Char, TYPE_CHAR), (Kind::Block, TYPE_BLOCK)] {
            for access in 1..=(ACCESS_READ | ACCESS_WRITE | ACCESS_MKNOD) {
                let ctx = [access << 16 | context_type, major, minor];
                let program = devices::run_program(&code, ctx) == 1;
                let want = devices::allowed(&rules, kind, major, minor, access);
                assert_eq!(program, want, "{kind:?} {major}:{minor} access {access}");
            }
        }
    }
}

/// Input: entries separated by NUL bytes: a flags byte (bit 0: the last
/// component is a file, else a directory), then `name`, `target` pairs
/// (a symlink `name` — one path component — in the root pointing at
/// `target`, any bytes), then the path to resolve.
pub fn in_root_paths(data: &[u8]) {
    let mut parts = data.split(|b| *b == 0);
    let Some(flags) = parts.next().and_then(|f| f.first().copied()) else {
        return;
    };
    let mut rest: Vec<&[u8]> = parts.collect();
    let Some(path) = rest.pop() else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root_dir = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&root_dir).expect("root");
    std::fs::create_dir(&outside).expect("outside");
    for pair in rest.chunks_exact(2) {
        let (name, target) = (pair[0], pair[1]);
        let name = Path::new(std::ffi::OsStr::from_bytes(name));
        if name.as_os_str().is_empty()
            || name.components().count() != 1
            || !matches!(
                name.components().next(),
                Some(std::path::Component::Normal(_))
            )
        {
            continue;
        }
        let target = std::ffi::OsStr::from_bytes(target);
        let _ = std::os::unix::fs::symlink(target, root_dir.join(name));
    }
    let root = Root::open(&root_dir).expect("open the root");
    let create = if flags & 1 == 1 {
        Create::File
    } else {
        Create::Dir
    };
    let path = Path::new(std::ffi::OsStr::from_bytes(path));
    if let Ok(found) = root.resolve(path, create) {
        let real = std::fs::read_link(found.proc_path()).expect("the found object's path");
        assert!(
            real.starts_with(&root_dir),
            "{} resolved to {} outside the root",
            path.display(),
            real.display()
        );
    }
    let escaped: Vec<_> = std::fs::read_dir(&outside).expect("outside").collect();
    assert!(
        escaped.is_empty(),
        "{} created {escaped:?} outside the root",
        path.display()
    );
}

/// Input: JSON `{"linux": <OCI linux object>, "type": "tmpfs", "options":
/// ["uid=0", ...]}`.
pub fn user_namespace(data: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Input {
        linux: oci_spec::runtime::Linux,
        #[serde(rename = "type")]
        typ: String,
        options: Vec<String>,
    }
    let Ok(input) = serde_json::from_slice::<Input>(data) else {
        return;
    };
    let Ok(Some(map)) = IdMap::from_spec(&input.linux, true) else {
        return;
    };
    for (ranges, text) in [(&map.uids, map.uid_map_text()), (&map.gids, map.gid_map_text())] {
        assert_eq!(text.lines().count(), ranges.len());
        for r in ranges {
            // Checked: neither end overflows, and ranges do not overlap,
            // so both ends map into this range.
            let last = r.size - 1;
            assert_eq!(to_host(ranges, r.container), Some(r.host));
            assert_eq!(to_host(ranges, r.container + last), Some(r.host + last));
        }
    }
    assert!(map.host_uid(0).is_ok() && map.host_gid(0).is_ok());
    if let Ok(options) = idmap::translate_mount_data(&input.typ, &input.options, &map) {
        for option in &options {
            if let Some(uid) = option.strip_prefix("uid=") {
                let uid: u32 = uid.parse().expect("a translated uid is a number");
                assert!(map.uids.iter().any(|r| uid >= r.host && uid - r.host < r.size));
            }
            if let Some(gid) = option.strip_prefix("gid=") {
                let gid: u32 = gid.parse().expect("a translated gid is a number");
                assert!(map.gids.iter().any(|r| gid >= r.host && gid - r.host < r.size));
            }
        }
    }
}

/// A named input for one target.
pub type Seed = (&'static str, fn(&[u8]), Vec<u8>);

/// Inputs the targets start from (also their unit tests).
pub fn seeds() -> Vec<Seed> {
    let symlinks = |pairs: &[(&str, &str)], path: &str, file: bool| {
        let mut data = vec![u8::from(file)];
        for (name, target) in pairs {
            data.push(0);
            data.extend_from_slice(name.as_bytes());
            data.push(0);
            data.extend_from_slice(target.as_bytes());
        }
        data.push(0);
        data.extend_from_slice(path.as_bytes());
        data
    };
    vec![
        ("rules_default", device_rules as fn(&[u8]), b"[]".to_vec()),
        (
            "rules_mixed",
            device_rules,
            br#"[{"allow": false}, {"allow": true, "type": "c", "major": 1, "minor": -1, "access": "r"},
                 {"allow": false, "type": "b", "major": 254, "minor": 16, "access": "w"}]"#
                .to_vec(),
        ),
        ("rules_privileged", device_rules, br#"[{"allow": true, "type": "a", "access": "rwm"}]"#.to_vec()),
        (
            "escape_by_dots",
            in_root_paths,
            symlinks(&[("etc", "/../../../../outside")], "/etc/hosts", true),
        ),
        (
            "escape_relative",
            in_root_paths,
            symlinks(&[("up", "../../.."), ("etc", "up/outside")], "/etc/x/y", false),
        ),
        ("dangling", in_root_paths, symlinks(&[("r", "../run/a/b")], "/r", true)),
        ("loop", in_root_paths, symlinks(&[("a", "b"), ("b", "a")], "/a/c", false)),
        ("magic", in_root_paths, symlinks(&[("m", "/proc/self/root/outside")], "/m/z", false)),
        (
            "userns_kubelet",
            user_namespace,
            br#"{"linux": {"uidMappings": [{"containerID": 0, "hostID": 65536, "size": 65536}],
                 "gidMappings": [{"containerID": 0, "hostID": 65536, "size": 65536}]},
                 "type": "devpts", "options": ["newinstance", "gid=5", "mode=620"]}"#
                .to_vec(),
        ),
        (
            "userns_ranges",
            user_namespace,
            br#"{"linux": {"uidMappings": [{"containerID": 0, "hostID": 4294967294, "size": 2},
                 {"containerID": 1000, "hostID": 0, "size": 1}],
                 "gidMappings": [{"containerID": 0, "hostID": 1, "size": 4294967295}]},
                 "type": "tmpfs", "options": ["uid=1000", "size=1m"]}"#
                .to_vec(),
        ),
        (
            "userns_overlap",
            user_namespace,
            br#"{"linux": {"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 100000},
                 {"containerID": 0, "hostID": 2000, "size": 100000}], "gidMappings": []},
                 "type": "tmpfs", "options": []}"#
                .to_vec(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_run_clean() {
        for (name, target, input) in super::seeds() {
            eprintln!("seed {name}");
            target(&input);
        }
    }
}
