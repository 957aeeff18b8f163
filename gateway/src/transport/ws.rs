//! WebSocket framing (RFC 6455), server side, over the two halves of a byte
//! stream.
//!
//! Owns the wire format of frames in both directions. Does not own the
//! handshake (`server`) or what a message means (`conn`).
//!
//! Why not a general-purpose WebSocket stream: memory per idle connection and
//! copies per delivery.
//! - [`Reader`] keeps no buffer while idle. It reads into a chunk on the
//!   stack and keeps only the bytes of an incomplete frame; a quiet
//!   connection holds an empty `Vec`.
//! - A server frame is encoded once ([`Frame`]: header and payload in one
//!   `Bytes`), shared by reference count by every outbox it is queued in, and
//!   written with one vectored write per batch ([`write_all`]): nothing is
//!   copied per member.
//!
//! The reader enforces the protocol on what clients send: frames must be
//! masked, no reserved bits but RSV1 on the first frame of a compressed
//! message when `permessage-deflate` was negotiated ([`super::deflate`]:
//! inflated within the size limit), control frames
//! unfragmented and at most 125 bytes, continuation only inside a fragmented
//! message, text valid UTF-8, valid close codes, and a message size limit that
//! is checked from the header, before the payload is read.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::deflate::{self, Deflate, InflateError};

/// Opcodes (RFC 6455 section 5.2).
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// RSV1: the message is compressed (RFC 7692 section 6).
const RSV1: u8 = 0x40;

/// Largest payload of a control frame.
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Bytes read per call when no larger frame is known to be coming.
const READ_CHUNK: usize = 4096;
/// Most frames handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// One encoded server frame (header and payload), shared by reference count
/// between a room's log and every outbox it is queued in.
#[derive(Debug, Clone)]
pub struct Frame {
    wire: Bytes,
    /// Header length: the payload is `wire[header..]`. Zero once a write
    /// ended inside the frame and `wire` holds only its unwritten rest.
    header: u8,
    /// A reply to a command (or a control frame): written without
    /// coalescing delay, so a request/reply round trip never waits for pushes.
    reply: bool,
}

impl Frame {
    /// A text frame pushed to members (may wait out a short coalescing window).
    pub fn text(s: String) -> Self {
        Self::encode(OP_TEXT, s.as_bytes(), false)
    }

    /// A text frame answering a command.
    pub fn reply(s: String) -> Self {
        Self::encode(OP_TEXT, s.as_bytes(), true)
    }

    /// A binary frame pushed to members (`gw.v1.proto`).
    pub fn binary(payload: &[u8]) -> Self {
        Self::encode(OP_BINARY, payload, false)
    }

    /// A binary frame answering a command (`gw.v1.proto`).
    pub fn binary_reply(payload: &[u8]) -> Self {
        Self::encode(OP_BINARY, payload, true)
    }

    /// A ping control frame with an empty payload.
    pub fn ping() -> Self {
        Self::encode(OP_PING, &[], true)
    }

    /// The pong answering a client's ping (same payload).
    pub fn pong(payload: &[u8]) -> Self {
        Self::encode(OP_PONG, payload, true)
    }

    /// A close frame with `code` and a short reason (truncated to fit a control frame).
    pub fn close(code: u16, reason: &str) -> Self {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(truncate_utf8(reason, MAX_CONTROL_PAYLOAD - 2).as_bytes());
        Self::encode(OP_CLOSE, &payload, true)
    }

    fn encode(opcode: u8, payload: &[u8], reply: bool) -> Self {
        Self::encode_bits(0x80 | opcode, payload, reply)
    }

