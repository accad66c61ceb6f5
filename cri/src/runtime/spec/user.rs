//! The container's user: the CRI run_as_* fields or the image's User,
//! resolved in the image's /etc/passwd and /etc/group.
//!
//! Both files come from the image, which may be hostile: they are read up
//! to `MAX_FILE` bytes, malformed lines are skipped, and nothing here
//! panics or allocates in proportion to anything but the (capped) input.

use std::collections::BTreeSet;

use k8s_cri::v1 as cri;
use oci_spec::runtime::User;

use super::{Error, invalid, precondition};
use crate::image::records::ImageConfig;

/// Bytes of /etc/passwd or /etc/group looked at; the rest is ignored.
pub(super) const MAX_FILE: usize = 1 << 20;

const RUN_AS_USER: &str = "linux.security_context.run_as_user";
const RUN_AS_USERNAME: &str = "linux.security_context.run_as_username";
const RUN_AS_GROUP: &str = "linux.security_context.run_as_group";
const SUPPLEMENTAL_GROUPS: &str = "linux.security_context.supplemental_groups";
const SUPPLEMENTAL_GROUPS_POLICY: &str = "linux.security_context.supplemental_groups_policy";

/// One /etc/passwd line: `name:password:uid:gid:gecos:home:shell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PasswdEntry<'a> {
    pub name: &'a str,
    pub uid: u32,
    pub gid: u32,
}

/// One /etc/group line: `name:password:gid:member,member`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GroupEntry<'a> {
    pub name: &'a str,
    pub gid: u32,
    members: &'a str,
}

impl<'a> GroupEntry<'a> {
    pub fn members(&self) -> impl Iterator<Item = &'a str> {
        self.members
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
    }
}

/// `text` cut to at most `MAX_FILE` bytes, on a character boundary.
fn capped(text: &str) -> &str {
    if text.len() <= MAX_FILE {
        return text;
    }
    let mut end = MAX_FILE;
    while !text.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    text.get(..end).unwrap_or("")
}

/// The lines worth parsing: no comments, no NIS `+`/`-` entries.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    capped(text)
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty() && !l.starts_with(['#', '+', '-']))
}

/// A decimal id: digits only (no sign, no spaces), below u32::MAX (which
/// is (uid_t)-1, "no id").
fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|&id| id != u32::MAX)
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

pub(super) fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    lines(text).filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next().filter(|n| !n.is_empty())?;
        let _password = fields.next()?;
        let uid = parse_id(fields.next()?)?;
        let gid = parse_id(fields.next()?)?;
        Some(PasswdEntry { name, uid, gid })
    })
}

pub(super) fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    lines(text).filter_map(|line| {
        let mut fields = line.splitn(4, ':');
        let name = fields.next().filter(|n| !n.is_empty())?;
        let _password = fields.next()?;
        let gid = parse_id(fields.next()?)?;
        let members = fields.next().unwrap_or("");
        Some(GroupEntry { name, gid, members })
    })
}

fn user_by_uid(passwd: &str, uid: u32) -> Option<PasswdEntry<'_>> {
    passwd_entries(passwd).find(|e| e.uid == uid)
}

fn user_by_name<'a>(passwd: &'a str, name: &str) -> Option<PasswdEntry<'a>> {
    passwd_entries(passwd).find(|e| e.name == name)
}

fn group_by_name<'a>(group: &'a str, name: &str) -> Option<GroupEntry<'a>> {
    group_entries(group).find(|e| e.name == name)
}

/// A CRI id (uid, gid) as the kernel takes it.
fn cri_id(field: &str, value: i64) -> Result<u32, Error> {
    u32::try_from(value)
        .ok()
        .filter(|&id| id != u32::MAX)
        .ok_or_else(|| invalid(field, format!("{value} is not a valid id")))
}

/// Who the process runs as, before supplemental groups.
struct Identity<'a> {
    uid: u32,
    gid: u32,
    /// The user's name in /etc/passwd, which /etc/group lists members by.
    name: Option<&'a str>,
}

