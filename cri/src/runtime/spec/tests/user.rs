//! Users and groups: CRI run_as_*, the image's User, /etc/passwd and
//! /etc/group (including hostile ones).

use k8s_cri::v1 as cri;

use super::{Case, process};
use crate::runtime::spec::user::{MAX_FILE, group_entries, passwd_entries};

const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
app:x:1000:1000:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
";

const GROUP: &str = "\
root:x:0:
daemon:x:1:
adm:x:4:syslog,app
www-data:x:33:app
app:x:1000:app
video:x:44:
staff:x:50: app , other
nogroup:x:65534:
";

fn fixture() -> Case {
    let mut case = Case::new();
    case.passwd = Some(PASSWD.to_string());
    case.group = Some(GROUP.to_string());
    case.image.config.user = None;
    case
}

/// (uid, gid, additional gids) of the built spec.
fn ids(case: &Case) -> (u32, u32, Vec<u32>) {
    let spec = case.spec();
    let user = process(&spec).user();
    (
        user.uid(),
        user.gid(),
        user.additional_gids().clone().unwrap_or_default(),
    )
}

fn int(value: i64) -> Option<cri::Int64Value> {
    Some(cri::Int64Value { value })
}

#[test]
fn default_is_root_with_roots_groups() {
    assert_eq!(ids(&fixture()), (0, 0, vec![0]));
}

#[test]
fn run_as_user() {
    let mut case = fixture();
    case.sc().run_as_user = int(1000);
    // Primary gid from /etc/passwd; groups listing "app", not app's own.
    assert_eq!(ids(&case), (1000, 1000, vec![4, 33, 50, 1000]));

    // A uid the image does not know: gid 0, no memberships.
    case.sc().run_as_user = int(4242);
    assert_eq!(ids(&case), (4242, 0, vec![0]));

    // run_as_user beats the image's User.
    case.image.config.user = Some("www-data:video".to_string());
    case.sc().run_as_user = int(1000);
    assert_eq!(ids(&case).0, 1000);
    assert_eq!(ids(&case).1, 1000, "the image's group goes with its user");
}

#[test]
fn run_as_username() {
    let mut case = fixture();
    case.sc().run_as_username = "www-data".to_string();
    assert_eq!(ids(&case), (33, 33, vec![33]));

    case.sc().run_as_username = "ghost".to_string();
    let err = case.error("linux.security_context.run_as_username");
    assert!(
        !err.is_invalid_argument(),
        "a valid request the image cannot satisfy"
    );
    assert!(err.to_string().contains("ghost"));
}

#[test]
fn run_as_group() {
    let mut case = fixture();
    case.sc().run_as_user = int(1000);
    case.sc().run_as_group = int(3000);
    // The passwd group (1000) gives way to run_as_group; the user's own
    // group in /etc/group is not a supplement (containerd's rule).
    assert_eq!(ids(&case), (1000, 3000, vec![4, 33, 50, 3000]));
}

#[test]
fn run_as_group_alone_is_invalid() {
    let mut case = fixture();
    case.sc().run_as_group = int(3000);
    let err = case.error("linux.security_context.run_as_group");
    assert!(err.is_invalid_argument());
}

#[test]
fn negative_or_huge_ids_are_invalid() {
    for (value, field) in [
        (-1, "linux.security_context.run_as_user"),
        (1 << 32, "linux.security_context.run_as_user"),
        (u32::MAX as i64, "linux.security_context.run_as_user"),
    ] {
        let mut case = fixture();
        case.sc().run_as_user = int(value);
        assert!(case.error(field).is_invalid_argument(), "{value}");
    }
    let mut case = fixture();
    case.sc().run_as_user = int(1000);
    case.sc().run_as_group = int(-5);
    assert!(case.error("run_as_group").is_invalid_argument());

    let mut case = fixture();
    case.sc().supplemental_groups = vec![10, -3];
    assert!(case.error("supplemental_groups[1]").is_invalid_argument());
}

#[test]
fn image_user_forms() {
    // (image User, uid, gid, additional gids)
    let table: [(&str, u32, u32, &[u32]); 8] = [
        ("", 0, 0, &[0]),
        ("app", 1000, 1000, &[4, 33, 50, 1000]),
        ("app:video", 1000, 44, &[4, 33, 44, 50]),
        ("app:2000", 1000, 2000, &[4, 33, 50, 2000]),
        ("1000", 1000, 1000, &[4, 33, 50, 1000]),
        ("1000:1000", 1000, 1000, &[4, 33, 50, 1000]),
        // Numbers are used as they are, known or not.
        ("5000:6000", 5000, 6000, &[6000]),
        ("33:video", 33, 44, &[44]),
    ];
    for (user, uid, gid, gids) in table {
        let mut case = fixture();
        case.image.config.user = Some(user.to_string());
        assert_eq!(ids(&case), (uid, gid, gids.to_vec()), "User {user:?}");
    }
}

