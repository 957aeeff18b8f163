//! One load-generator connection: TCP, WebSocket upgrade, authentication, and
//! the target's protocol (`gw.v1.json`, `gw.v1.proto` or NATS text over
//! WebSocket).
//!
//! Owns one socket and its buffers; the scenario owns what the messages mean.
//! The hot path is split in two so it stays cancel-safe and allocation-free:
//! [`Conn::fill`] is a single `read` into the frame buffer (safe to race in
//! `select!`), [`Conn::drain`] parses everything buffered synchronously and
//! hands each application message to a callback as a borrowed slice. Control
//! traffic (WebSocket ping, NATS `PING`) is answered by queueing bytes that the
//! caller writes with [`Conn::flush`] or [`Conn::try_flush`].

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};

use proto::Message as _;
use proto::client as pb;

use crate::nats::{self, NatsParser};
use crate::ws::{self, FrameReader, MaskKeys};

/// Which system a connection talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Target {
    /// The gateway, sub-protocol `gw.v1.json`.
    #[value(name = "gw.v1.json", alias = "gw")]
    #[serde(rename = "gw.v1.json")]
    GwJson,
    /// The gateway, sub-protocol `gw.v1.proto` (binary protobuf frames).
    #[value(name = "gw.v1.proto")]
    #[serde(rename = "gw.v1.proto")]
    GwProto,
    /// nats-server's WebSocket listener, NATS text protocol.
    #[value(name = "nats-ws", alias = "nats")]
    #[serde(rename = "nats-ws")]
    NatsWs,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::GwJson => "gw.v1.json",
            Target::GwProto => "gw.v1.proto",
            Target::NatsWs => "nats-ws",
        }
    }

    /// The gateway, in either sub-protocol.
    pub fn is_gateway(self) -> bool {
        matches!(self, Target::GwJson | Target::GwProto)
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub target: Target,
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// Offer `permessage-deflate` (and require it).
    pub deflate: bool,
}

/// The offer browsers send.
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

