//! The ready line: the one line the agent prints on the console once the guest
//! is up. Hosts (the lab, tests, benchmarks) find it by its prefix and parse it.

use std::fmt;
use std::str::FromStr;

/// Every ready line starts with this marker.
pub const READY_MARKER: &str = "frakti-agent ready";

/// What the agent reports about the guest when it is ready.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyLine {
    /// Guest uptime in seconds when the agent became ready.
    pub uptime_secs: f64,
    /// Number of online vCPUs.
    pub cpus: u32,
    /// `MemTotal` from `/proc/meminfo`, in KiB.
    pub mem_total_kib: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("no '{READY_MARKER}' marker in line")]
    NoMarker,
    #[error("field '{0}' is missing")]
    Missing(&'static str),
    #[error("field '{field}' has a bad value '{value}'")]
    BadValue { field: &'static str, value: String },
}

impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{READY_MARKER} uptime={:.3} cpus={} mem_total_kib={}",
            self.uptime_secs, self.cpus, self.mem_total_kib
        )
    }
}

impl FromStr for ReadyLine {
    type Err = ParseError;

    /// Parses a ready line; text before the marker (a console prefix,
    /// kernel timestamps) is ignored.
    fn from_str(line: &str) -> Result<Self, ParseError> {
        let start = line.find(READY_MARKER).ok_or(ParseError::NoMarker)?;
        let fields = &line[start + READY_MARKER.len()..];
        Ok(ReadyLine {
            uptime_secs: field(fields, "uptime")?,
            cpus: field(fields, "cpus")?,
            mem_total_kib: field(fields, "mem_total_kib")?,
        })
    }
}

fn field<T: FromStr>(fields: &str, name: &'static str) -> Result<T, ParseError> {
    let value = fields
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .ok_or(ParseError::Missing(name))?;
    value.parse().map_err(|_| ParseError::BadValue {
        field: name,
        value: value.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_then_parse_round_trips() {
        let line = ReadyLine {
            uptime_secs: 0.812,
            cpus: 2,
            mem_total_kib: 496_012,
        };
        let text = line.to_string();
        assert_eq!(
            text,
            "frakti-agent ready uptime=0.812 cpus=2 mem_total_kib=496012"
        );
        assert_eq!(text.parse::<ReadyLine>(), Ok(line));
    }

    #[test]
    fn parse_ignores_console_prefix() {
        let parsed: ReadyLine = "\r[    0.9] frakti-agent ready uptime=1.5 cpus=1 mem_total_kib=10"
            .parse()
            .unwrap();
        assert_eq!(parsed.cpus, 1);
        assert_eq!(parsed.uptime_secs, 1.5);
    }

    #[test]
    fn parse_rejects_bad_lines() {
        assert_eq!("hello".parse::<ReadyLine>(), Err(ParseError::NoMarker));
        assert_eq!(
            "frakti-agent ready uptime=1 cpus=2".parse::<ReadyLine>(),
            Err(ParseError::Missing("mem_total_kib"))
        );
        assert_eq!(
            "frakti-agent ready uptime=x cpus=2 mem_total_kib=1".parse::<ReadyLine>(),
            Err(ParseError::BadValue {
                field: "uptime",
                value: "x".into()
            })
        );
    }
}
