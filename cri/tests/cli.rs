//! The `frakti` CLI where no daemon is needed: what it says when nothing
//! listens, its one-line errors, --version, --help and completions.

use std::process::{Command, Output};

fn frakti(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_frakti"))
        .args(args)
        .output()
        .expect("run frakti")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn without_a_daemon_it_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    for args in [
        &["ps"][..],
        &["run", "busybox"],
        &["logs", "x"],
        &["images"],
    ] {
        let mut all = vec!["--endpoint", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = frakti(&all);
        let text = stderr(&out);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        assert_eq!(text.lines().count(), 1, "{args:?}: one line: {text:?}");
        assert!(
            text.starts_with(&format!(
                "frakti: error: nothing listens on {}",
                socket.display()
            )) && text.contains("frakti daemon"),
            "{args:?}: {text:?}"
        );
    }
}

#[test]
fn usage_errors_are_one_line_and_help_explains() {
    let out = frakti(&["run", "--no-such-flag", "busybox"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        stderr(&out),
        "frakti: error: unexpected argument '--no-such-flag' found (see frakti --help)\n"
    );
    let out = frakti(&["stop"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("frakti: error: "), "{out:?}");

    let help = frakti(&["run", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success());
    for needle in [
        "--volume-device",
        "--kernel",
        "Examples:",
        "frakti run -it --rm busybox sh",
    ] {
        assert!(
            text.contains(needle),
            "run --help lacks {needle:?}:\n{text}"
        );
    }
    let version = frakti(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("frakti {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn completions_for_each_shell() {
    for (shell, needle) in [
        ("bash", "_frakti()"),
        ("zsh", "#compdef frakti"),
        ("fish", "complete -c frakti"),
    ] {
        let out = frakti(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{shell}: no {needle:?}");
        assert!(
            text.contains("volume-device"),
            "{shell}: run's flags are completed"
        );
    }
    let out = frakti(&["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