/// The container process's user.
///
/// - uid: CRI run_as_user, else CRI run_as_username (looked up), else the
///   image's User, else root.
/// - gid: CRI run_as_group, else the image User's `:group`, else the
///   user's primary group in /etc/passwd, else 0.
/// - additional gids: the primary gid, the groups of /etc/group listing
///   the user (unless the policy is Strict), CRI supplemental_groups;
///   sorted, without duplicates (containerd's `WithAdditionalGIDs`).
pub(super) fn resolve(
    sc: &cri::LinuxContainerSecurityContext,
    image: &ImageConfig,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<User, Error> {
    let passwd = passwd.unwrap_or("");
    let group = group.unwrap_or("");

    let strict = match cri::SupplementalGroupsPolicy::try_from(sc.supplemental_groups_policy) {
        Ok(policy) => policy == cri::SupplementalGroupsPolicy::Strict,
        Err(_) => {
            return Err(invalid(
                SUPPLEMENTAL_GROUPS_POLICY,
                format!("unknown policy {}", sc.supplemental_groups_policy),
            ));
        }
    };
    let run_as_group = match &sc.run_as_group {
        Some(g) => Some(cri_id(RUN_AS_GROUP, g.value)?),
        None => None,
    };

    let mut identity = if let Some(u) = &sc.run_as_user {
        let uid = cri_id(RUN_AS_USER, u.value)?;
        let entry = user_by_uid(passwd, uid);
        Identity {
            uid,
            gid: entry.map_or(0, |e| e.gid),
            name: entry.map(|e| e.name),
        }
    } else if !sc.run_as_username.is_empty() {
        let name = &sc.run_as_username;
        let entry = user_by_name(passwd, name).ok_or_else(|| {
            precondition(
                RUN_AS_USERNAME,
                format!("no user {name:?} in the image's /etc/passwd"),
            )
        })?;
        Identity {
            uid: entry.uid,
            gid: entry.gid,
            name: Some(entry.name),
        }
    } else {
        if run_as_group.is_some() {
            // As containerd: a group without a user is a malformed request.
            return Err(invalid(
                RUN_AS_GROUP,
                "is set without run_as_user or run_as_username",
            ));
        }
        image_user(image, passwd, group)?
    };
    if let Some(gid) = run_as_group {
        identity.gid = gid;
    }

    let mut gids = BTreeSet::from([identity.gid]);
    if let (false, Some(name)) = (strict, identity.name) {
        gids.extend(
            group_entries(group)
                // The user's own group is its primary one, not a supplement.
                .filter(|g| g.name != name && g.members().any(|m| m == name))
                .map(|g| g.gid),
        );
    }
    for (i, &gid) in sc.supplemental_groups.iter().enumerate() {
        gids.insert(cri_id(&format!("{SUPPLEMENTAL_GROUPS}[{i}]"), gid)?);
    }

    let mut user = User::default();
    user.set_uid(identity.uid);
    user.set_gid(identity.gid);
    user.set_umask(None);
    user.set_additional_gids(Some(gids.into_iter().collect()));
    user.set_username(None);
    Ok(user)
}

/// The image's User: empty (root), `uid`, `uid:gid`, `name`, `name:group`
/// or a mix; names are looked up in the image's files.
fn image_user<'a>(
    image: &ImageConfig,
    passwd: &'a str,
    group: &'a str,
) -> Result<Identity<'a>, Error> {
    let spec = image.config.user.as_deref().unwrap_or("");
    let bad =
        |reason: String| precondition("image", format!("the image's User {spec:?}: {reason}"));

    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let identity = if spec.is_empty() {
        let entry = user_by_uid(passwd, 0);
        Identity {
            uid: 0,
            gid: entry.map_or(0, |e| e.gid),
            name: entry.map(|e| e.name),
        }
    } else if user_part.is_empty() {
        return Err(bad("no user before ':'".to_string()));
    } else if is_number(user_part) {
        let uid = parse_id(user_part).ok_or_else(|| bad("uid out of range".to_string()))?;
        let entry = user_by_uid(passwd, uid);
        Identity {
            uid,
            gid: entry.map_or(0, |e| e.gid),
            name: entry.map(|e| e.name),
        }
    } else {
        let entry = user_by_name(passwd, user_part)
            .ok_or_else(|| bad(format!("no user {user_part:?} in the image's /etc/passwd")))?;
        Identity {
            uid: entry.uid,
            gid: entry.gid,
            name: Some(entry.name),
        }
    };

    let gid = match group_part {
        None => identity.gid,
        Some("") => return Err(bad("no group after ':'".to_string())),
        Some(g) if is_number(g) => {
            parse_id(g).ok_or_else(|| bad("gid out of range".to_string()))?
        }
        Some(g) => {
            group_by_name(group, g)
                .ok_or_else(|| bad(format!("no group {g:?} in the image's /etc/group")))?
                .gid
        }
    };
    Ok(Identity { gid, ..identity })
}
