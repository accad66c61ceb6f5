//! Pods in a user namespace: the container's root is an unprivileged guest
//! id; its image and volumes look owned by it through idmapped mounts.

use super::*;

/// Guest ids 100000.. are the container's 0..65535.
const HOST_BASE: u32 = 100_000;

fn in_userns(mut spec: Value, host: u32) -> Value {
    let map = json!([{"containerID": 0, "hostID": host, "size": 65536}]);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    spec["linux"]["uidMappings"] = map.clone();
    spec["linux"]["gidMappings"] = map;
    spec
}

async fn stdout_until(c: &mut Client, id: &str, exec_id: &str, needle: &str) -> String {
    let mut out = c
        .read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    read_until(&mut out, needle).await
}

#[tokio::test]
async fn containers_of_a_pod_share_one_mapped_user_namespace() {
    use std::os::unix::fs::MetadataExt;
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    // A volume as the daemon leaves it in the guest: owned by guest root.
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("f"), "data").unwrap();
    let mut s = in_userns(
        spec(&[
            "sh",
            "-c",
            "cat /proc/self/uid_map /proc/self/gid_map; echo ids=$(id -u):$(id -g); \
             stat -c 'owner %n %u:%g' / /bin/busybox /dev /dev/null /vol /vol/f; \
             touch /new && stat -c 'owner %n %u:%g' /new; echo w > /vol/w; \
             hostname other 2>/dev/null || echo hostname refused; \
             mount -t tmpfs t /tmp 2>/dev/null || echo mount refused; \
             readlink /proc/self/ns/user; echo done; sleep 1000",
        ]),
        HOST_BASE,
    );
    s["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/vol", "type": "bind",
        "source": volume.path(), "options": ["rbind", "rw"]
    }));
    run(c, "first", &s).await;
    let text = stdout_until(c, "first", "", "done").await;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mapping = format!("0 {HOST_BASE} 65536");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>().join(" "),
        mapping,
        "{text}"
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>().join(" "),
        mapping,
        "{text}"
    );
    assert!(text.contains("ids=0:0"), "{text}");
    // The image (idmapped lower), the overlay's root, the tmpfs /dev and
    // the bound volume are the container root's; /dev/null (made by guest
    // root on a tmpfs owned by the mapped root) stays guest root's, which
    // the container sees as the overflow id.
    for path in ["/", "/bin/busybox", "/dev", "/vol", "/vol/f", "/new"] {
        assert!(
            text.contains(&format!("owner {path} 0:0")),
            "{path}: {text}"
        );
    }
    assert!(text.contains("owner /dev/null 65534:65534"), "{text}");
    // Capabilities inside are over the user namespace only: the UTS and
    // mount namespaces belong to the guest.
    assert!(text.contains("hostname refused"), "{text}");
    assert!(text.contains("mount refused"), "{text}");
    // The container root's write through the idmapped volume is guest
    // root's on disk.
    let written = std::fs::metadata(volume.path().join("w")).unwrap();
    assert_eq!((written.uid(), written.gid()), (0, 0));
    let userns = lines
        .iter()
        .find(|l| l.starts_with("user:["))
        .unwrap()
        .to_string();

    // An exec joins the same user namespace.
    exec(
        c,
        "first",
        "ids",
        process(&[
            "sh",
            "-c",
            "cat /proc/self/uid_map; id -u; readlink /proc/self/ns/user",
        ]),
    )
    .await
    .unwrap();
    let out = read_all(c, "first", "ids", pb::OutputStream::Stdout).await;
    assert!(out.contains(&format!("{HOST_BASE}")), "{out}");
    assert!(out.contains(&userns), "{out}");

    // A second container with the same mappings: the same namespace.
    let second = in_userns(
        spec(&[
            "sh",
            "-c",
            "readlink /proc/self/ns/user; echo done; sleep 1000",
        ]),
        HOST_BASE,
    );
    run(c, "second", &second).await;
    let out = stdout_until(c, "second", "", "done").await;
    assert!(out.contains(&userns), "{out} vs {userns}");

    // Other mappings in the same pod are refused.
    let other = in_userns(spec(&["true"]), 300_000);
    let err = create(c, "other", &other).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("one user namespace"), "{err:?}");
}

#[tokio::test]
async fn bad_user_namespace_specs_are_refused() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let mut overlapping = in_userns(spec(&["true"]), HOST_BASE);
    overlapping["linux"]["uidMappings"] = json!([
        {"containerID": 0, "hostID": HOST_BASE, "size": 100},
        {"containerID": 50, "hostID": 300000, "size": 100}
    ]);
    let mut by_path = spec(&["true"]);
    by_path["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user", "path": "/proc/1/ns/user"}));
    let mut without_userns = spec(&["true"]);
    without_userns["linux"]["uidMappings"] =
        json!([{"containerID": 0, "hostID": HOST_BASE, "size": 1}]);
    let mut root_unmapped = in_userns(spec(&["true"]), HOST_BASE);
    root_unmapped["linux"]["gidMappings"] =
        json!([{"containerID": 1, "hostID": HOST_BASE, "size": 10}]);
    for (name, s, expected) in [
        ("overlap", overlapping, "overlap inside"),
        ("path", by_path, "by path"),
        ("nouserns", without_userns, "need a user namespace"),
        ("noroot", root_unmapped, "gidMappings: the container's root"),
    ] {
        let err = create(c, name, &s).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(expected), "{name}: {err:?}");
    }
    // Nothing was made: a valid one still works afterwards.
    run(c, "fine", &in_userns(spec(&["id", "-u"]), HOST_BASE)).await;
    assert_eq!(wait(c, "fine", "").await.exit_code, 0);
}
