//! `api_request`: whole byte streams, as a client of the control API could
//! send them, through the VMM's real HTTP server ([`http::serve_connection`])
//! over an in-memory pipe. The handler checks what the server promises it
//! (a body within the limit); any answer must be HTTP/1.x.

use std::cell::Cell;
use std::rc::Rc;

use frakti_vmm::api::http;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `data` as one connection; the handler's calls and the answer.
pub fn exchange(data: &[u8]) -> (usize, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let calls = Rc::new(Cell::new(0usize));
    let local = tokio::task::LocalSet::new();
    let answer = local.block_on(&runtime, async {
        let (mut client, server) = tokio::io::duplex(http::MAX_HEAD_BYTES * 4);
        let counted = calls.clone();
        let handler = Rc::new(
            move |method: &str, path: &str, body: Vec<u8>| -> http::Answer {
                assert!(
                    body.len() <= http::MAX_BODY_BYTES,
                    "{} body bytes",
                    body.len()
                );
                counted.set(counted.get() + 1);
                let answer = (
                    200,
                    json!({ "method": method, "path": path, "len": body.len() }),
                );
                Box::pin(async move { answer })
            },
        );
        let served = tokio::task::spawn_local(http::serve_connection(server, handler));
        // The pipe may fill while the server answers early: write what fits.
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        let _ = client.read_to_end(&mut answer).await;
        let _ = served.await;
        answer
    });
    (calls.get(), answer)
}

pub fn api_request(data: &[u8]) {
    let (calls, answer) = exchange(data);
    assert!(
        calls <= 1,
        "one request per connection, the handler ran {calls} times"
    );
    if !answer.is_empty() {
        // An HTTP/1.0 request gets an HTTP/1.0 answer.
        assert!(
            answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
            "not an HTTP/1.x answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(64)])
        );
    }
}

/// Requests the API serves, and ones it must refuse.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("get_vm", b"GET /vm HTTP/1.1\r\nHost: vmm\r\n\r\n".to_vec()),
        (
            "shutdown_body",
            b"PUT /vm/shutdown HTTP/1.1\r\nHost: vmm\r\nContent-Length: 16\r\n\r\n{\"timeout_ms\":0}".to_vec(),
        ),
        (
            "chunked_disk",
            b"PUT /disks/vol0 HTTP/1.1\r\nHost: vmm\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\n{\"pat\r\n11\r\nh\": \"/img/a.raw\"}\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "huge_length",
            b"PUT /vm/shutdown HTTP/1.1\r\nHost: vmm\r\nContent-Length: 18446744073709551615\r\n\r\n{}".to_vec(),
        ),
        ("garbage", b"\x00\x01garbage\r\n\r\n".to_vec()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(answer: &[u8]) -> &str {
        std::str::from_utf8(answer.get(9..12).unwrap_or_default()).unwrap_or("")
    }

    #[test]
    fn seeds_get_the_answers_they_should() {
        let want = [
            ("get_vm", 1, "200"),
            ("shutdown_body", 1, "200"),
            ("chunked_disk", 1, "200"),
            ("huge_length", 0, "431"),
            ("garbage", 0, "400"),
        ];
        for ((name, input), (want_name, want_calls, want_status)) in seeds().into_iter().zip(want) {
            assert_eq!(name, want_name);
            let (calls, answer) = exchange(&input);
            assert_eq!(
                calls,
                want_calls,
                "{name}: {}",
                String::from_utf8_lossy(&answer)
            );
            assert_eq!(
                status(&answer),
                want_status,
                "{name}: {}",
                String::from_utf8_lossy(&answer)
            );
            api_request(&input);
        }
        // A body over the limit never reaches the handler.
        let mut big = format!(
            "PUT /disks/vol0 HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            http::MAX_BODY_BYTES + 1
        )
        .into_bytes();
        big.resize(big.len() + http::MAX_BODY_BYTES + 1, b'x');
        let (calls, answer) = exchange(&big);
        assert_eq!((calls, status(&answer)), (0, "413"));
        // Half a request, then the client's end: no answer, no call.
        let (calls, _) = exchange(b"GET /vm HTTP/1.1\r\nHo");
        assert_eq!(calls, 0);
    }
}