    /// Encodes a frame whose first byte is `first` (FIN, RSV bits, opcode).
    fn encode_bits(first: u8, payload: &[u8], reply: bool) -> Self {
        let len = payload.len();
        let mut wire = Vec::with_capacity(len + 10);
        wire.push(first);
        if len < 126 {
            wire.push(len as u8);
        } else if let Ok(short) = u16::try_from(len) {
            wire.push(126);
            wire.extend_from_slice(&short.to_be_bytes());
        } else {
            wire.push(127);
            wire.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let header = wire.len() as u8;
        wire.extend_from_slice(payload);
        Self {
            wire: Bytes::from(wire),
            header,
            reply,
        }
    }

    pub fn is_reply(&self) -> bool {
        self.reply
    }

    /// This data frame compressed for a peer that negotiated `d`
    /// (`permessage-deflate`: payload deflated, RSV1 set); `None` when it
    /// is a control frame, already compressed or partly written, or when
    /// compression does not pay ([`deflate::compress`]).
    pub fn deflated(&self, d: Deflate) -> Option<Self> {
        let first = *self.wire.first()?;
        if self.header == 0 || first & (RSV1 | 0x08) != 0 {
            return None;
        }
        let compressed = deflate::compress(self.as_bytes(), d.server_window_bits())?;
        Some(Self::encode_bits(first | RSV1, &compressed, self.reply))
    }

    /// [`Frame::deflated`] when `d` is set and compression pays, else this
    /// frame (a reference-count increment).
    pub fn deflated_or_plain(&self, d: Option<Deflate>) -> Self {
        d.and_then(|d| self.deflated(d)).unwrap_or_else(|| self.clone())
    }

    /// True when the payload is compressed (RSV1 set).
    pub fn is_compressed(&self) -> bool {
        self.header != 0 && self.wire.first().is_some_and(|b| b & RSV1 != 0)
    }

    /// True once a write ended inside this frame (the writer advanced it).
    pub fn is_partly_written(&self) -> bool {
        self.header == 0
    }

    /// The payload (for a text frame, its UTF-8 text).
    pub fn as_bytes(&self) -> &[u8] {
        &self.wire[usize::from(self.header)..]
    }

    /// The payload as shared bytes (no copy): lets a caller keep a part of
    /// it without storing those bytes twice.
    pub fn payload(&self) -> Bytes {
        self.wire.slice(usize::from(self.header)..)
    }

    /// The encoded frame as it goes on the wire.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`
/// (RFC 6455 section 4.2.2): base64 of the SHA-1 of the key followed by the
/// protocol's GUID.
pub fn accept_key(key: &[u8]) -> String {
    use base64::Engine as _;
    use sha1::{Digest, Sha1};
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary (a close reason must fit a control frame, RFC 6455 section 5.5).
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl fanout_tree::Weighted for Frame {
    fn weight(&self) -> usize {
        self.wire.len()
    }
}

impl fanout_tree::Wire for Frame {
    fn wire(&self) -> &[u8] {
        &self.wire
    }

    fn advance(&mut self, n: usize) {
        Buf::advance(&mut self.wire, n);
        self.header = 0;
    }
}

/// A message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close frame, with its code if it sent one.
    Close(Option<u16>),
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the client closed the connection")]
    Eof,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("message over the size limit")]
    TooLarge,
    #[error("text is not valid UTF-8")]
    BadUtf8,
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
}

/// A fragmented message being assembled.
struct Partial {
    text: bool,
    /// Its first frame had RSV1 set: inflate it once it is whole.
    compressed: bool,
    data: Vec<u8>,
}

/// Decodes client frames from the read half of a connection.
pub struct Reader<R> {
    io: R,
    /// Received bytes not yet decoded: empty (and unallocated) between frames.
    buf: Vec<u8>,
    /// Boxed: rare, and it keeps an idle reader small.
    partial: Option<Box<Partial>>,
    max_message: usize,
    /// `permessage-deflate` was negotiated: RSV1 marks compressed messages.
    deflate: bool,
}

/// A parsed frame header.
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    len: usize,
    mask: [u8; 4],
    size: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// `pre` holds bytes that arrived with the upgrade request.
    pub fn new(io: R, max_message: usize, pre: &[u8]) -> Self {
        Self {
            io,
            buf: pre.to_vec(),
            partial: None,
            max_message,
            deflate: false,
        }
    }

    /// Accepts compressed messages (`permessage-deflate` was negotiated):
    /// each is inflated on its own (the server asks for
    /// `client_no_context_takeover`) into at most the size limit.
    pub fn set_deflate(&mut self, on: bool) {
        self.deflate = on;
    }