thread_local! {
    /// Bytes read from every connection's socket on this thread (the whole
    /// generator is one thread): the bytes on the wire, headers included.
    static WIRE_BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Bytes read from sockets so far by this thread's connections.
pub fn wire_bytes() -> u64 {
    WIRE_BYTES.with(Cell::get)
}

thread_local! {
    /// The inflater of this thread's connections, shared: reset per message,
    /// as every server here answers with `server_no_context_takeover` (no
    /// message refers to an earlier one), so no connection's state matters to
    /// the next message. One per connection cost a 32 KiB window and its
    /// state each, cold in the cache at every delivery once a few hundred
    /// connections take turns.
    static DECOMPRESS: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// A compressed message's output buffer (per connection, made by the first
/// compressed message); the inflater is the thread's [`DECOMPRESS`].
struct Inflater {
    out: Vec<u8>,
}

impl Inflater {
    fn inflate(&mut self, data: &[u8]) -> Result<&[u8]> {
        DECOMPRESS.with(|d| self.inflate_with(&mut d.borrow_mut(), data))?;
        Ok(&self.out)
    }

    fn inflate_with(&mut self, d: &mut Decompress, data: &[u8]) -> Result<()> {
        d.reset(false);
        self.out.clear();
        for input in [data, &[0, 0, 0xff, 0xff][..]] {
            let start = d.total_in();
            loop {
                let used = (d.total_in() - start) as usize;
                if used == input.len() && self.out.len() < self.out.capacity() {
                    break;
                }
                if self.out.len() == self.out.capacity() {
                    self.out.reserve(self.out.capacity().max(4096));
                }
                let before = d.total_out();
                d.decompress_vec(&input[used..], &mut self.out, FlushDecompress::Sync)
                    .context("inflating a compressed message")?;
                if d.total_out() == before && self.out.len() < self.out.capacity() && used == input.len() {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl Endpoint {
    /// Parses `ws://HOST:PORT[/PATH]`. Only loopback addresses are accepted:
    /// the load generator never sends load off the machine.
    pub fn parse(target: Target, url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .with_context(|| format!("{url}: only ws:// URLs"))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = host
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}"))?
            .find(|a| a.is_ipv4())
            .with_context(|| format!("{host}: no IPv4 address"))?;
        if !addr.ip().is_loopback() {
            bail!("{url}: the load generator only targets 127.0.0.0/8");
        }
        Ok(Self {
            target,
            addr,
            host: host.to_string(),
            path: path.to_string(),
            deflate: false,
        })
    }
}

/// Why a connection failed or ended; grouped by [`ConnError::kind`] in reports.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("TCP connect failed")]
    Connect(#[source] io::Error),
    #[error("WebSocket upgrade answered HTTP {0}")]
    Upgrade(u16),
    #[error("server refused: {0}")]
    Refused(String),
    #[error("server closed the WebSocket with code {0}")]
    Closed(u16),
    #[error("server closed the TCP connection")]
    Eof,
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error("socket error")]
    Io(#[from] io::Error),
    #[error("protocol error")]
    Protocol(#[source] anyhow::Error),
}

impl ConnError {
    /// A short stable label for counting refusals by kind.
    pub fn kind(&self) -> String {
        match self {
            ConnError::Connect(e) => format!("tcp_connect:{:?}", e.kind()),
            ConnError::Upgrade(s) => format!("http_{s}"),
            ConnError::Refused(code) => format!("refused:{code}"),
            ConnError::Closed(c) => format!("close_{c}"),
            ConnError::Eof => "eof".into(),
            ConnError::Timeout(what) => format!("timeout:{what}"),
            ConnError::Io(e) => format!("io:{:?}", e.kind()),
            ConnError::Protocol(_) => "protocol".into(),
        }
    }
}

/// One application-level message.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A gateway frame (reply or push), or a NATS `MSG` payload.
    Data(&'a [u8]),
    /// NATS `PONG` (the answer to our `PING`).
    Pong,
    /// NATS `INFO`.
    Info,
    /// NATS `-ERR` text.
    Error(&'a [u8]),
}

/// Options for opening a connection.
#[derive(Clone, Debug)]
pub struct OpenOpts {
    /// Local source address (for more than ~28K connections).
    pub source: Option<IpAddr>,
    /// Token for the gateway's `connect` command.
    pub token: Option<String>,
    /// Initial read buffer size; it grows for larger frames.
    pub read_buf: usize,
    pub timeout: Duration,
    /// Skip authentication (calibration server only).
    pub raw: bool,
}

pub struct Conn {
    stream: TcpStream,
    reader: FrameReader,
    target: Target,
    nats: NatsParser,
    /// Reassembly of a fragmented gateway message (rare).
    frag: Vec<u8>,
    in_frag: bool,
    /// Masked bytes waiting to be written.
    out: Vec<u8>,
    /// NATS commands not yet wrapped in a frame.
    nats_cmds: Vec<u8>,
    /// Gateway command being built.
    scratch: Vec<u8>,
    keys: MaskKeys,
    next_id: u32,
    closed: Option<u16>,
    /// Made by the first compressed message.
    inflater: Option<Box<Inflater>>,
    /// The fragmented message being reassembled is compressed.
    frag_compressed: bool,
}

impl Conn {
    /// TCP connect, upgrade, and authenticate (gateway `connect`, or NATS
    /// `INFO`/`CONNECT`/`PING`-`PONG`).
    pub async fn open(ep: &Endpoint, opts: &OpenOpts) -> Result<Conn, ConnError> {
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let socket = TcpSocket::new_v4().map_err(ConnError::Connect)?;
        if let Some(src) = opts.source {
            socket.bind(SocketAddr::new(src, 0)).map_err(ConnError::Connect)?;
        }
        let stream = tokio::time::timeout_at(deadline, socket.connect(ep.addr))
            .await
            .map_err(|_| ConnError::Timeout("tcp_connect"))?
            .map_err(ConnError::Connect)?;
        stream.set_nodelay(true)?;
        let seed = rand::random::<u128>();
        let mut conn = tokio::time::timeout_at(deadline, upgrade(stream, ep, opts.read_buf, seed))
            .await
            .map_err(|_| ConnError::Timeout("upgrade"))??;
        if !opts.raw {
            tokio::time::timeout_at(deadline, conn.authenticate(opts.token.as_deref()))
                .await
                .map_err(|_| ConnError::Timeout("auth"))??;
        }
        Ok(conn)
    }

    async fn authenticate(&mut self, token: Option<&str>) -> Result<(), ConnError> {
        match self.target {
            Target::GwJson => {
                let id = self.take_id();
                let frame = serde_json::json!({"id": id, "op": "connect", "token": token.unwrap_or("")});
                self.send_json(&frame.to_string());
                self.flush().await?;
                self.wait_reply(id).await.map(drop)
            }
            Target::GwProto => {
                let id = self.take_id();
                let token = token.unwrap_or("").to_string();
                self.send_proto(id, pb::command::Op::Connect(pb::Connect { token }));
                self.flush().await?;
                self.wait_reply(id).await.map(drop)
            }
            Target::NatsWs => {
                // INFO first, then CONNECT + PING; PONG means CONNECT was accepted.
                self.wait_nats(|i| matches!(i, Incoming::Info)).await?;
                nats::connect(&mut self.nats_cmds);
                nats::ping(&mut self.nats_cmds);
                self.flush().await?;
                self.wait_nats(|i| matches!(i, Incoming::Pong)).await
            }
        }
    }

    /// Subscribes to `rooms` in one frame (gateway) or one batch of `SUB`s
    /// followed by `PING` (NATS), and waits until the server has applied it.
    /// Returns how many rooms the server refused.
    pub async fn subscribe(&mut self, rooms: &[String]) -> Result<usize, ConnError> {
        match self.target {
            Target::GwJson => {
                let id = self.take_id();
                let mut s = String::with_capacity(48 + rooms.len() * 20);
                s.push_str(&format!(r#"{{"id":{id},"op":"subscribe","rooms":["#));
                for (i, r) in rooms.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    s.push_str(r#"{"room":""#);
                    s.push_str(r);
                    s.push_str(r#""}"#);
                }
                s.push_str("]}");
                self.send_json(&s);
                self.flush().await?;
                let reply = self.wait_reply(id).await?;
                let refused = reply
                    .get("rooms")
                    .and_then(|r| r.as_array())
                    .map(|a| a.iter().filter(|e| e.get("error").is_some()).count())
                    .unwrap_or(rooms.len());
                Ok(refused)
            }
            Target::GwProto => {
                let id = self.take_id();
                let entries = rooms
                    .iter()
                    .map(|r| pb::RoomEntry {
                        room: r.clone(),
                        ..Default::default()
                    })
                    .collect();
                self.send_proto(id, pb::command::Op::Subscribe(pb::Subscribe { rooms: entries }));
                self.flush().await?;
                let reply = self.wait_reply(id).await?;
                Ok(reply["refused"].as_u64().unwrap_or(rooms.len() as u64) as usize)
            }
            Target::NatsWs => {
                for (i, r) in rooms.iter().enumerate() {
                    nats::sub(&mut self.nats_cmds, r, i as u64 + 1);
                }
                nats::ping(&mut self.nats_cmds);
                self.flush().await?;
                self.wait_nats(|i| matches!(i, Incoming::Pong)).await?;
                Ok(0)
            }
        }
    }

    /// Subscribes (`gw.v1.json` only) to `rooms` in one frame, each with its
    /// `since` (the last offset the client saw) when given, and waits for the
    /// reply. Every other frame read meanwhile, including the catch-up that
    /// follows the reply in the same read, goes to `on_push`. Returns, per
    /// room in order, `Some((offset, recovered))` from the reply (`recovered`
    /// is present only for a room asked with `since`), or `None` where the
    /// room was refused.
    pub async fn subscribe_since(
        &mut self,
        rooms: &[(String, Option<u64>)],
        on_push: &mut impl FnMut(&[u8]),
    ) -> Result<Vec<Option<(u64, Option<bool>)>>, ConnError> {
        if self.target != Target::GwJson {
            return Err(ConnError::Protocol(anyhow::anyhow!(
                "subscribe_since speaks gw.v1.json only"
            )));
        }
        let id = self.take_id();
        let mut s = String::with_capacity(48 + rooms.len() * 32);
        s.push_str(&format!(r#"{{"id":{id},"op":"subscribe","rooms":["#));
        for (i, (room, since)) in rooms.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            match since {
                Some(n) => s.push_str(&format!(r#"{{"room":"{room}","since":{n}}}"#)),
                None => s.push_str(&format!(r#"{{"room":"{room}"}}"#)),
            }
        }
        s.push_str("]}");
        self.send_json(&s);
        self.flush().await?;
        let prefix = format!(r#"{{"id":{id},"#);
        loop {
            let mut found: Option<Result<serde_json::Value, ConnError>> = None;
            let drained = self.drain(&mut |inc| {
                let Incoming::Data(bytes) = inc else { return };
                if found.is_none() && bytes.starts_with(prefix.as_bytes()) {
                    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
                    found = Some(match v.get("ok") {
                        Some(ok) => Ok(ok.clone()),
                        None => Err(ConnError::Refused(
                            v["error"]["code"].as_str().unwrap_or("malformed_reply").to_string(),
                        )),
                    });
                } else {
                    on_push(bytes);
                }
            });
            if let Some(r) = found {
                let ok = r?;
                drained?;
                let entries = ok["rooms"].as_array().cloned().unwrap_or_default();
                return Ok(entries
                    .iter()
                    .map(|e| {
                        e.get("offset")
                            .and_then(|o| o.as_u64())
                            .map(|o| (o, e.get("recovered").and_then(|r| r.as_bool())))
                    })
                    .collect());
            }
            drained?;
            if self.wants_flush() {
                self.flush().await?;
            }
            self.fill().await?;
        }
    }

    /// Queues one publish of `payload` to `room`; written by the next flush.
    /// For the gateway `payload` becomes a JSON string (on `gw.v1.proto`, the
    /// JSON text of one), so it must not need escaping (stamps and padding
    /// never do).
    pub fn queue_publish(&mut self, room: &str, payload: &[u8]) {
        match self.target {
            Target::GwJson => {
                let id = self.take_id();
                self.scratch.clear();
                self.scratch.extend_from_slice(br#"{"id":"#);
                nats::push_number(&mut self.scratch, u64::from(id));
                self.scratch.extend_from_slice(br#","op":"publish","room":""#);
                self.scratch.extend_from_slice(room.as_bytes());
                self.scratch.extend_from_slice(br#"","data":""#);
                self.scratch.extend_from_slice(payload);
                self.scratch.extend_from_slice(br#""}"#);
                ws::encode_frame(&mut self.out, ws::OP_TEXT, &self.scratch, &mut self.keys);
            }
            Target::GwProto => {
                let id = self.take_id();
                let mut data = Vec::with_capacity(payload.len() + 2);
                data.push(b'"');
                data.extend_from_slice(payload);
                data.push(b'"');
                let op = pb::command::Op::Publish(pb::Publish {
                    room: room.to_string(),
                    data: data.into(),
                    key: None,
                });
                self.send_proto(id, op);
            }
            Target::NatsWs => nats::publish(&mut self.nats_cmds, room, payload),
        }
    }

    /// Reads once from the socket into the frame buffer. Cancel-safe.
    pub async fn fill(&mut self) -> Result<(), ConnError> {
        if let Some(code) = self.closed {
            return Err(ConnError::Closed(code));
        }
        let n = self.stream.read(self.reader.spare()).await?;
        if n == 0 {
            return Err(ConnError::Eof);
        }
        WIRE_BYTES.with(|w| w.set(w.get() + n as u64));
        self.reader.filled(n);
        Ok(())
    }

    /// Reads what the kernel already holds, without waiting: `Ok(true)` if
    /// bytes were read, `Ok(false)` if the socket had none.
    pub fn try_fill(&mut self) -> Result<bool, ConnError> {
        if let Some(code) = self.closed {
            return Err(ConnError::Closed(code));
        }
        match self.stream.try_read(self.reader.spare()) {
            Ok(0) => Err(ConnError::Eof),
            Ok(n) => {
                WIRE_BYTES.with(|w| w.set(w.get() + n as u64));
                self.reader.filled(n);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Parses every buffered frame; `on` gets each application message.
    pub fn drain(&mut self, on: &mut impl FnMut(Incoming<'_>)) -> Result<(), ConnError> {
        let Conn {
            reader,
            target,
            nats,
            frag,
            in_frag,
            out,
            nats_cmds,
            keys,
            closed,
            inflater,
            frag_compressed,
            ..
        } = self;
        let res = reader.frames(|f| {
            match f.opcode {
                ws::OP_PING => ws::encode_frame(out, ws::OP_PONG, f.payload, keys),
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let code = match f.payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 1005,
                    };
                    if closed.is_none() {
                        ws::encode_frame(out, ws::OP_CLOSE, &f.payload[..f.payload.len().min(2)], keys);
                    }
                    *closed = Some(code);
                }
                ws::OP_TEXT | ws::OP_BINARY | ws::OP_CONT => {
                    let compressed = f.compressed || (f.opcode == ws::OP_CONT && *frag_compressed);
                    // A whole message, once it is complete (NATS frames are a
                    // byte stream: fed as they come unless compressed).
                    let message: Option<&[u8]> = if compressed {
                        if f.opcode != ws::OP_CONT {
                            frag.clear();
                            *frag_compressed = true;
                        }
                        frag.extend_from_slice(f.payload);
                        *in_frag = !f.fin;
                        if f.fin {
                            *frag_compressed = false;
                            let inf = inflater.get_or_insert_with(|| {
                                Box::new(Inflater {
                                    out: Vec::with_capacity(4096),
                                })
                            });
                            Some(inf.inflate(frag)?)
                        } else {
                            None
                        }
                    } else if *target == Target::NatsWs || (f.fin && !*in_frag) {
                        Some(f.payload)
                    } else {
                        if f.opcode != ws::OP_CONT {
                            frag.clear();
                        }
                        frag.extend_from_slice(f.payload);
                        *in_frag = !f.fin;
                        f.fin.then_some(&frag[..])
                    };
                    if let Some(m) = message {
                        match target {
                            Target::NatsWs => nats.feed(m, &mut |e| match e {
                                nats::Event::Msg { payload, .. } => on(Incoming::Data(payload)),
                                nats::Event::Ping => nats::pong(nats_cmds),
                                nats::Event::Pong => on(Incoming::Pong),
                                nats::Event::Info(_) => on(Incoming::Info),
                                nats::Event::Err(text) => on(Incoming::Error(text)),
                                nats::Event::Ok => {}
                            })?,
                            Target::GwJson | Target::GwProto => on(Incoming::Data(m)),
                        }
                    }
                }
                op => anyhow::bail!("unknown WebSocket opcode {op}"),
            }
            Ok(())
        });
        res.map_err(ConnError::Protocol)?;
        match self.closed {
            Some(code) => Err(ConnError::Closed(code)),
            None => Ok(()),
        }
    }

    /// Whether bytes are waiting to be written.
    pub fn wants_flush(&self) -> bool {
        !self.out.is_empty() || !self.nats_cmds.is_empty()
    }

    fn frame_nats(&mut self) {
        if !self.nats_cmds.is_empty() {
            ws::encode_frame(&mut self.out, ws::OP_BINARY, &self.nats_cmds, &mut self.keys);
            self.nats_cmds.clear();
        }
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        self.frame_nats();
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Writes what the socket takes without waiting; true when all is written.
    pub fn try_flush(&mut self) -> Result<bool, ConnError> {
        self.frame_nats();
        while !self.out.is_empty() {
            match self.stream.try_write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Waits until the socket is readable, or writable while bytes are
    /// queued; then reads what is there and writes what fits. Cancel-safe.
    /// For connections that write a lot (publishers): a write never blocks
    /// reading, so a server that stops reading cannot deadlock us.
    pub async fn pump(&mut self) -> Result<(), ConnError> {
        if !self.wants_flush() {
            return self.fill().await;
        }
        if let Some(code) = self.closed {
            return Err(ConnError::Closed(code));
        }
        let ready = self.stream.ready(Interest::READABLE | Interest::WRITABLE).await?;
        if ready.is_writable() {
            self.try_flush()?;
        }
        if ready.is_readable() {
            match self.stream.try_read(self.reader.spare()) {
                Ok(0) => return Err(ConnError::Eof),
                Ok(n) => self.reader.filled(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Bytes queued but not yet written.
    pub fn queued(&self) -> usize {
        self.out.len() + self.nats_cmds.len()
    }

    fn take_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    /// Queues one text frame (a command written by the caller).
    pub fn queue_text(&mut self, text: &str) {
        self.send_json(text);
    }

    fn send_json(&mut self, text: &str) {
        ws::encode_frame(&mut self.out, ws::OP_TEXT, text.as_bytes(), &mut self.keys);
    }

    fn send_proto(&mut self, id: u32, op: pb::command::Op) {
        self.scratch.clear();
        let cmd = pb::Command {
            id: Some(id),
            op: Some(op),
        };
        cmd.encode(&mut self.scratch).expect("a Vec grows");
        ws::encode_frame(&mut self.out, ws::OP_BINARY, &self.scratch, &mut self.keys);
    }

    /// Reads until the reply with `id` (bytes already buffered first); returns its `ok` value or the error.
    /// Setup path only: replies are parsed as JSON here, never in the hot path.
    async fn wait_reply(&mut self, id: u32) -> Result<serde_json::Value, ConnError> {
        loop {
            let mut found: Option<Result<serde_json::Value, ConnError>> = None;
            let proto = self.target == Target::GwProto;
            let drained = self.drain(&mut |inc| {
                let Incoming::Data(bytes) = inc else { return };
                if found.is_some() {
                    return;
                }
                if proto {
                    found = proto_reply(bytes, id);
                    return;
                }
                if !bytes.starts_with(b"{") {
                    return;
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
                    return;
                };
                if v.get("id").and_then(|x| x.as_u64()) != Some(u64::from(id)) {
                    return;
                }
                found = Some(match (v.get("ok"), v.get("error")) {
                    (Some(ok), _) => Ok(ok.clone()),
                    (None, Some(err)) => Err(ConnError::Refused(
                        err.get("code")
                            .and_then(|c| c.as_str())
                            .unwrap_or("unknown")
                            .to_string(),
                    )),
                    _ => Err(ConnError::Refused("malformed_reply".into())),
                });
            });
            // A refusal usually arrives with the close frame: report the refusal.
            if let Some(r) = found {
                return r;
            }
            drained?;
            if self.wants_flush() {
                self.flush().await?;
            }
            self.fill().await?;
        }
    }

    /// Reads until `want` matches a NATS event; `-ERR` fails.
    async fn wait_nats(&mut self, want: impl Fn(&Incoming<'_>) -> bool) -> Result<(), ConnError> {
        loop {
            let mut done = false;
            let mut err = None;
            let drained = self.drain(&mut |inc| {
                if let Incoming::Error(text) = inc {
                    err.get_or_insert_with(|| String::from_utf8_lossy(text).trim_matches('\'').to_string());
                } else if want(&inc) {
                    done = true;
                }
            });
            if let Some(e) = err {
                return Err(ConnError::Refused(e));
            }
            drained?;
            if self.wants_flush() {
                self.flush().await?;
            }
            if done {
                return Ok(());
            }
            self.fill().await?;
        }
    }
}

async fn upgrade(mut stream: TcpStream, ep: &Endpoint, read_buf: usize, seed: u128) -> Result<Conn, ConnError> {
    let protocol = match ep.target {
        Target::GwJson => Some("gw.v1.json"),
        Target::GwProto => Some("gw.v1.proto"),
        Target::NatsWs => None,
    };
    let offer = ep.deflate.then_some(DEFLATE_OFFER);
    stream
        .write_all(&ws::handshake_request(&ep.host, &ep.path, protocol, offer, seed))
        .await?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let parsed = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ConnError::Eof);
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(h) = ws::parse_response_head(&head).map_err(ConnError::Protocol)? {
            break h;
        }
    };
    if parsed.status != 101 {
        return Err(ConnError::Upgrade(parsed.status));
    }
    WIRE_BYTES.with(|w| w.set(w.get() + head.len() as u64));
    let mut reader = FrameReader::with_leftover(read_buf, &head[parsed.len..]);
    if ep.deflate {
        let answer = parsed.extensions.as_deref().unwrap_or("");
        if !answer.starts_with("permessage-deflate") || !answer.contains("server_no_context_takeover") {
            return Err(ConnError::Protocol(anyhow::anyhow!(
                "compression offered, answered with {answer:?} (need permessage-deflate with server_no_context_takeover)"
            )));
        }
        reader.rsv1_ok = true;
    }
    Ok(Conn {
        stream,
        reader,
        target: ep.target,
        nats: NatsParser::default(),
        frag: Vec::new(),
        in_frag: false,
        out: Vec::new(),
        nats_cmds: Vec::new(),
        scratch: Vec::new(),
        keys: MaskKeys::new(seed as u64),
        next_id: 0,
        closed: None,
        inflater: None,
        frag_compressed: false,
    })
}

/// Picks source addresses round-robin over 127.0.0.1..=127.0.0.N, so more
/// than one ephemeral port range (~28K) of connections can reach one server.
pub fn source_addr(index: usize, spread: usize) -> Option<IpAddr> {
    (spread > 1).then(|| IpAddr::from([127, 0, 0, 1 + (index % spread.min(254)) as u8]))
}

/// What a gateway frame says about a command (see [`reply_kind`]).
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyKind {
    Ack,
    Refused(String),
    Other,
}

/// The error code of a JSON error frame.
fn json_error_code(frame: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(frame)
        .ok()
        .and_then(|v| v.get("error")?.get("code")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The reply with `id` in a `gw.v1.proto` frame, as the JSON `ok` value the
/// setup path reads (a subscribe reply becomes `{"refused": N}`).
fn proto_reply(frame: &[u8], id: u32) -> Option<Result<serde_json::Value, ConnError>> {
    use pb::server_frame::Body;
    let f = pb::ServerFrame::decode(frame).ok()?;
    if f.id != Some(id) {
        return None;
    }
    Some(match f.body {
        Some(Body::Error(e)) => Err(ConnError::Refused(e.code)),
        Some(Body::SubscribeOk(ok)) => {
            let refused = ok.rooms.iter().filter(|r| r.error.is_some()).count();
            Ok(serde_json::json!({ "refused": refused }))
        }
        Some(_) => Ok(serde_json::json!({})),
        None => Err(ConnError::Refused("malformed_reply".into())),
    })
}

/// What a gateway frame says about a command: acknowledged, refused
/// (with the error code), or neither (a push). Publishers' path: one
/// decode per reply, never per delivery.
pub fn reply_kind(target: Target, frame: &[u8]) -> ReplyKind {
    match target {
        Target::GwProto => match pb::ServerFrame::decode(frame) {
            Ok(f) if f.id.is_some() => match f.body {
                Some(pb::server_frame::Body::Error(e)) => ReplyKind::Refused(e.code),
                _ => ReplyKind::Ack,
            },
            Ok(pb::ServerFrame {
                body: Some(pb::server_frame::Body::Error(e)),
                ..
            }) => ReplyKind::Refused(e.code),
            _ => ReplyKind::Other,
        },
        _ => {
            if memchr::memmem::find(frame, br#""error""#).is_some() {
                ReplyKind::Refused(json_error_code(frame))
            } else if frame.starts_with(br#"{"id""#) || memchr::memmem::find(frame, br#""ok""#).is_some() {
                ReplyKind::Ack
            } else {
                ReplyKind::Other
            }
        }
    }
}

#[cfg(test)]
mod reply_tests {
    use super::*;
    use pb::server_frame::Body;

    fn frame(id: Option<u32>, body: Body) -> Vec<u8> {
        pb::ServerFrame { id, body: Some(body) }.encode_to_vec()
    }

    #[test]
    fn replies_are_told_apart_in_both_gateway_protocols() {
        let ack = frame(Some(3), Body::PublishOk(pb::PublishOk { offset: 9 }));
        let nack = frame(
            Some(4),
            Body::Error(pb::Error {
                code: "rate_limited".into(),
                message: String::new(),
                retry_after_ms: Some(5),
            }),
        );
        let push = frame(
            None,
            Body::Message(pb::Message {
                room: "r".into(),
                offset: 1,
                ts: 1,
                from: "a".into(),
                data: b"\"x\"".to_vec().into(),
            }),
        );
        assert_eq!(reply_kind(Target::GwProto, &ack), ReplyKind::Ack);
        assert_eq!(
            reply_kind(Target::GwProto, &nack),
            ReplyKind::Refused("rate_limited".into())
        );
        assert_eq!(reply_kind(Target::GwProto, &push), ReplyKind::Other);
        assert_eq!(
            reply_kind(Target::GwJson, br#"{"id":3,"ok":{"offset":9}}"#),
            ReplyKind::Ack
        );
        assert_eq!(
            reply_kind(Target::GwJson, br#"{"id":4,"error":{"code":"forbidden","message":""}}"#),
            ReplyKind::Refused("forbidden".into())
        );
        assert_eq!(
            reply_kind(Target::GwJson, br#"{"op":"message","data":"x"}"#),
            ReplyKind::Other
        );
    }

    #[test]
    fn a_proto_subscribe_reply_counts_refused_rooms() {
        let ok = frame(
            Some(2),
            Body::SubscribeOk(pb::SubscribeOk {
                rooms: vec![
                    pb::SubscribeResult {
                        room: "a".into(),
                        ..Default::default()
                    },
                    pb::SubscribeResult {
                        room: "b".into(),
                        error: Some(pb::Error::default()),
                        ..Default::default()
                    },
                ],
            }),
        );
        let v = proto_reply(&ok, 2).unwrap().unwrap();
        assert_eq!(v["refused"], 1);
        assert!(proto_reply(&ok, 7).is_none(), "another id");
    }
}
