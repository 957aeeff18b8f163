//! A minimal WebSocket client codec (RFC 6455) for the load generator.
//!
//! Owns the handshake request, reading server frames out of one reusable
//! buffer, and encoding masked client frames. It does not own sockets or
//! protocol state: `conn` drives it. The one extension it may negotiate is
//! `permessage-deflate` (RFC 7692): then RSV1 marks a compressed message
//! (`conn` inflates it); other RSV bits must be clear. The reader hands out frames as slices into its buffer: no
//! allocation per frame, and a whole TCP read (many frames) is parsed before
//! the next read. The buffer grows only for a frame larger than it.

use anyhow::{Result, bail};
use base64::Engine as _;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest server frame accepted.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// One server frame, borrowed from the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    /// RSV1: the (first frame of a) compressed message.
    pub compressed: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Reusable read buffer holding unparsed bytes in `buf[start..end]`.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes the next frame needs from `start` (0 while unknown).
    need: usize,
    /// `permessage-deflate` was negotiated: RSV1 is allowed.
    pub rsv1_ok: bool,
}

impl FrameReader {
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
            need: 0,
            rsv1_ok: false,
        }
    }

    /// Starts with bytes already read past the end of the HTTP handshake.
    pub fn with_leftover(capacity: usize, leftover: &[u8]) -> Self {
        let mut r = Self::new(capacity.max(leftover.len() * 2));
        r.buf[..leftover.len()].copy_from_slice(leftover);
        r.end = leftover.len();
        r
    }

    /// The free tail to read into; compacts or grows first when needed.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let cap = self.buf.len();
        let free = cap - self.end;
        if free < cap / 4 || self.start + self.need > cap {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.need > self.buf.len() {
            self.buf.resize(self.need.next_power_of_two(), 0);
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of [`Self::spare`] as read.
    pub fn filled(&mut self, n: usize) {
        self.end += n;
    }

    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Calls `on` for every complete frame buffered, in order.
    pub fn frames(&mut self, mut on: impl FnMut(Frame<'_>) -> Result<()>) -> Result<()> {
        loop {
            let avail = &self.buf[self.start..self.end];
            let Some((hdr, len)) = header(avail, self.rsv1_ok)? else {
                self.need = 14;
                return Ok(());
            };
            if avail.len() < hdr + len {
                self.need = hdr + len;
                return Ok(());
            }
            self.need = 0;
            let b0 = avail[0];
            let frame = Frame {
                fin: b0 & 0x80 != 0,
                compressed: b0 & 0x40 != 0,
                opcode: b0 & 0x0f,
                payload: &avail[hdr..hdr + len],
            };
            self.start += hdr + len;
            on(frame)?;
        }
    }
}

/// Header length and payload length, or `None` when the header is incomplete.
fn header(b: &[u8], rsv1_ok: bool) -> Result<Option<(usize, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & if rsv1_ok { 0x30 } else { 0x70 } != 0 {
        bail!("WebSocket frame with RSV bits set (no extension was negotiated)");
    }
    if b[1] & 0x80 != 0 {
        bail!("masked WebSocket frame from the server");
    }
    let (hdr, len) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
        127 if b.len() >= 10 => {
            let len = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            (10, usize::try_from(len).unwrap_or(usize::MAX))
        }
        126 | 127 => return Ok(None),
        n => (2, n as usize),
    };
    if len > MAX_FRAME {
        bail!("WebSocket frame of {len} bytes is over the {MAX_FRAME}-byte limit");
    }
    Ok(Some((hdr, len)))
}

/// Cheap masking-key source; masking only has to be unpredictable to
/// intermediaries, and there are none on loopback.
#[derive(Debug)]
pub struct MaskKeys(u64);

impl MaskKeys {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> [u8; 4] {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 as u32).to_ne_bytes()
    }
}

/// Appends one masked client frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], keys: &mut MaskKeys) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let key = keys.next();
    out.extend_from_slice(&key);
    let at = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[at..], key);
}

fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let k = u32::from_ne_bytes(key);
    let k8 = u64::from(k) | (u64::from(k) << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ k8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// The HTTP upgrade request.
pub fn handshake_request(
    host: &str,
    path: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
    key_seed: u128,
) -> Vec<u8> {
    let key = base64::engine::general_purpose::STANDARD.encode(key_seed.to_le_bytes());
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(p) = protocol {
        req.push_str("Sec-WebSocket-Protocol: ");
        req.push_str(p);
        req.push_str("\r\n");
    }
    if let Some(e) = extensions {
        req.push_str("Sec-WebSocket-Extensions: ");
        req.push_str(e);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Parsed upgrade response head.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head including the blank line.
    pub len: usize,
    /// The `Sec-WebSocket-Extensions` value, if any.
    pub extensions: Option<String>,
}

/// Parses the response head once `buf` holds all of it.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > 16 * 1024 {
            bail!("HTTP response head over 16 KiB");
        }
        return Ok(None);
    };
    let line_end = memchr::memmem::find(buf, b"\r\n").unwrap_or(end);
    let line = std::str::from_utf8(&buf[..line_end])?;
    let mut parts = line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("bad HTTP status line {line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("bad HTTP status line {line:?}");
    }
    let extensions = std::str::from_utf8(&buf[..end]).ok().and_then(|head| {
        head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_string())
        })
    });
    Ok(Some(ResponseHead {
        status: code.parse()?,
        len: end + 4,
        extensions,
    }))
}

/// Appends an unmasked server frame (what a server sends) to `out`; used by
/// `calibrate`'s in-process server and by the codec tests.
pub fn server_frame_into(out: &mut Vec<u8>, opcode: u8, fin: bool, payload: &[u8]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked server frame, as a server would send it.
    pub(crate) fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        super::server_frame_into(&mut out, opcode, fin, payload);
        out
    }

    fn read_all(r: &mut FrameReader, input: &[u8], step: usize) -> Vec<(u8, bool, Vec<u8>)> {
        let mut got = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let spare = r.spare();
            let n = spare.len().min(step).min(input.len() - pos);
            spare[..n].copy_from_slice(&input[pos..pos + n]);
            r.filled(n);
            pos += n;
            r.frames(|f| {
                got.push((f.opcode, f.fin, f.payload.to_vec()));
                Ok(())
            })
            .unwrap();
        }
        got
    }

    #[test]
    fn frames_of_every_length_class_survive_any_read_size() {
        let big = vec![7u8; 70_000];
        let mid = vec![3u8; 300];
        let mut input = server_frame(OP_TEXT, true, b"hi");
        input.extend(server_frame(OP_BINARY, false, &mid));
        input.extend(server_frame(OP_CONT, true, &big));
        input.extend(server_frame(OP_PING, true, b""));
        for step in [1, 3, 100, 4096, 1 << 20] {
            let mut r = FrameReader::new(256);
            let got = read_all(&mut r, &input, step);
            assert_eq!(got.len(), 4, "step {step}");
            assert_eq!(got[0], (OP_TEXT, true, b"hi".to_vec()));
            assert_eq!(got[1], (OP_BINARY, false, mid.clone()));
            assert_eq!(got[2], (OP_CONT, true, big.clone()));
            assert_eq!(got[3], (OP_PING, true, Vec::new()));
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn masked_or_extended_server_frames_are_rejected() {
        for bad in [[0x81u8, 0x81, 0, 0, 0, 0, b'a'], [0xC1, 0x01, b'a', 0, 0, 0, 0]] {
            let mut r = FrameReader::with_leftover(64, &bad);
            assert!(r.frames(|_| Ok(())).is_err());
        }
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        let mut keys = MaskKeys::new(42);
        for len in [0usize, 5, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, OP_BINARY, &payload, &mut keys);
            assert_eq!(out[0], 0x82);
            assert!(out[1] & 0x80 != 0, "mask bit");
            let (hdr, plen) = match out[1] & 0x7f {
                126 => (4, u16::from_be_bytes([out[2], out[3]]) as usize),
                127 => (10, u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize),
                n => (2, n as usize),
            };
            assert_eq!(plen, len);
            let key: [u8; 4] = out[hdr..hdr + 4].try_into().unwrap();
            let unmasked: Vec<u8> = out[hdr + 4..].iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            assert_eq!(unmasked, payload);
        }
    }

    #[test]
    fn response_head_is_parsed_with_its_length() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi";
        let h = parse_response_head(head).unwrap().unwrap();
        assert_eq!(
            h,
            ResponseHead {
                status: 101,
                len: head.len() - 4,
                extensions: None,
            }
        );
        assert_eq!(parse_response_head(b"HTTP/1.1 101 Swi").unwrap(), None);
        let h = parse_response_head(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 503);
        assert!(parse_response_head(b"SSH-2.0\r\n\r\n").is_err());
    }
}
