//! Server API calls from tests: raw HTTP/1.1 on loopback.

use std::net::SocketAddr;

use serde_json::Value;

use super::within;

pub const KEY: &str = "api-key-0123456789-abcdef";
pub const KEY2: &str = "api-key-second-0123456789";

/// POST /api/<method> with `key` (None: no Authorization header); returns
/// (status, body as JSON).
pub async fn call(addr: SocketAddr, method: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("API port answers");
    let auth = key
        .map(|k| format!("Authorization: apikey {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    within(s.read_to_end(&mut buf)).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