#[test]
fn image_user_errors_name_the_user() {
    for (user, needle) in [
        ("ghost", "ghost"),
        ("app:nogroup-here", "nogroup-here"),
        (":1000", "no user"),
        ("app:", "no group"),
        ("99999999999", "out of range"),
        ("1:99999999999", "out of range"),
    ] {
        let mut case = fixture();
        case.image.config.user = Some(user.to_string());
        let err = case.error("User");
        assert!(!err.is_invalid_argument(), "{user:?}: the image's fault");
        let message = err.to_string();
        assert!(message.contains(needle), "{message}");
        assert!(message.contains(&format!("{user:?}")), "{message}");
    }
}

#[test]
fn no_passwd_or_group_files() {
    let mut case = fixture();
    case.passwd = None;
    case.group = None;
    case.image.config.user = Some("1000:1000".to_string());
    assert_eq!(ids(&case), (1000, 1000, vec![1000]));
    case.image.config.user = Some("app".to_string());
    assert!(case.error("User").to_string().contains("/etc/passwd"));
}

#[test]
fn supplemental_groups_merge_and_strict() {
    let mut case = fixture();
    case.sc().run_as_user = int(1000);
    case.sc().supplemental_groups = vec![5000, 33, 5000];
    assert_eq!(ids(&case).2, vec![4, 33, 50, 1000, 5000]);

    case.sc().supplemental_groups_policy = cri::SupplementalGroupsPolicy::Strict as i32;
    assert_eq!(
        ids(&case).2,
        vec![33, 1000, 5000],
        "no /etc/group memberships"
    );

    case.sc().supplemental_groups_policy = 7;
    let err = case.error("supplemental_groups_policy");
    assert!(err.is_invalid_argument());
}

#[test]
fn passwd_and_group_parsing() {
    let passwd = "\
# comment
+nis::0:0:::
root:x:0:0:root:/root:/bin/sh
short:x:5
noname::7:7:::
:x:8:8:::
neg:x:-1:0:::
big:x:4294967296:0:::
plus:x:+9:0:::
crlf:x:10:10:::\r
minimal:x:11:12
";
    let entries: Vec<(&str, u32, u32)> = passwd_entries(passwd)
        .map(|e| (e.name, e.uid, e.gid))
        .collect();
    assert_eq!(
        entries,
        [
            ("root", 0, 0),
            ("noname", 7, 7),
            ("crlf", 10, 10),
            ("minimal", 11, 12)
        ]
    );

    let group = "g1:x:1:a,b,,c\nbad:x:z:a\ng2::2\ng3:x:3:a:b\n";
    let groups: Vec<(&str, u32, Vec<&str>)> = group_entries(group)
        .map(|g| (g.name, g.gid, g.members().collect()))
        .collect();
    assert_eq!(
        groups,
        [
            ("g1", 1, vec!["a", "b", "c"]),
            ("g2", 2, vec![]),
            ("g3", 3, vec!["a:b"])
        ]
    );
}

/// xorshift64*: deterministic junk without a dependency.
fn junk(seed: u64, len: usize) -> String {
    let mut state = seed.max(1);
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            // Lots of ':', ',' and newlines to reach every parser branch.
            match state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56 {
                0..=40 => b':',
                41..=60 => b',',
                61..=80 => b'\n',
                81..=120 => b'0' + (state % 10) as u8,
                b => b as u8,
            }
        })
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn hostile_files_never_panic() {
    let huge_line = format!(
        "app:x:1000:1000:{}:/home/app:/bin/sh\n",
        "g".repeat(3 * MAX_FILE)
    );
    let many_members = format!("big:x:7:{}app\n", "m,".repeat(MAX_FILE));
    let past_cap = format!("{}\napp:x:1000:1000:::\n", "#".repeat(MAX_FILE + 10));
    // A multi-byte character straddling the cap must not split it.
    let straddle = format!("{}é\n", "x".repeat(MAX_FILE - 1));
    let mut inputs = vec![
        String::new(),
        "\n\n\n".to_string(),
        ":::::::::".to_string(),
        "app".to_string(),
        "app:x".to_string(),
        "app:x:1000".to_string(),
        "app:x:1000:".to_string(),
        "\u{0}\u{1}\u{2}:\u{ffff}:1:1".to_string(),
        huge_line,
        many_members,
        past_cap.clone(),
        straddle,
    ];
    inputs.extend((1..40u64).map(|seed| junk(seed, 4096)));

    for text in &inputs {
        for user in [
            None,
            Some("app"),
            Some("1000"),
            Some("app:app"),
            Some("0:big"),
        ] {
            let mut case = fixture();
            case.passwd = Some(text.clone());
            case.group = Some(text.clone());
            case.image.config.user = user.map(str::to_string);
            // Ok or a clean error; never a panic.
            let _ = case.build();
        }
    }

    // Lines past the cap are not read.
    let mut case = fixture();
    case.passwd = Some(past_cap);
    case.image.config.user = Some("app".to_string());
    assert!(case.error("User").to_string().contains("app"));
}
