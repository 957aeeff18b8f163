//! Test harness: a real node on 127.0.0.1:0 and real WebSocket clients.
#![allow(dead_code)]

pub mod api;
pub mod nats;
pub mod process;
pub mod prometheus;
pub mod raw;

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::config::{Config, Opts};
use gateway::{Running, auth};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789-test-secret";

/// Awaits `f` for at most 15 s, with a clear panic.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(15), f)
        .await
        .expect("timed out after 15 s")
}

pub fn test_opts() -> Opts {
    Opts {
        jwt_secret: Some(SECRET.into()),
        node_id: Some("test-node".into()),
        drain_timeout_ms: Some(3_000),
        drain_spread_ms: Some(100),
        ..Default::default()
    }
}

pub struct TestNode {
    pub running: Running,
}

impl TestNode {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(f: impl FnOnce(&mut Opts)) -> Self {
        init_logs();
        let mut opts = test_opts();
        f(&mut opts);
        let cfg = Config::resolve(opts).expect("valid test config");
        Self {
            running: Running::bind_local(cfg).await.expect("node starts"),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.running.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.running.addr, path)
    }

    /// A token for `sub` granting every room.
    pub fn token(&self, sub: &str) -> String {
        token(sub, &["*"], &["*"])
    }

    /// A connected client for `sub` with every room granted.
    pub async fn client(&self, sub: &str) -> Client {
        let mut c = Client::open(&self.url()).await;
        let r = c.connect(&self.token(sub)).await;
        assert!(r.get("ok").is_some(), "connect failed: {r}");
        c
    }

    /// Checks that the node still serves: two fresh clients chat.
    pub async fn assert_serving(&self) {
        let room = format!("health-{}", rand_suffix());
        let mut a = self.client("health-a").await;
        let mut b = self.client("health-b").await;
        b.subscribe(&[&room]).await;
        let r = a.publish(&room, json!("still here")).await;
        assert!(r["ok"]["offset"].as_u64().is_some(), "{r}");
        let m = b.next_push().await;
        assert_eq!(m["data"], "still here");
    }

    pub async fn shutdown(self) -> gateway::DrainReport {
        self.running.shutdown().await
    }
}

/// Logs of in-process nodes on stderr when `TEST_LOG` is set (e.g. `TEST_LOG=gateway=debug`).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

pub fn rand_suffix() -> u32 {
    rand::random::<u32>()
}

/// An HS256 connection token signed with [`SECRET`].
pub fn token(sub: &str, rooms: &[&str], publish: &[&str]) -> String {
    auth::mint_hs256(
        SECRET.as_bytes(),
        sub,
        rooms.iter().map(|s| s.to_string()).collect(),
        publish.iter().map(|s| s.to_string()).collect(),
        Some(3600),
    )
    .unwrap()
}

/// Signs arbitrary claims with [`SECRET`] (HS256).
pub fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u32,
    /// Pushes read while waiting for a reply.
    pushes: VecDeque<Value>,
}

/// How a connection ended, seen from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Close(u16),
    /// Closed without a close frame.
    Dropped,
}

impl Client {
    pub async fn open(url: &str) -> Self {
        let (ws, _) = within(tokio_tungstenite::connect_async(url)).await.expect("upgrade");
        Self {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
        }
    }