    /// The next message. Cancel-safe: bytes already read stay buffered.
    pub async fn next(&mut self) -> Result<Incoming, ReadError> {
        loop {
            if let Some(m) = self.decode()? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Reads once; [`ReadError::Eof`] when the client closed its side.
    async fn fill(&mut self) -> Result<(), ReadError> {
        let Self { io, buf, .. } = self;
        poll_fn(|cx| {
            let spare = buf.capacity() - buf.len();
            let n = if spare >= READ_CHUNK {
                // A large frame is coming (decode reserved room): read in place.
                ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf))?
            } else {
                let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
                let mut rb = ReadBuf::uninit(&mut chunk);
                ready!(Pin::new(&mut *io).poll_read(cx, &mut rb))?;
                buf.extend_from_slice(rb.filled());
                rb.filled().len()
            };
            Poll::Ready(if n == 0 { Err(ReadError::Eof) } else { Ok(()) })
        })
        .await
    }

    /// Decodes one message from the buffer, if a whole one is there.
    fn decode(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let Some(h) = parse_header(&self.buf)? else {
                return Ok(None);
            };
            let control = h.opcode & 0x8 != 0;
            if h.rsv1 && !(self.deflate && matches!(h.opcode, OP_TEXT | OP_BINARY)) {
                return Err(ReadError::Protocol(if self.deflate {
                    "RSV1 set on a control or continuation frame"
                } else {
                    "reserved bits set"
                }));
            }
            if control {
                if !h.fin {
                    return Err(ReadError::Protocol("fragmented control frame"));
                }
                if h.len > MAX_CONTROL_PAYLOAD {
                    return Err(ReadError::Protocol("control frame over 125 bytes"));
                }
            } else {
                let so_far = self.partial.as_ref().map_or(0, |p| p.data.len());
                if h.len > self.max_message.saturating_sub(so_far) {
                    return Err(ReadError::TooLarge);
                }
            }
            let total = h.size + h.len;
            if self.buf.len() < total {
                self.buf.reserve(total - self.buf.len());
                return Ok(None);
            }
            let mut payload = self.buf[h.size..total].to_vec();
            unmask(&mut payload, h.mask);
            if self.buf.len() == total {
                // Nothing else buffered: give the memory back.
                self.buf = Vec::new();
            } else {
                self.buf.drain(..total);
            }
            if let Some(m) = self.message(h.opcode, h.fin, h.rsv1, payload)? {
                return Ok(Some(m));
            }
        }
    }

    /// Turns one frame into a message, or keeps it as part of one.
    fn message(&mut self, opcode: u8, fin: bool, rsv1: bool, payload: Vec<u8>) -> Result<Option<Incoming>, ReadError> {
        let (text, compressed, data) = match opcode {
            OP_TEXT | OP_BINARY => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("new message inside a fragmented one"));
                }
                if !fin {
                    self.partial = Some(Box::new(Partial {
                        text: opcode == OP_TEXT,
                        compressed: rsv1,
                        data: payload,
                    }));
                    return Ok(None);
                }
                (opcode == OP_TEXT, rsv1, payload)
            }
            OP_CONTINUATION => {
                let Some(p) = self.partial.as_mut() else {
                    return Err(ReadError::Protocol("continuation without a message"));
                };
                p.data.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                let p = self.partial.take().expect("checked above");
                (p.text, p.compressed, p.data)
            }
            OP_PING => return Ok(Some(Incoming::Ping(Bytes::from(payload)))),
            OP_PONG => return Ok(Some(Incoming::Pong)),
            OP_CLOSE => return close_frame(&payload).map(|code| Some(Incoming::Close(code))),
            _ => return Err(ReadError::Protocol("unknown opcode")),
        };
        let data = if compressed {
            deflate::inflate(&data, self.max_message).map_err(|e| match e {
                InflateError::TooLarge => ReadError::TooLarge,
                InflateError::Invalid => ReadError::Protocol("invalid permessage-deflate data"),
            })?
        } else {
            data
        };
        if text {
            if std::str::from_utf8(&data).is_err() {
                return Err(ReadError::BadUtf8);
            }
            Ok(Some(Incoming::Text(Bytes::from(data))))
        } else {
            Ok(Some(Incoming::Binary(Bytes::from(data))))
        }
    }
}

