//! HTTP/1.1 by hand: request heads as read (the proxy forwards them
//! byte-exact) and JSON responses.

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest request head we read.
const MAX_HEAD: usize = 64 << 10;

/// One request head, as read.
pub(super) struct Head {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) version: String,
    /// The header lines, verbatim (without their CRLF).
    pub(super) lines: Vec<String>,
}

impl Head {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.lines.iter().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub(super) fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    pub(super) fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    pub(super) fn keep_alive(&self) -> bool {
        let close = self
            .header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        self.version == "HTTP/1.1" && !close
    }
}

/// Reads a request head; `buf` holds what was read before and keeps the
/// bytes past the head. `None` at a clean end of the connection.
pub(super) async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Option<Head>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let raw: Vec<u8> = buf.drain(..end + 4).collect();
            let text = std::str::from_utf8(&raw[..end]).context("request head is not UTF-8")?;
            let mut lines = text.split("\r\n");
            let request_line = lines.next().unwrap_or_default();
            let mut parts = request_line.split(' ');
            let (Some(method), Some(target), Some(version), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                bail!("bad request line {request_line:?}");
            };
            return Ok(Some(Head {
                method: method.into(),
                target: target.into(),
                version: version.into(),
                lines: lines.map(String::from).collect(),
            }));
        }
        ensure!(buf.len() <= MAX_HEAD, "request head over {MAX_HEAD} bytes");
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            ensure!(buf.is_empty(), "connection closed inside a request head");
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub(super) async fn write_response(
    stream: &mut TcpStream,
    code: u16,
    body: &Value,
    keep_alive: bool,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(body)?;
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Internal Server Error",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    Ok(())
}
