use super::*;

#[test]
fn mount_options() {
    let opts: Vec<String> = [
        "nosuid", "noexec", "rbind", "ro", "rprivate", "mode=755", "size=64k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let parsed = parse_mount_options(&opts);
    assert_eq!(
        parsed.flags,
        MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC
            | MsFlags::MS_BIND
            | MsFlags::MS_REC
            | MsFlags::MS_RDONLY
    );
    assert_eq!(parsed.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
    assert_eq!(parsed.data, ["mode=755", "size=64k"]);
    let parsed = parse_mount_options(&["ro".into(), "rw".into()]);
    assert_eq!(parsed.flags, MsFlags::empty());
}

#[test]
fn frames_round_trip() {
    let mut buf = Vec::new();
    write_frame(&mut buf, &FromHelper::Ready).unwrap();
    write_frame(
        &mut buf,
        &FromHelper::Failed {
            invalid: true,
            message: "no".into(),
        },
    )
    .unwrap();
    let mut input = &buf[..];
    assert!(matches!(
        read_frame(&mut input).unwrap(),
        Some(FromHelper::Ready)
    ));
    assert!(matches!(
        read_frame(&mut input).unwrap(),
        Some(FromHelper::Failed { invalid: true, .. })
    ));
    assert!(read_frame::<FromHelper>(&mut input).unwrap().is_none());
    let mut huge = &(u32::MAX.to_le_bytes())[..];
    assert!(read_frame::<FromHelper>(&mut huge).is_err());
}
