//! The image's StopSignal as a number.

pub(super) const SIGTERM: i32 = 15;

/// SIGRTMIN and SIGRTMAX as userspace (glibc, Docker's signal map) sees
/// them: the kernel's first two real-time signals belong to the threading
/// library.
const SIGRTMIN: i32 = 34;
const SIGRTMAX: i32 = 64;

/// Linux x86_64 signal numbers, by name without the SIG prefix.
const SIGNALS: [(&str, i32); 34] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// The signal StopContainer sends first: the image's StopSignal ("SIGQUIT",
/// "quit", "3", "SIGRTMIN+3", "RTMAX-1"), else SIGTERM. A StopSignal that
/// names no signal is ignored (with a warning) rather than failing the
/// container: stopping still works, with SIGTERM then SIGKILL.
pub(super) fn stop_signal(image_stop_signal: Option<&str>) -> i32 {
    match image_stop_signal.map(str::trim) {
        None | Some("") => SIGTERM,
        Some(name) => parse(name).unwrap_or_else(|| {
            tracing::warn!(
                stop_signal = name,
                "the image's StopSignal names no signal; using SIGTERM"
            );
            SIGTERM
        }),
    }
}

pub(super) fn parse(name: &str) -> Option<i32> {
    if name.len() > 32 {
        return None;
    }
    if let Some(n) = number(name) {
        return (1..=SIGRTMAX).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, n)) = SIGNALS.iter().find(|(s, _)| *s == bare) {
        return Some(n);
    }
    let realtime = if let Some(rest) = bare.strip_prefix("RTMIN") {
        offset(rest, '+').and_then(|k| SIGRTMIN.checked_add(k))
    } else if let Some(rest) = bare.strip_prefix("RTMAX") {
        offset(rest, '-').and_then(|k| SIGRTMAX.checked_sub(k))
    } else {
        None
    };
    realtime.filter(|n| (SIGRTMIN..=SIGRTMAX).contains(n))
}

/// "" -> 0; "<sign>k" -> k.
fn offset(rest: &str, sign: char) -> Option<i32> {
    if rest.is_empty() {
        return Some(0);
    }
    number(rest.strip_prefix(sign)?)
}

fn number(s: &str) -> Option<i32> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}