fn parse_header(b: &[u8]) -> Result<Option<Header>, ReadError> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x30 != 0 {
        return Err(ReadError::Protocol("reserved bits set"));
    }
    if b[1] & 0x80 == 0 {
        return Err(ReadError::Protocol("client frames must be masked"));
    }
    let (len, at) = match b[1] & 0x7f {
        126 => match b.get(2..4) {
            Some(l) => (u64::from(u16::from_be_bytes([l[0], l[1]])), 4),
            None => return Ok(None),
        },
        127 => match b.get(2..10) {
            Some(l) => {
                let len = u64::from_be_bytes(l.try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(ReadError::Protocol("frame length has its top bit set"));
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let Some(mask) = b.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin: b[0] & 0x80 != 0,
        rsv1: b[0] & RSV1 != 0,
        opcode: b[0] & 0x0f,
        // A length beyond usize is over any limit.
        len: usize::try_from(len).unwrap_or(usize::MAX),
        mask: mask.try_into().expect("4 bytes"),
        size: at + 4,
    }))
}

/// The code of a close frame's payload (checked: a valid code, UTF-8 reason).
fn close_frame(payload: &[u8]) -> Result<Option<u16>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(ReadError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::BadUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// XORs `data` with the 4-byte mask, 8 bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so at mask byte 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Writes every frame of `batch`, front first, with vectored writes, then
/// flushes. A frame leaves `batch` once all of it is written; a partly
/// written frame stays at the front, advanced. Cancel-safe.
pub async fn write_all<W: AsyncWrite + Unpin>(io: &mut W, batch: &mut VecDeque<Frame>) -> io::Result<()> {
    while !batch.is_empty() {
        let written = poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (slot, f) in slices.iter_mut().zip(batch.iter()) {
                *slot = IoSlice::new(&f.wire);
                n += 1;
            }
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let front = batch.front_mut().expect("written bytes belong to queued frames");
            let len = front.wire.len();
            if left >= len {
                left -= len;
                batch.pop_front();
            } else {
                fanout_tree::Wire::advance(front, left);
                left = 0;
            }
        }
    }
    poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx)).await
}

