//! WebSocket framing on the wire (RFC 6455), with a raw TCP client that
//! writes exactly the bytes each test needs: control frames, fragmentation,
//! the closing handshake, and the close codes for frames a client must not
//! send.

mod common;

use std::time::Duration;

use common::raw::{FIN, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, Raw, client_frame};
use common::{TestNode, token, within};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(u8::from(fin) << 7 | opcode, payload)
}

fn text(s: &str) -> Vec<u8> {
    frame(true, OP_TEXT, s.as_bytes())
}

/// Upgrades by hand; `extra` is written in the same packet as the request.
async fn open(node: &TestNode, extra: &[u8]) -> Raw {
    Raw::open(node.running.addr, "", extra).await
}

impl Raw {
    /// The next text frame as JSON, skipping pings.
    async fn next_json(&mut self) -> Value {
        serde_json::from_slice(&self.next_text().await.1).unwrap()
    }

    /// Reads to the close frame: its code, and whether the socket then ended.
    async fn close_and_end(&mut self) -> (u16, bool) {
        let code = self.close_code().await;
        // Answer, as a client should, then see the server hang up.
        let _ = self.tcp.write_all(&frame(true, OP_CLOSE, &code.to_be_bytes())).await;
        let ended = within(async { self.next().await.is_none() }).await;
        (code, ended)
    }

