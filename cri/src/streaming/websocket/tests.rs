use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures_util::{Sink, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::exec::{ExecInput, MAX_RESIZE, ResizeDecoder, process_session, route_exec};
use super::portforward::{port_forward_session, route_port};
use super::*;
use crate::streaming::io::{Outcome, PortConnection, ProcessIo, TermSize};
use crate::streaming::remotecommand::{legacy_error, status_json};
use crate::streaming::request::ProcessRequest;

fn data(channel: u8, payload: &[u8]) -> Result<ClientMessage, WsError> {
    Ok(ClientMessage::Data {
        channel,
        payload: Bytes::copy_from_slice(payload),
    })
}

fn binary(bytes: &[u8]) -> Message {
    Message::Binary(Bytes::copy_from_slice(bytes))
}

fn text(s: &str) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

fn b64(channel: char, payload: &[u8]) -> Message {
    text(&format!("{channel}{}", STANDARD.encode(payload)))
}

fn with_channel(channel: u8, payload: &[u8]) -> Message {
    let mut frame = vec![channel];
    frame.extend_from_slice(payload);
    Message::Binary(Bytes::from(frame))
}

#[test]
fn binary_messages_are_channel_and_payload() {
    for kind in [Kind::V5, Kind::V4, Kind::V1] {
        assert_eq!(decode_client_message(kind, &[0, 1, 2]), data(0, &[1, 2]));
        assert_eq!(decode_client_message(kind, &[4]), data(4, &[]));
        assert_eq!(decode_client_message(kind, &[9, 0]), data(9, &[0]));
    }
}

#[test]
fn an_empty_message_has_no_channel() {
    for kind in Kind::ALL {
        assert_eq!(decode_client_message(kind, &[]), Err(WsError::Empty));
    }
}

#[test]
fn base64_messages_are_a_digit_and_standard_base64() {
    for kind in [Kind::V4Base64, Kind::V1Base64] {
        assert_eq!(decode_client_message(kind, b"0aGk="), data(0, b"hi"));
        assert_eq!(decode_client_message(kind, b"4"), data(4, b""));
        // Go's decoder skips line breaks and accepts non-zero trailing bits.
        assert_eq!(decode_client_message(kind, b"0aG\r\nk="), data(0, b"hi"));
        assert_eq!(decode_client_message(kind, b"0aGl="), data(0, b"hi"));
        // Channels past 9 are the characters after '9'.
        assert_eq!(decode_client_message(kind, b":aGk="), data(10, b"hi"));
        assert_eq!(
            decode_client_message(kind, b"/aGk="),
            Err(WsError::ChannelChar(b'/'))
        );
        for bad in [&b"0aGk"[..], b"0!!!!", b"0aGk=x", b"0\xff"] {
            let result = decode_client_message(kind, bad);
            assert!(
                matches!(result, Err(WsError::Base64 { channel: 0, .. })),
                "{bad:?}: {result:?}"
            );
        }
    }
}

#[test]
fn only_v5_has_the_close_signal() {
    assert_eq!(
        decode_client_message(Kind::V5, &[255, 0]),
        Ok(ClientMessage::Close { channel: 0 })
    );
    assert_eq!(
        decode_client_message(Kind::V5, &[255]),
        Err(WsError::CloseSignal(0))
    );
    assert_eq!(
        decode_client_message(Kind::V5, &[255, 0, 1]),
        Err(WsError::CloseSignal(2))
    );
    // Elsewhere it is data on a channel that does not exist.
    let v4 = decode_client_message(Kind::V4, &[255, 0]);
    assert_eq!(v4, data(255, &[0]));
    assert_eq!(route_exec(v4.unwrap()), Err(WsError::UnknownChannel(255)));
    assert_eq!(decode_client_message(Kind::V4, &[255]), data(255, &[]));
}

#[test]
fn encoding_is_what_clients_decode() {
    assert_eq!(encode_message(Kind::V4, 1, b"x"), binary(&[1, b'x']));
    assert_eq!(encode_message(Kind::V5, 3, b""), binary(&[3]));
    assert_eq!(encode_message(Kind::V4Base64, 1, b"hi"), text("1aGk="));
    assert_eq!(encode_message(Kind::V1Base64, 2, b""), text("2"));
    for kind in Kind::ALL {
        for payload in [&b""[..], b"a", b"ab", b"abc", &[0, 255, 128, 10]] {
            for channel in [0, 1, 4, 20] {
                let msg = encode_message(kind, channel, payload);
                let bytes = message_bytes(&msg).unwrap();
                assert_eq!(
                    decode_client_message(kind, bytes),
                    data(channel, payload),
                    "{kind:?} {channel} {payload:?}"
                );
            }
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 12) as usize;
        let msg: Vec<u8> = seed
            .to_le_bytes()
            .iter()
            .cycle()
            .take(len)
            .copied()
            .collect();
        for kind in Kind::ALL {
            if let Ok(decoded) = decode_client_message(kind, &msg) {
                let _ = route_exec(decoded.clone());
                let _ = route_port(decoded, 3);
            }
        }
    }
}

#[test]
fn exec_messages_go_to_stdin_and_resize() {
    let payload = Bytes::from_static(b"x");
    let msg = |channel| ClientMessage::Data {
        channel,
        payload: payload.clone(),
    };
    assert_eq!(route_exec(msg(0)), Ok(ExecInput::Stdin(payload.clone())));
    assert_eq!(route_exec(msg(4)), Ok(ExecInput::Resize(payload.clone())));
    for channel in 1..=3 {
        assert_eq!(route_exec(msg(channel)), Err(WsError::WriteOnly(channel)));
    }
    assert_eq!(route_exec(msg(5)), Err(WsError::UnknownChannel(5)));
    let close = |channel| ClientMessage::Close { channel };
    assert_eq!(route_exec(close(0)), Ok(ExecInput::CloseStdin));
    assert_eq!(route_exec(close(4)), Ok(ExecInput::CloseResize));
    assert_eq!(route_exec(close(2)), Err(WsError::WriteOnly(2)));
    assert_eq!(route_exec(close(7)), Err(WsError::UnknownChannel(7)));
}

#[test]
fn port_messages_go_to_their_port() {
    let payload = Bytes::from_static(b"x");
    let msg = |channel| ClientMessage::Data {
        channel,
        payload: payload.clone(),
    };
    assert_eq!(route_port(msg(0), 2), Ok((0, payload.clone())));
    assert_eq!(route_port(msg(2), 2), Ok((1, payload.clone())));
    assert_eq!(route_port(msg(1), 2), Err(WsError::WriteOnly(1)));
    assert_eq!(route_port(msg(3), 2), Err(WsError::WriteOnly(3)));
    assert_eq!(route_port(msg(4), 2), Err(WsError::UnknownChannel(4)));
    assert_eq!(route_port(msg(255), 2), Err(WsError::UnknownChannel(255)));
    assert_eq!(
        route_port(ClientMessage::Close { channel: 0 }, 2),
        Err(WsError::UnknownChannel(0))
    );
}

#[test]
fn resize_messages_are_a_json_stream() {
    let size = |width, height| TermSize { width, height };
    let mut decoder = ResizeDecoder::default();
    assert_eq!(
        decoder.push(br#"{"Width":80,"Height":24}"#),
        Ok(vec![size(80, 24)])
    );
    assert_eq!(decoder.push(br#"{"Width":100,"#), Ok(vec![]));
    assert_eq!(decoder.push(br#""Height":50}"#), Ok(vec![size(100, 50)]));
    assert_eq!(
        decoder.push(br#"{"width":1,"height":2} {"Width":3}"#),
        Ok(vec![size(1, 2), size(3, 0)])
    );
    assert!(matches!(decoder.push(b"nope"), Err(WsError::Resize(_))));
    assert!(matches!(
        decoder.push(br#"{"Width":-1,"Height":2}"#),
        Err(WsError::Resize(_))
    ));
    // An error drops what was pending; the next size decodes.
    assert_eq!(
        decoder.push(br#"{"Width":5,"Height":6}"#),
        Ok(vec![size(5, 6)])
    );
    let long = format!(r#"{{"Width":1{}"#, " ".repeat(MAX_RESIZE));
    assert_eq!(
        decoder.push(long.as_bytes()),
        Err(WsError::ResizeTooLong(MAX_RESIZE))
    );
    assert_eq!(
        decoder.push(br#"{"Width":7,"Height":8}"#),
        Ok(vec![size(7, 8)])
    );
}

#[test]
fn protocols_are_known_kinds() {
    let exec: Vec<Kind> = EXEC_PROTOCOLS
        .iter()
        .map(|p| Kind::exec(p).unwrap())
        .collect();
    assert_eq!(
        exec,
        [Kind::V5, Kind::V4, Kind::V4Base64, Kind::V1, Kind::V1Base64]
    );
    assert_eq!(Kind::exec(""), Ok(Kind::V1));
    assert!(matches!(
        Kind::exec("v3.channel.k8s.io"),
        Err(WsError::Protocol(_))
    ));
    let forward: Vec<Kind> = PORT_FORWARD_PROTOCOLS
        .iter()
        .map(|p| Kind::port_forward(p).unwrap())
        .collect();
    assert_eq!(
        forward,
        [Kind::V4, Kind::V4Base64, Kind::V4, Kind::V4Base64]
    );
    assert_eq!(Kind::port_forward(""), Ok(Kind::V1));
    assert!(Kind::port_forward("v5.channel.k8s.io").is_err());
    assert!(Kind::port_forward("portforward.k8s.io").is_err());
}

/// The client's end of a fake connection.
struct Client {
    to_server: Option<mpsc::Sender<Message>>,
    from_server: mpsc::Receiver<Message>,
}

impl Client {
    async fn send(&self, msg: Message) {
        if let Some(to_server) = &self.to_server {
            to_server.send(msg).await.unwrap();
        }
    }

    async fn recv(&mut self) -> Option<Message> {
        self.from_server.recv().await
    }

    /// Messages until the server's close frame (answered by hanging up).
    async fn until_close(&mut self) -> (Vec<Message>, Option<CloseFrame>) {
        let mut messages = Vec::new();
        while let Some(msg) = self.recv().await {
            if let Message::Close(frame) = msg {
                self.to_server = None;
                return (messages, frame);
            }
            messages.push(msg);
        }
        (messages, None)
    }
}

/// A connection: the server's sink and stream, and the client's end.
fn connection() -> (
    impl Sink<Message> + Unpin,
    impl Stream<Item = Result<Message, Infallible>> + Unpin,
    Client,
) {
    let (to_client, from_server) = mpsc::channel::<Message>(64);
    let (to_server, from_client) = mpsc::channel::<Message>(64);
    let sink = Box::pin(futures_util::sink::unfold(
        to_client,
        |to_client, msg: Message| async move {
            to_client.send(msg).await.map_err(|_| ())?;
            Ok::<_, ()>(to_client)
        },
    ));
    let stream = ReceiverStream::new(from_client).map(Ok::<_, Infallible>);
    let client = Client {
        to_server: Some(to_server),
        from_server,
    };
    (sink, stream, client)
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("the session hangs")
}

fn process(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> ProcessRequest {
    ProcessRequest {
        container_id: "c".into(),
        cmd: vec!["sh".into()],
        tty,
        stdin,
        stdout,
        stderr,
    }
}

fn close_code(frame: &Option<CloseFrame>) -> Option<u16> {
    frame.as_ref().map(|f| f.code)
}

#[tokio::test]
async fn exec_v4_pumps_the_streams_and_ends_with_the_status() {
    let (tx, rx, mut client) = connection();
    let request = process(true, true, true, false);
    let run = |mut io: ProcessIo| async move {
        assert!(io.resize.is_none());
        let mut stdin = io.stdin.take().unwrap();
        let first = stdin.recv().await.unwrap();
        io.stdout.as_ref().unwrap().send(first).await.unwrap();
        io.stderr
            .as_ref()
            .unwrap()
            .send(Bytes::from_static(b"warn"))
            .await
            .unwrap();
        Outcome::Exited(3)
    };
    let session = process_session(tx, rx, Kind::V4, &request, run);
    let script = async {
        assert_eq!(client.recv().await, Some(binary(&[1])));
        // Unknown channels and control messages are ignored.
        client.send(binary(&[9, 1])).await;
        client.send(Message::Ping(Bytes::new())).await;
        client.send(binary(&[0, b'h', b'i'])).await;
        client.until_close().await
    };
    let ((), (messages, frame)) = within(async { tokio::join!(session, script) }).await;
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert!(messages.contains(&binary(b"\x01hi")));
    assert!(messages.contains(&binary(b"\x02warn")));
    assert_eq!(
        messages[2],
        with_channel(3, &status_json(&Outcome::Exited(3)))
    );
    assert_eq!(close_code(&frame), Some(1000));
}

#[tokio::test]
async fn exec_v5_close_signal_ends_stdin() {
    let (tx, rx, mut client) = connection();
    let request = process(true, false, true, false);
    let run = |io: ProcessIo| async move {
        let mut stdin = io.stdin.unwrap();
        let mut total = 0;
        while let Some(chunk) = stdin.recv().await {
            total += chunk.len();
        }
        let count = Bytes::from(total.to_string());
        io.stderr.unwrap().send(count).await.unwrap();
        Outcome::Exited(0)
    };
    let session = process_session(tx, rx, Kind::V5, &request, run);
    let script = async {
        // No stdout: the open message is on stderr.
        assert_eq!(client.recv().await, Some(binary(&[2])));
        client.send(binary(b"\x00abc")).await;
        client.send(binary(&[0])).await;
        client.send(binary(&[255, 0])).await;
        client.until_close().await
    };
    let ((), (messages, frame)) = within(async { tokio::join!(session, script) }).await;
    assert_eq!(
        messages,
        [
            binary(b"\x023"),
            with_channel(3, &status_json(&Outcome::Exited(0)))
        ]
    );
    assert_eq!(close_code(&frame), Some(1000));
}

#[tokio::test]
async fn exec_base64_v1_resizes_and_reports_only_errors() {
    for (outcome, status) in [
        (Outcome::Exited(0), None),
        (Outcome::Exited(2), legacy_error(&Outcome::Exited(2))),
    ] {
        let (tx, rx, mut client) = connection();
        let request = process(false, true, false, true);
        let ended = outcome.clone();
        let run = |io: ProcessIo| async move {
            assert!(io.stdin.is_none() && io.stderr.is_none());
            let mut resize = io.resize.unwrap();
            let first = resize.recv().await.unwrap();
            let second = resize.recv().await.unwrap();
            let sizes = format!(
                "{}x{} {}x{}",
                first.width, first.height, second.width, second.height
            );
            io.stdout.unwrap().send(Bytes::from(sizes)).await.unwrap();
            ended
        };
        let session = process_session(tx, rx, Kind::V1Base64, &request, run);
        let script = async {
            assert_eq!(client.recv().await, Some(text("1")));
            client.send(b64('4', br#"{"Width":80,"#)).await;
            client.send(b64('4', br#""Height":24}"#)).await;
            client.send(text("4!!!")).await;
            client.send(b64('4', br#"{"width":100,"height":50}"#)).await;
            client.until_close().await
        };
        let ((), (messages, frame)) = within(async { tokio::join!(session, script) }).await;
        let mut expected = vec![b64('1', b"80x24 100x50")];
        if let Some(status) = status {
            expected.push(b64('3', &status));
        }
        assert_eq!(messages, expected, "{outcome:?}");
        assert_eq!(close_code(&frame), Some(1000));
    }
}

#[tokio::test]
async fn exec_client_gone_closes_the_process_streams() {
    let (tx, rx, mut client) = connection();
    let request = process(true, true, false, false);
    let (seen_tx, seen) = oneshot::channel();
    let run = |io: ProcessIo| async move {
        let stdout = io.stdout.unwrap();
        stdout.closed().await;
        let eof = io.stdin.unwrap().recv().await.is_none();
        let _ = seen_tx.send(eof);
        Outcome::Failed("the client left".into())
    };
    let session = process_session(tx, rx, Kind::V4, &request, run);
    let script = async {
        assert_eq!(client.recv().await, Some(binary(&[1])));
        client.to_server = None;
        // Nothing after the client left.
        client.recv().await
    };
    let ((), after) = within(async { tokio::join!(session, script) }).await;
    assert_eq!(after, None);
    assert_eq!(seen.await, Ok(true));
}

/// A fake connection to a port in the pod: `pod` gets the bytes for it
/// and the senders of its side.
fn fake_port<P, Fut>(pod: P) -> PortConnection
where
    P: FnOnce(mpsc::Receiver<Bytes>, mpsc::Sender<Bytes>, oneshot::Sender<String>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (to_pod, to_pod_rx) = mpsc::channel(8);
    let (from_pod_tx, from_pod) = mpsc::channel(8);
    let (error_tx, error) = oneshot::channel();
    tokio::spawn(pod(to_pod_rx, from_pod_tx, error_tx));
    PortConnection {
        to_pod,
        from_pod,
        error,
    }
}

/// An upper-casing echo that closes after its first answer.
fn echo_once() -> PortConnection {
    fake_port(|mut input, output, _error| async move {
        if let Some(data) = input.recv().await {
            let _ = output.send(Bytes::from(data.to_ascii_uppercase())).await;
        }
    })
}

#[tokio::test]
async fn port_forward_names_the_ports_and_reports_failures_per_port() {
    let (tx, rx, mut client) = connection();
    let connect = |port: u16| async move {
        match port {
            80 => Err("error forwarding port 80 to pod p: nothing listens".to_string()),
            _ => Ok(echo_once()),
        }
    };
    let session = port_forward_session(tx, rx, Kind::V4, "p", &[80, 8081], connect);
    let script = async {
        for (channel, port) in [(0, 80u16), (1, 80), (2, 8081), (3, 8081)] {
            assert_eq!(
                client.recv().await,
                Some(with_channel(channel, &port.to_le_bytes()))
            );
        }
        client.send(binary(b"\x01ignored")).await;
        client.send(binary(b"\x00nobody")).await;
        client.send(binary(b"\x02ping")).await;
        client.until_close().await
    };
    let ((), (messages, frame)) = within(async { tokio::join!(session, script) }).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages.contains(&binary(
        b"\x01error forwarding port 80 to pod p: nothing listens"
    )));
    assert!(messages.contains(&binary(b"\x02PING")));
    // Every connection ended: the server closes.
    assert_eq!(close_code(&frame), Some(1000));
}

#[tokio::test]
async fn port_forward_base64_and_a_failure_after_connecting() {
    let (tx, rx, mut client) = connection();
    let connect = |_port: u16| async move {
        Ok(fake_port(|mut input, output, error| async move {
            if let Some(data) = input.recv().await {
                let _ = output.send(data).await;
            }
            let _ = error.send("connection reset".into());
            drop(output);
        }))
    };
    let session = port_forward_session(tx, rx, Kind::V4Base64, "p", &[8080], connect);
    let script = async {
        assert_eq!(client.recv().await, Some(b64('0', &8080u16.to_le_bytes())));
        assert_eq!(client.recv().await, Some(b64('1', &8080u16.to_le_bytes())));
        client.send(b64('0', b"hello")).await;
        client.until_close().await
    };
    let ((), (messages, frame)) = within(async { tokio::join!(session, script) }).await;
    assert_eq!(
        messages,
        [
            b64('0', b"hello"),
            b64(
                '1',
                b"error forwarding port 8080 to pod p: connection reset"
            )
        ]
    );
    assert_eq!(close_code(&frame), Some(1000));
}

#[tokio::test]
async fn port_forward_ends_when_the_client_closes() {
    let (tx, rx, mut client) = connection();
    let (closed_tx, closed) = oneshot::channel();
    let closed_tx = std::sync::Mutex::new(Some(closed_tx));
    let connect = |_port: u16| {
        let closed_tx = crate::lock(&closed_tx).take();
        async move {
            // A pod that never closes its side.
            Ok(fake_port(|mut input, output, _error| async move {
                while input.recv().await.is_some() {}
                if let Some(closed_tx) = closed_tx {
                    let _ = closed_tx.send(());
                }
                output.closed().await;
            }))
        }
    };
    let session = port_forward_session(tx, rx, Kind::V4, "p", &[1], connect);
    let script = async {
        assert_eq!(client.recv().await, Some(with_channel(0, &[1, 0])));
        assert_eq!(client.recv().await, Some(with_channel(1, &[1, 0])));
        client.send(Message::Close(None)).await;
        client.recv().await
    };
    let ((), after) = within(async { tokio::join!(session, script) }).await;
    // Our close frame answers the client's.
    assert_eq!(after, Some(Message::Close(None)));
    // The pod's connection was closed.
    assert_eq!(within(closed).await, Ok(()));
}

#[tokio::test]
async fn port_forward_refuses_too_many_ports() {
    let (tx, rx, mut client) = connection();
    let ports: Vec<u16> = (1..=41).collect();
    let connect = |_port: u16| async move { Err::<PortConnection, _>("unused".to_string()) };
    let session = port_forward_session(tx, rx, Kind::V4Base64, "p", &ports, connect);
    let ((), (messages, frame)) =
        within(async { tokio::join!(session, client.until_close()) }).await;
    assert!(messages.is_empty());
    assert_eq!(close_code(&frame), Some(1008));
}
