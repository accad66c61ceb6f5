//! User-namespace id mappings as the daemon sends them and the agent
//! applies them: one check, so a mapping the daemon accepts is one the
//! agent (and the kernel) takes.

use serde::{Deserialize, Serialize};

/// Ranges per kind, as the kernel allows in one uid_map.
pub const MAX_RANGES: usize = 340;

/// One range of a mapping: `size` ids from `container` inside are `host`
/// onwards outside (in the guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

impl Range {
    pub const fn new(container: u32, host: u32, size: u32) -> Self {
        Range {
            container,
            host,
            size,
        }
    }
}

/// A mapping the kernel will take: 1 to 340 ranges, none empty or past
/// 2^32, none overlapping another inside or outside, and the container's
/// root mapped (its root filesystem is given to it). The error says why;
/// the caller names the field.
pub fn check(ranges: &[Range]) -> Result<(), String> {
    let invalid = |why: String| Err(why);
    if ranges.is_empty() {
        return invalid("a user namespace needs at least one range".into());
    }
    if ranges.len() > MAX_RANGES {
        return invalid(format!(
            "{} ranges; the kernel takes at most {MAX_RANGES}",
            ranges.len()
        ));
    }
    let end = |start: u32, size: u32| u64::from(start) + u64::from(size);
    for (i, r) in ranges.iter().enumerate() {
        if r.size == 0 {
            return invalid(format!("range {i} has size 0"));
        }
        if end(r.container, r.size) > 1 << 32 || end(r.host, r.size) > 1 << 32 {
            return invalid(format!("range {i} goes past id 4294967295"));
        }
        for (j, other) in ranges.iter().enumerate().take(i) {
            let overlaps =
                |a: u32, b: u32| u64::from(a) < end(b, other.size) && u64::from(b) < end(a, r.size);
            if overlaps(r.container, other.container) {
                return invalid(format!("ranges {j} and {i} overlap inside the container"));
            }
            if overlaps(r.host, other.host) {
                return invalid(format!("ranges {j} and {i} overlap outside the container"));
            }
        }
    }
    if to_host(ranges, 0).is_none() {
        return invalid("the container's root (id 0) is not mapped".into());
    }
    Ok(())
}

/// The outside id of the container's `id`, if a range maps it.
pub fn to_host(ranges: &[Range], id: u32) -> Option<u32> {
    ranges.iter().find_map(|r| {
        let offset = id.checked_sub(r.container)?;
        (offset < r.size)
            .then(|| r.host.checked_add(offset))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use Range as R;

    #[test]
    fn ids_map_only_inside_ranges() {
        let ranges = [R::new(0, 100_000, 10), R::new(1000, 200_000, 5)];
        assert_eq!(to_host(&ranges, 0), Some(100_000));
        assert_eq!(to_host(&ranges, 9), Some(100_009));
        assert_eq!(to_host(&ranges, 1004), Some(200_004));
        assert_eq!(to_host(&ranges, 10), None);
        assert_eq!(to_host(&ranges, 1005), None);
        // A range ending at the top of the id space maps its last id.
        let top = [R::new(0, u32::MAX, 1)];
        assert_eq!(to_host(&top, 0), Some(u32::MAX));
        assert_eq!(to_host(&top, 1), None);
    }

    #[test]
    fn malformed_mappings_are_refused_with_the_reason() {
        let cases: &[(&[Range], &str)] = &[
            (&[], "at least one range"),
            (&[R::new(0, 1000, 0)], "size 0"),
            (&[R::new(0, u32::MAX, 2)], "past id"),
            (&[R::new(u32::MAX, 0, 2)], "past id"),
            (
                &[R::new(0, 1000, 10), R::new(5, 5000, 10)],
                "overlap inside",
            ),
            (
                &[R::new(0, 1000, 10), R::new(100, 1005, 10)],
                "overlap outside",
            ),
            (&[R::new(1, 1000, 10)], "root (id 0) is not mapped"),
        ];
        for (ranges, why) in cases {
            let err = check(ranges).unwrap_err();
            assert!(err.contains(why), "{ranges:?}: {err}");
        }
        let many: Vec<Range> = (0..=MAX_RANGES as u32)
            .map(|i| R::new(i, i + 1000, 1))
            .collect();
        assert!(check(&many).unwrap_err().contains("at most"));
        assert!(check(&[R::new(0, 65536, 65536)]).is_ok());
    }
}
