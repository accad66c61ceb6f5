use std::os::unix::fs::symlink;

use super::*;

/// Where a found object is, as the kernel names it.
fn real(found: &Found) -> PathBuf {
    fs::read_link(found.proc_path()).unwrap()
}

fn root_dir() -> (tempfile::TempDir, Root) {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::open(dir.path()).unwrap();
    (dir, root)
}

#[test]
fn symlinks_resolve_as_if_the_root_were_slash() {
    let (dir, root) = root_dir();
    let r = dir.path();
    fs::create_dir_all(r.join("a/b")).unwrap();
    fs::create_dir_all(r.join("etc")).unwrap();
    symlink("/etc", r.join("a/abs")).unwrap();
    symlink("../../../..", r.join("a/b/up")).unwrap();
    let open = |p: &str| real(&root.resolve(Path::new(p), Create::Nothing).unwrap());
    assert_eq!(open("/a/b"), r.join("a/b"));
    assert_eq!(open("/a/abs"), r.join("etc"));
    assert_eq!(open("/a/b/up/etc"), r.join("etc"));
    assert_eq!(open("/../../etc"), r.join("etc"));
    assert_eq!(open("/"), r.to_path_buf());
    let missing = root.resolve(Path::new("/a/nothing"), Create::Nothing);
    assert!(matches!(
        missing,
        Err(Error::Sys {
            source: Errno::ENOENT,
            ..
        })
    ));
}

#[test]
fn what_is_created_stays_in_the_root() {
    let (dir, root) = root_dir();
    let r = dir.path();
    let outside = tempfile::tempdir().unwrap();
    // A hostile image: /etc points out of the root by way of '..' and an
    // absolute path; a dangling resolv.conf link, as Ubuntu ships.
    symlink(
        format!("/../../..{}", outside.path().display()),
        r.join("etc"),
    )
    .unwrap();
    symlink("../run/resolve/stub.conf", r.join("resolv.conf")).unwrap();
    let hosts = root.resolve(Path::new("/etc/hosts"), Create::File).unwrap();
    let inside = r.join(outside.path().strip_prefix("/").unwrap());
    assert_eq!(real(&hosts), inside.join("hosts"));
    assert!(inside.join("hosts").is_file());
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing outside"
    );

    let resolv = root
        .resolve(Path::new("/resolv.conf"), Create::File)
        .unwrap();
    assert_eq!(real(&resolv), r.join("run/resolve/stub.conf"));
    let deep = root.resolve(Path::new("/x/y/z"), Create::Dir).unwrap();
    assert!(r.join("x/y/z").is_dir());
    assert_eq!(real(&deep), r.join("x/y/z"));
}

#[test]
fn magic_links_and_loops_are_refused() {
    let (dir, root) = root_dir();
    let r = dir.path();
    symlink("loop", r.join("loop")).unwrap();
    match root.resolve(Path::new("/loop/x"), Create::Dir) {
        Err(Error::Invalid(message)) => assert!(message.contains("too many symlinks"), "{message}"),
        other => panic!("a symlink loop: {:?}", other.map(|f| real(&f))),
    }
    // With a real /proc in the root (as every container has), its magic
    // links would lead to the agent's root: they are read as text and that
    // resolves inside the root.
    assert!(
        nix::unistd::geteuid().is_root(),
        "mounting needs root: run the agent's unit tests as root"
    );
    fs::create_dir_all(r.join("proc")).unwrap();
    fs::create_dir_all(r.join("etc")).unwrap();
    mount(
        Some("/proc"),
        &r.join("proc"),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    symlink("/proc/self/root/etc", r.join("magic")).unwrap();
    let magic = root
        .resolve(Path::new("/magic"), Create::Nothing)
        .map(|f| real(&f));
    let direct = root
        .resolve(Path::new("/proc/self/root/etc"), Create::Nothing)
        .map(|f| real(&f));
    let created = root
        .resolve(Path::new("/proc/self/cwd/x"), Create::Dir)
        .map(|f| real(&f));
    umount2(&r.join("proc"), MntFlags::MNT_DETACH).unwrap();
    assert_eq!(magic.unwrap(), r.join("etc"), "through a symlink");
    assert_eq!(direct.unwrap(), r.join("etc"), "directly");
    let created = created.unwrap();
    assert!(created.starts_with(r), "created at {}", created.display());
}

/// The race the descriptors close: the directory found is swapped for a
/// symlink out of the root before the mount; the mount still lands on
/// the directory found, inside the root.
#[test]
fn a_swap_after_the_lookup_does_not_move_the_mount() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "mounting needs root: run the agent's unit tests as root"
    );
    let (dir, root) = root_dir();
    let r = dir.path();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(r.join("data/sub")).unwrap();
    let target = root.resolve(Path::new("/data/sub"), Create::Dir).unwrap();
    fs::rename(r.join("data"), r.join("data-old")).unwrap();
    symlink(outside.path(), r.join("data")).unwrap();
    fs::create_dir(outside.path().join("sub")).unwrap();
    mount(
        Some("tmpfs"),
        &target.proc_path(),
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    fs::write(r.join("data-old/sub/marker"), "x").unwrap();
    let landed_outside = outside.path().join("sub/marker").exists();
    umount2(&r.join("data-old/sub"), MntFlags::MNT_DETACH).unwrap();
    assert!(!landed_outside, "the mount followed the swapped symlink");
    assert!(
        !r.join("data-old/sub/marker").exists(),
        "it was a tmpfs on data-old/sub"
    );
}

#[test]
fn lookups_through_dot_dot_survive_renames_elsewhere() {
    // The kernel answers EAGAIN to a `..` lookup that raced with any
    // rename on the system; a busy host must not make set-up fail.
    let (dir, root) = root_dir();
    let r = dir.path();
    fs::create_dir_all(r.join("etc")).unwrap();
    symlink("../../../..", r.join("up")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renamer = {
        let stop = stop.clone();
        let scratch = tempfile::tempdir().unwrap();
        std::thread::spawn(move || {
            let (a, b) = (scratch.path().join("a"), scratch.path().join("b"));
            fs::write(&a, b"").unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fs::rename(&a, &b).unwrap();
                fs::rename(&b, &a).unwrap();
            }
        })
    };
    for _ in 0..2000 {
        let found = root
            .resolve(Path::new("/up/../etc"), Create::Nothing)
            .unwrap();
        assert_eq!(real(&found), r.join("etc"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    renamer.join().unwrap();
}