    async fn connect(&mut self, sub: &str) {
        let cmd = format!(r#"{{"op":"connect","id":1,"token":"{}"}}"#, token(sub, &["*"], &["*"]));
        self.send(&text(&cmd)).await;
        let r = self.next_json().await;
        assert!(r["ok"]["client"].is_string(), "{r}");
    }
}

#[tokio::test]
async fn a_ping_is_answered_with_a_pong_carrying_its_payload() {
    let node = TestNode::start().await;
    let mut c = open(&node, &[]).await;
    c.send(&frame(true, OP_PING, b"are you there")).await;
    assert_eq!(c.next().await, Some((FIN | OP_PONG, b"are you there".to_vec())));
    // Before connect and after: the same.
    c.connect("alice").await;
    c.send(&frame(true, OP_PING, b"")).await;
    assert_eq!(c.next().await, Some((FIN | OP_PONG, vec![])));
}

#[tokio::test]
async fn the_clients_close_is_echoed_and_the_socket_ends() {
    let node = TestNode::start().await;
    let mut c = open(&node, &[]).await;
    c.connect("alice").await;
    let mut close = 4321u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    c.send(&frame(true, OP_CLOSE, &close)).await;
    let (first, payload) = c.next().await.expect("a close frame");
    assert_eq!(first & 0x0f, OP_CLOSE);
    assert_eq!(&payload[..2], &4321u16.to_be_bytes(), "the code is echoed");
    assert_eq!(within(c.next()).await, None, "then the server closes the socket");
}

#[tokio::test]
async fn a_fragmented_command_with_a_ping_between_fragments_is_one_command() {
    let node = TestNode::start().await;
    let mut c = open(&node, &[]).await;
    c.connect("alice").await;
    let cmd = r#"{"op":"subscribe","id":7,"rooms":["général"]}"#.as_bytes();
    // Split inside the two-byte "é" as well.
    let cut = cmd.iter().position(|&b| b == 0xc3).unwrap() + 1;
    c.send(&frame(false, OP_TEXT, &cmd[..10])).await;
    c.send(&frame(true, OP_PING, b"x")).await;
    c.send(&frame(false, OP_CONT, &cmd[10..cut])).await;
    c.send(&frame(true, OP_CONT, &cmd[cut..])).await;
    assert_eq!(c.next().await, Some((FIN | OP_PONG, b"x".to_vec())));
    let r = c.next_json().await;
    assert_eq!(r["id"], 7, "{r}");
    assert_eq!(r["ok"]["rooms"][0]["room"], "général", "{r}");
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_not_lost() {
    let node = TestNode::start().await;
    let cmd = format!(r#"{{"op":"connect","id":1,"token":"{}"}}"#, token("alice", &["*"], &[]));
    let mut pipelined = text(&cmd);
    pipelined.extend(text(r#"{"op":"ping","id":2}"#));
    let mut c = open(&node, &pipelined).await;
    assert!(c.next_json().await["ok"]["client"].is_string());
    assert_eq!(c.next_json().await["op"], "pong");
    assert_eq!(c.next_json().await["id"], 2);
}

#[tokio::test]
async fn large_pushes_use_the_extended_length_encodings() {
    let node = TestNode::with(|o| o.no_rate_limits = Some(true)).await;
    let mut c = open(&node, &[]).await;
    c.connect("alice").await;
    c.send(&text(r#"{"op":"subscribe","id":2,"rooms":["big"]}"#)).await;
    assert!(c.next_json().await["ok"].is_object());
    for size in [100, 1_000, 40_000] {
        let data = "d".repeat(size);
        c.send(&text(&format!(
            r#"{{"op":"publish","id":3,"room":"big","data":"{data}"}}"#
        )))
        .await;
        let mut got_push = false;
        for _ in 0..2 {
            let v = c.next_json().await;
            if v["op"] == "message" {
                assert_eq!(v["data"].as_str().unwrap().len(), size);
                got_push = true;
            }
        }
        assert!(got_push);
    }
}

/// Each forbidden frame, sent after a valid connect, and the close code it earns.
#[tokio::test]
async fn frames_a_client_must_not_send_close_the_connection_with_the_right_code() {
    let node = TestNode::with(|o| o.max_frame_bytes = Some(1024)).await;
    let mut unmasked = text("{}");
    unmasked[1] &= 0x7f;
    unmasked.drain(2..6);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", unmasked, 1002),
        (
            "reserved bit",
            {
                let mut f = text("{}");
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("unknown opcode", frame(true, 0x3, b""), 1002),
        ("fragmented ping", frame(false, OP_PING, b""), 1002),
        ("continuation first", frame(true, OP_CONT, b"x"), 1002),
        ("invalid UTF-8", frame(true, OP_TEXT, &[b'"', 0xff, b'"']), 1007),
        ("over the size limit", text(&"x".repeat(2000)), 1009),
        (
            "binary on the JSON protocol, repeated",
            {
                let mut f = Vec::new();
                for _ in 0..50 {
                    f.extend(frame(true, OP_BINARY, b"\x00"));
                }
                f
            },
            4008,
        ),
    ];
    for (what, bytes, want) in cases {
        let mut c = open(&node, &[]).await;
        c.connect("alice").await;
        c.send(&bytes).await;
        let (code, ended) = c.close_and_end().await;
        assert_eq!(code, want, "{what}");
        assert!(ended, "{what}: the socket ends after the closing handshake");
    }
    // The node is unharmed.
    let mut c = open(&node, &[]).await;
    c.connect("bob").await;
}

#[tokio::test]
async fn an_oversized_frame_is_refused_from_its_header_alone() {
    let node = TestNode::with(|o| o.max_frame_bytes = Some(1024)).await;
    let mut c = open(&node, &[]).await;
    c.connect("alice").await;
    // Announce 1 GiB, send nothing more: the close comes at once.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    c.send(&header).await;
    let (code, _) = tokio::time::timeout(Duration::from_secs(5), c.close_and_end())
        .await
        .expect("closed without waiting for the payload");
    assert_eq!(code, 1009);
}

/// The status line a raw upgrade request gets.
async fn status_of(node: &TestNode, request: String) -> String {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(node.running.addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within(tcp.read(&mut buf)).await.unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.lines().next().unwrap_or("").to_string()
}

/// RFC 6455 4.2.1: a handshake whose `Sec-WebSocket-Key` is not 16 bytes in
/// base64, or that has no `Host`, is refused with 400 before any upgrade.
#[tokio::test]
async fn a_handshake_without_a_valid_key_or_host_is_refused_400() {
    let node = TestNode::start().await;
    let addr = node.running.addr;
    let request = |host: bool, key: &str| {
        let host = if host {
            format!("Host: {addr}\r\n")
        } else {
            String::new()
        };
        format!(
            "GET /ws HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: gw.v1.json\r\n\r\n"
        )
    };
    for key in [
        "!!",
        "dGhlIHNhbXBsZSBub25jZQ",
        "dGhlIHNhbXBsZSBub25jZXg=",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let status = status_of(&node, request(true, key)).await;
        assert!(status.starts_with("HTTP/1.1 400"), "key {key:?}: {status}");
    }
    let status = status_of(&node, request(false, "dGhlIHNhbXBsZSBub25jZQ==")).await;
    assert!(status.starts_with("HTTP/1.1 400"), "no Host: {status}");
    let status = status_of(&node, request(true, "dGhlIHNhbXBsZSBub25jZQ==")).await;
    assert!(
        status.starts_with("HTTP/1.1 101"),
        "the RFC's own example key: {status}"
    );
}