/// Writes one frame (a ping or the final close) and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, frame: Frame) -> io::Result<()> {
    let mut one = VecDeque::from([frame]);
    write_all(io, &mut one).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_matches_the_rfc_6455_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            super::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn close_reasons_are_cut_on_a_character_boundary() {
        let reason = "é".repeat(100);
        let cut = super::truncate_utf8(&reason, 123);
        assert!(cut.len() <= 123 && cut.len().is_multiple_of(2));
        let f = super::Frame::close(4009, &reason);
        assert!(f.as_bytes().len() <= 125);
    }

    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A client frame: masked with `mask`.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len < 65536 {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

    async fn read_all(bytes: Vec<u8>, max: usize, split_at: Option<usize>) -> Vec<Result<Incoming, String>> {
        read_all_with(bytes, max, split_at, false).await
    }

    /// [`read_all`] by a reader that accepts compressed messages or not.
    async fn read_all_with(
        bytes: Vec<u8>,
        max: usize,
        split_at: Option<usize>,
        deflate: bool,
    ) -> Vec<Result<Incoming, String>> {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = Reader::new(rx, max, &[]);
        reader.set_deflate(deflate);
        tokio::spawn(async move {
            match split_at {
                Some(at) => {
                    for chunk in bytes.chunks(at) {
                        tx.write_all(chunk).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                }
                None => tx.write_all(&bytes).await.unwrap(),
            }
        });
        let mut out = Vec::new();
        loop {
            match reader.next().await {
                Ok(m) => out.push(Ok(m)),
                Err(ReadError::Eof) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn decodes_every_kind_of_frame_at_every_split_point() {
        let mut bytes = client_frame(true, OP_TEXT, b"hello", MASK);
        bytes.extend(client_frame(true, OP_BINARY, &[0, 1, 2, 255], [1, 2, 3, 4]));
        bytes.extend(client_frame(true, OP_PING, b"p", MASK));
        bytes.extend(client_frame(true, OP_PONG, b"", MASK));
        bytes.extend(client_frame(true, OP_TEXT, &[b'x'; 300], MASK));
        bytes.extend(client_frame(false, OP_TEXT, "caf".as_bytes(), MASK));
        bytes.extend(client_frame(true, OP_PING, b"", MASK));
        bytes.extend(client_frame(true, OP_CONTINUATION, "é".as_bytes(), MASK));
        bytes.extend(client_frame(true, OP_CLOSE, &[0x03, 0xe8, b'o', b'k'], MASK));
        let want = vec![
            Ok(Incoming::Text(Bytes::from_static(b"hello"))),
            Ok(Incoming::Binary(Bytes::from_static(&[0, 1, 2, 255]))),
            Ok(Incoming::Ping(Bytes::from_static(b"p"))),
            Ok(Incoming::Pong),
            Ok(Incoming::Text(Bytes::from(vec![b'x'; 300]))),
            // A control frame may come between the fragments of a message.
            Ok(Incoming::Ping(Bytes::new())),
            Ok(Incoming::Text(Bytes::from("café"))),
            Ok(Incoming::Close(Some(1000))),
        ];
        assert_eq!(read_all(bytes.clone(), 1024, None).await, want);
        for at in [1, 2, 3, 5, 7, 11, 64] {
            assert_eq!(
                read_all(bytes.clone(), 1024, Some(at)).await,
                want,
                "split every {at} bytes"
            );
        }
    }

    #[tokio::test]
    async fn a_large_frame_is_read_whole() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let got = read_all(client_frame(true, OP_BINARY, &payload, MASK), 100_000, Some(9000)).await;
        assert_eq!(got, vec![Ok(Incoming::Binary(Bytes::from(payload)))]);
    }

    #[tokio::test]
    async fn refuses_what_the_protocol_forbids() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut f = client_frame(true, OP_TEXT, b"x", MASK);
                    f[1] &= 0x7f; // unmasked: mask key bytes now read as payload
                    f.truncate(3);
                    f
                },
                "masked",
            ),
            (
                {
                    let mut f = client_frame(true, OP_TEXT, b"x", MASK);
                    f[0] |= 0x40;
                    f
                },
                "reserved",
            ),
            (client_frame(true, 0x3, b"", MASK), "opcode"),
            (client_frame(false, OP_PING, b"", MASK), "fragmented control"),
            (client_frame(true, OP_PING, &[0; 126], MASK), "125"),
            (client_frame(true, OP_CONTINUATION, b"x", MASK), "continuation"),
            (
                {
                    let mut f = client_frame(false, OP_TEXT, b"a", MASK);
                    f.extend(client_frame(true, OP_TEXT, b"b", MASK));
                    f
                },
                "inside a fragmented",
            ),
            (client_frame(true, OP_CLOSE, &[3], MASK), "1-byte"),
            (client_frame(true, OP_CLOSE, &1005u16.to_be_bytes(), MASK), "close code"),
            (client_frame(true, OP_CLOSE, &999u16.to_be_bytes(), MASK), "close code"),
            (client_frame(true, OP_TEXT, &[0xff, 0xfe], MASK), "UTF-8"),
            (
                {
                    let mut f = client_frame(false, OP_TEXT, &[0xc3], MASK);
                    f.extend(client_frame(true, OP_CONTINUATION, &[0x28], MASK));
                    f
                },
                "UTF-8",
            ),
            (client_frame(true, OP_TEXT, &[b'a'; 101], MASK), "size limit"),
            (
                {
                    let mut f = client_frame(false, OP_TEXT, &[b'a'; 60], MASK);
                    f.extend(client_frame(true, OP_CONTINUATION, &[b'a'; 60], MASK));
                    f
                },
                "size limit",
            ),
        ];
        for (bytes, want) in cases {
            let got = read_all(bytes, 100, None).await;
            let last = got.last().expect("an error").as_ref().expect_err("must fail");
            assert!(last.contains(want), "{last:?} should mention {want:?}");
        }
    }

    /// `permessage-deflate` negotiated: RSV1 on the first frame of a data
    /// message marks it compressed (whole or fragmented, control frames
    /// between); it is inflated within the size limit, then checked as
    /// UTF-8. RSV1 anywhere else, RSV2, and data that does not inflate are
    /// protocol errors.
    #[tokio::test]
    async fn with_deflate_compressed_messages_are_inflated_and_misplaced_bits_refused() {
        // RSV1 passed in the opcode argument: `client_frame` ORs it in.
        const Z_TEXT: u8 = RSV1 | OP_TEXT;
        let text = "a chat message that compresses, ".repeat(6);
        let z = deflate::compress(text.as_bytes(), deflate::MAX_WINDOW_BITS).expect("it pays");
        let text = Bytes::from(text);
        // A limit the compressed message is under but the inflated one over.
        let limit = text.len() - 1;
        assert!(z.len() < limit);
        let (head, tail) = z.split_at(z.len() / 2);
        let mut bytes = client_frame(true, Z_TEXT, &z, MASK);
        bytes.extend(client_frame(true, RSV1 | OP_BINARY, &z, MASK));
        bytes.extend(client_frame(false, Z_TEXT, head, MASK));
        bytes.extend(client_frame(true, OP_PING, b"", MASK));
        bytes.extend(client_frame(true, OP_CONTINUATION, tail, MASK));
        bytes.extend(client_frame(true, OP_TEXT, b"plain", MASK));
        let want = vec![
            Ok(Incoming::Text(text.clone())),
            Ok(Incoming::Binary(text.clone())),
            Ok(Incoming::Ping(Bytes::new())),
            Ok(Incoming::Text(text.clone())),
            Ok(Incoming::Text(Bytes::from_static(b"plain"))),
        ];
        for split in [None, Some(1), Some(7)] {
            assert_eq!(read_all_with(bytes.clone(), 1024, split, true).await, want, "{split:?}");
        }
        // Without deflate the same bytes are refused at the first frame.
        let got = read_all(bytes, 1024, None).await;
        assert_eq!(got, vec![Err("WebSocket protocol error: reserved bits set".into())]);

        let bad_utf8 = deflate::compress(&[0xff; 100], deflate::MAX_WINDOW_BITS).expect("it pays");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut f = client_frame(false, OP_TEXT, head, MASK);
                    f.extend(client_frame(true, RSV1 | OP_CONTINUATION, tail, MASK));
                    f
                },
                "RSV1 set on a control or continuation frame",
            ),
            (
                client_frame(true, RSV1 | OP_PING, b"", MASK),
                "RSV1 set on a control or continuation frame",
            ),
            (client_frame(true, 0x20 | OP_TEXT, b"x", MASK), "reserved bits set"),
            (
                client_frame(true, Z_TEXT, &[0xff; 4], MASK),
                "invalid permessage-deflate data",
            ),
            (client_frame(true, Z_TEXT, &z, MASK), "size limit"),
            (client_frame(true, Z_TEXT, &bad_utf8, MASK), "UTF-8"),
        ];
        for (bytes, want) in cases {
            let got = read_all_with(bytes, limit, None, true).await;
            let last = got.last().expect("an error").as_ref().expect_err("must fail");
            assert!(last.contains(want), "{last:?} should mention {want:?}");
        }
    }

    #[tokio::test]
    async fn the_size_limit_is_checked_before_the_payload_arrives() {
        // Only the header of a 1 GB frame is ever sent.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        header.extend_from_slice(&MASK);
        let got = read_all(header, 1 << 16, None).await;
        assert_eq!(got, vec![Err(ReadError::TooLarge.to_string())]);
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, MASK);
            let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]).collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn server_frames_use_the_shortest_length_encoding() {
        assert_eq!(Frame::text("hi".into()).wire(), b"\x81\x02hi");
        let f = Frame::text("x".repeat(126));
        assert_eq!(&f.wire()[..4], &[0x81, 126, 0, 126]);
        assert_eq!(f.as_bytes().len(), 126);
        let f = Frame::text("x".repeat(70_000));
        assert_eq!(&f.wire()[..2], &[0x81, 127]);
        assert_eq!(&f.wire()[2..10], &70_000u64.to_be_bytes());
        assert_eq!(Frame::ping().wire(), &[0x89, 0]);
        assert_eq!(Frame::close(4009, "slow").wire(), b"\x88\x06\x0f\xa9slow");
        assert!(Frame::close(1000, &"r".repeat(300)).wire().len() <= 2 + 125);
    }

    #[tokio::test]
    async fn write_all_survives_partial_writes() {
        // A 7-byte pipe forces writes that end inside frames.
        let (mut tx, mut rx) = tokio::io::duplex(7);
        let frames: Vec<Frame> = (0..50).map(|i| Frame::text(format!("message {i}"))).collect();
        let want: Vec<u8> = frames.iter().flat_map(|f| f.wire().to_vec()).collect();
        let mut batch: VecDeque<Frame> = frames.into();
        let writer = tokio::spawn(async move {
            write_all(&mut tx, &mut batch).await.unwrap();
            assert!(batch.is_empty());
        });
        let mut got = vec![0u8; want.len()];
        tokio::io::AsyncReadExt::read_exact(&mut rx, &mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, want);
    }

    /// Feeds `bytes` to a reader in chunks (the socket is never read: the
    /// bytes go straight into its buffer) and collects what it decodes,
    /// stopping at the first error.
    fn decode_chunks(bytes: &[u8], chunks: &[usize], max: usize) -> Vec<Result<Incoming, String>> {
        let mut reader = Reader::new(tokio::io::empty(), max, &[]);
        let mut out = Vec::new();
        let mut at: usize = 0;
        for &len in chunks.iter().chain(std::iter::once(&usize::MAX)) {
            let end = at.saturating_add(len).min(bytes.len());
            reader.buf.extend_from_slice(&bytes[at..end]);
            at = end;
            loop {
                match reader.decode() {
                    Ok(Some(m)) => out.push(Ok(m)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e.to_string()));
                        return out;
                    }
                }
            }
            if at == bytes.len() {
                break;
            }
        }
        out
    }

    #[test]
    fn random_bytes_never_panic_and_never_grow_the_buffer_past_the_limit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2_000 {
            let len = rng.random_range(0..300);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            // Half of the cases look like masked client frames at first.
            if rng.random_bool(0.5) && bytes.len() > 2 {
                bytes[1] |= 0x80;
                bytes[0] &= 0x8f;
            }
            let chunks: Vec<usize> = (0..8).map(|_| rng.random_range(1..64)).collect();
            let _ = decode_chunks(&bytes, &chunks, 1024);
            // All at once too, and the buffer stays within what a frame
            // under the limit can need (at most doubled by `Vec`'s growth).
            let mut reader = Reader::new(tokio::io::empty(), 1024, &bytes);
            while let Ok(Some(_)) = reader.decode() {}
            assert!(
                reader.buf.capacity() <= 2 * (1024 + 14) + 300,
                "{}",
                reader.buf.capacity()
            );
        }
    }

    #[test]
    fn random_valid_streams_decode_the_same_however_they_are_cut() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..300 {
            let mut bytes = Vec::new();
            let mut want = Vec::new();
            for _ in 0..rng.random_range(1..12) {
                let mask: [u8; 4] = rng.random();
                match rng.random_range(0..4) {
                    0 => {
                        let p: Vec<u8> = (0..rng.random_range(0..126)).map(|_| rng.random()).collect();
                        bytes.extend(client_frame(true, OP_PING, &p, mask));
                        want.push(Ok(Incoming::Ping(Bytes::from(p))));
                    }
                    1 => {
                        let p: Vec<u8> = (0..rng.random_range(0..70_000)).map(|_| rng.random()).collect();
                        bytes.extend(client_frame(true, OP_BINARY, &p, mask));
                        want.push(Ok(Incoming::Binary(Bytes::from(p))));
                    }
                    _ => {
                        // Text in 1 to 4 fragments, cut anywhere (even inside a
                        // UTF-8 sequence), maybe with a pong in between.
                        let text: String = (0..rng.random_range(0..400))
                            .map(|_| ['a', 'é', '€', '😀', ' '][rng.random_range(0..5)])
                            .collect();
                        let raw = text.as_bytes();
                        let parts = rng.random_range(1..5).min(raw.len().max(1));
                        let mut cuts: Vec<usize> = (1..parts).map(|_| rng.random_range(0..=raw.len())).collect();
                        cuts.sort_unstable();
                        let mut start = 0;
                        let last = cuts.len();
                        for (i, end) in cuts.iter().copied().chain(std::iter::once(raw.len())).enumerate() {
                            let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
                            bytes.extend(client_frame(i == last, op, &raw[start..end], mask));
                            start = end;
                            if i != last && rng.random_bool(0.3) {
                                bytes.extend(client_frame(true, OP_PONG, b"", mask));
                                want.push(Ok(Incoming::Pong));
                            }
                        }
                        want.push(Ok(Incoming::Text(Bytes::from(text))));
                    }
                }
            }
            let chunks: Vec<usize> = (0..50).map(|_| rng.random_range(1..9_000)).collect();
            let got = decode_chunks(&bytes, &chunks, 100_000);
            // Compared one by one: a full dump of 70 KB payloads helps nobody.
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g == w,
                    "message {i} differs: {:?}",
                    g.as_ref().map_err(|e| e.as_str()).err()
                );
            }
        }
    }
}