    /// Opens with a custom upgrade request (extra headers such as Origin or
    /// Authorization); a refused upgrade gives its HTTP status (0 when the
    /// server answered none).
    pub async fn try_open(req: tokio_tungstenite::tungstenite::handshake::client::Request) -> Result<Self, u16> {
        match within(tokio_tungstenite::connect_async(req)).await {
            Ok((ws, _)) => Ok(Self {
                ws,
                next_id: 1,
                pushes: VecDeque::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(_) => Err(0),
        }
    }

    pub async fn send_text(&mut self, s: impl Into<String>) {
        self.ws.send(Message::text(s.into())).await.expect("send");
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(v.to_string()).await;
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.ws.send(Message::Binary(Bytes::from(b))).await.expect("send");
    }

    /// The next text frame as JSON. Panics on close.
    pub async fn next_frame(&mut self) -> Value {
        loop {
            match within(self.ws.next()).await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("server sends JSON"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Sends `cmd` with a fresh id and returns the reply with that id; pushes
    /// read meanwhile are kept for [`Client::next_push`].
    pub async fn request(&mut self, mut cmd: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        self.send_json(&cmd).await;
        self.reply(id).await
    }

    pub async fn reply(&mut self, id: u32) -> Value {
        loop {
            let f = self.next_frame().await;
            if f.get("id") == Some(&json!(id)) {
                return f;
            }
            assert!(f.get("id").is_none(), "reply for another id: {f}");
            self.pushes.push_back(f);
        }
    }

    /// The next push (a frame without id).
    pub async fn next_push(&mut self) -> Value {
        if let Some(p) = self.pushes.pop_front() {
            return p;
        }
        loop {
            let f = self.next_frame().await;
            if f.get("id").is_none() {
                return f;
            }
        }
    }

    /// Whether a push arrives within `wait`.
    pub async fn push_within(&mut self, wait: Duration) -> Option<Value> {
        if let Some(p) = self.pushes.pop_front() {
            return Some(p);
        }
        tokio::time::timeout(wait, self.next_push()).await.ok()
    }

    pub async fn connect(&mut self, token: &str) -> Value {
        self.request(json!({"op":"connect","token":token})).await
    }

    pub async fn subscribe(&mut self, rooms: &[&str]) -> Value {
        let entries: Vec<Value> = rooms.iter().map(|r| json!({"room": r})).collect();
        let r = self.request(json!({"op":"subscribe","rooms":entries})).await;
        assert!(r.get("ok").is_some(), "subscribe failed: {r}");
        r
    }

    pub async fn publish(&mut self, room: &str, data: Value) -> Value {
        self.request(json!({"op":"publish","room":room,"data":data})).await
    }

    /// Reads until the connection ends; returns the close code.
    pub async fn closed(&mut self) -> Ended {
        loop {
            match within(self.ws.next()).await {
                // Like a browser, answer the close at once (the reply is
                // written on the next flush).
                Some(Ok(Message::Close(Some(f)))) => {
                    let _ = self.ws.flush().await;
                    return Ended::Close(u16::from(f.code));
                }
                Some(Ok(Message::Close(None))) => {
                    let _ = self.ws.flush().await;
                    return Ended::Close(u16::from(CloseCode::Status));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ended::Dropped,
            }
        }
    }
}

/// A plain HTTP GET on loopback: (status, body), or `None` if the server
/// does not answer (it may be starting or gone). Bounded by a 5 s timeout.
pub async fn try_http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut s = TcpStream::connect(host).await.ok()?;
    // HTTP/1.0: the answer is never chunked (Prometheus chunks 1.1 answers).
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Some((status, body))
}

/// Polls `url` every 50 ms (at most 100 times) until it answers `status`;
/// returns the last status seen (`None`: no answer).
pub async fn wait_for_status(url: &str, status: u16) -> Option<u16> {
    let mut code = None;
    for _ in 0..100 {
        code = try_http_get(url).await.map(|(c, _)| c);
        if code == Some(status) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    code
}

/// The value of the unlabelled series `name` in a `/metrics` text (NaN
/// when it is not there).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// [`try_http_get`] that must succeed.
pub async fn http_get(url: &str) -> (u16, String) {
    try_http_get(url)
        .await
        .unwrap_or_else(|| panic!("GET {url} got no answer"))
}

/// A plain HTTP GET on loopback; returns the status code.
pub async fn http_status(url: &str) -> u16 {
    http_get(url).await.0
}

/// An upgrade refused with an HTTP status (admission control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    /// The `Retry-After` header, in seconds.
    pub retry_after: Option<u64>,
}

/// Upgrades `url`, with `x_forwarded_for` as that header when given; an HTTP
/// refusal comes back as [`Refused`], any other failure panics.
pub async fn try_open(url: &str, x_forwarded_for: Option<&str>) -> Result<Client, Refused> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    if let Some(xff) = x_forwarded_for {
        req.headers_mut().insert("x-forwarded-for", xff.parse().unwrap());
    }
    match within(tokio_tungstenite::connect_async(req)).await {
        Ok((ws, _)) => Ok(Client::from_ws(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(refused(&resp)),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// The status and `Retry-After` of a refused upgrade.
pub fn refused<B>(resp: &tokio_tungstenite::tungstenite::http::Response<B>) -> Refused {
    Refused {
        status: resp.status().as_u16(),
        retry_after: resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
    }
}

impl Client {
    pub fn from_ws(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        Self {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
        }
    }
}
