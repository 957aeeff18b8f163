//! A raw WebSocket client (RFC 6455) over TCP: it writes exactly the bytes a
//! test needs (masked frames with any first byte, pipelined data) and reads
//! server frames whole, with their first byte (FIN, RSV bits, opcode).

use std::fmt::Display;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::within;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;
/// FIN: the last frame of a message.
pub const FIN: u8 = 0x80;
/// RSV1: a compressed message (RFC 7692 `permessage-deflate`).
pub const RSV1: u8 = 0x40;

/// A masked client frame; `first` is its first byte (FIN, RSV bits, opcode).
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0xa1, 0xb2, 0xc3, 0xd4];
    let mut out = vec![first];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A server frame as read back: (first byte, payload).
pub type ServerFrame = (u8, Vec<u8>);

pub struct Raw {
    pub tcp: TcpStream,
    buf: Vec<u8>,
    /// The upgrade response's head, header names lower-cased.
    pub head: String,
}

impl Raw {
    /// Upgrades by hand, with `headers` (whole lines, each ending in CRLF)
    /// added to the request and `pipelined` written in the same packet.
    pub async fn open(addr: impl Display, headers: &str, pipelined: &[u8]) -> Self {
        let mut tcp = TcpStream::connect(addr.to_string()).await.unwrap();
        let mut req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        )
        .into_bytes();
        req.extend_from_slice(pipelined);
        tcp.write_all(&req).await.unwrap();
        let mut raw = Self {
            tcp,
            buf: Vec::new(),
            head: String::new(),
        };
        let end = loop {
            if let Some(at) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(raw.fill().await > 0, "no upgrade response");
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        raw.head = head
            .lines()
            .map(|l| match l.split_once(':') {
                Some((n, v)) => format!("{}:{v}", n.to_ascii_lowercase()),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        raw.buf.drain(..end);
        raw
    }

    /// The value of the response header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16384];
        let n = within(self.tcp.read(&mut chunk)).await.unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// The next server frame; `None` once the server closed the socket.
    pub async fn next(&mut self) -> Option<ServerFrame> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if at > 0 && self.buf.len() >= at + len {
                    let f = (self.buf[0], self.buf[at..at + len].to_vec());
                    self.buf.drain(..at + len);
                    return Some(f);
                }
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// The next text frame, skipping pings: its first byte and payload.
    /// The server neither fragments nor sets RSV2 or RSV3.
    pub async fn next_text(&mut self) -> ServerFrame {
        loop {
            let (first, payload) = self.next().await.expect("a frame");
            assert_eq!(first & FIN, FIN, "the server does not fragment");
            assert_eq!(first & 0x30, 0, "RSV2 and RSV3 stay clear");
            match first & 0x0f {
                OP_TEXT => return (first, payload),
                OP_PING => continue,
                other => panic!("unexpected opcode {other}: {payload:?}"),
            }
        }
    }

    /// Reads to the close frame (never compressed) and returns its code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.next().await {
                Some((first, p)) if first & 0x0f == OP_CLOSE => {
                    assert_eq!(first & RSV1, 0, "control frames are never compressed");
                    return u16::from_be_bytes([p[0], p[1]]);
                }
                Some(_) => continue,
                None => panic!("socket ended without a close frame"),
            }
        }
    }
}
