//! `permessage-deflate` (RFC 7692): the negotiation, compressing a server
//! message, and inflating a client message within the size limit.
//!
//! Chosen so that compression costs no memory on an idle connection and no
//! compression per delivery:
//! - The server always answers with `server_no_context_takeover`: every
//!   server message is compressed on its own, so one compressed frame of a
//!   room message can be sent to every member that negotiated the same
//!   parameters (`protocol::SharedMessage` keeps it next to its plain
//!   frames), and no compressor lives on a connection. Compressors are per
//!   thread, reset before each message.
//! - The server always asks for `client_no_context_takeover`: every client
//!   message is inflated on its own by the thread's inflater, so no inflate
//!   state (32 KiB of window) lives on a connection between messages. The
//!   client's window is left as it offered it (`client_max_window_bits` is
//!   not lowered): the per-thread inflater's window is 32 KiB whatever the
//!   client uses, so a smaller one would only compress the client's large
//!   frames (a 2,000-room `subscribe`) worse.
//! - A message is inflated into a buffer that may grow to the message size
//!   limit and no further: a small frame that would inflate past it (a
//!   "zip bomb") ends in [`InflateError::TooLarge`] having allocated at most
//!   the limit.
//! - Frames below [`MIN_COMPRESS`] bytes, and frames that would not get
//!   smaller, are sent uncompressed (RSV1 clear): allowed by RFC 7692
//!   section 6 for any message.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// The largest LZ77 window (32 KiB): the default of both directions.
pub const MAX_WINDOW_BITS: u8 = 15;

/// Smallest window a client may ask of the server (RFC 7692 section 7.1.2).
const MIN_WINDOW_BITS: u8 = 8;

/// Payloads shorter than this are sent uncompressed. Measured on this
/// protocol's frames (`docs/benchmarks.md`): replies under ~60 bytes come
/// out of deflate as long or longer (`{"id":4,"ok":{"offset":131}}`: 28 ->
/// 30 bytes), while the smallest `message` push (~96 bytes, empty `data`)
/// already shrinks by ~12 % and a 200-byte chat message's push by ~33 %.
pub const MIN_COMPRESS: usize = 64;

/// The compression level (zlib's 1-9). The default: paid once per room
/// message per node (not per member) and once per reply.
const LEVEL: u32 = 6;

/// The 4 bytes a sync flush ends with; RFC 7692 section 7.2.1 removes them
/// from a compressed message and the receiver adds them back.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Chunk by which the inflate buffer grows (a bomb's output is refused
/// after at most the limit plus one chunk of growth room).
const INFLATE_CHUNK: usize = 16 << 10;

/// What a connection negotiated. One byte: the window the server may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    server_window_bits: u8,
}

impl Deflate {
    /// The parameters of an offer without `server_max_window_bits`.
    pub const DEFAULT: Deflate = Deflate {
        server_window_bits: MAX_WINDOW_BITS,
    };

    /// The window the server's compressed messages may use, in bits (8-15).
    pub fn server_window_bits(self) -> u8 {
        self.server_window_bits
    }

    /// True when this connection reads any compressed frame the node makes
    /// (full window): it can share the frames compressed once per node.
    pub fn shares_frames(self) -> bool {
        self.server_window_bits == MAX_WINDOW_BITS
    }
}

/// Picks the first `permessage-deflate` offer this server can accept from
/// the values of a request's `Sec-WebSocket-Extensions` headers (RFC 7692
/// section 5). Returns the parameters and the response's header value;
/// `None` when nothing acceptable was offered (the connection then runs
/// uncompressed).
///
/// An offer is declined when a parameter is unknown, repeated, or has a bad
/// value. The response always carries `server_no_context_takeover` and
/// `client_no_context_takeover` (both allowed whatever the offer says),
/// and `server_max_window_bits` when the offer asked for it.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Option<(Deflate, String)> {
    header_values
        .into_iter()
        .flat_map(split_outside_quotes)
        .find_map(|offer| accept_offer(offer.trim()))
}

fn accept_offer(offer: &str) -> Option<(Deflate, String)> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut server_window: Option<u8> = None;
    let (mut server_nct, mut client_nct, mut client_window) = (false, false, false);
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let seen = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => std::mem::replace(&mut server_nct, true),
            "client_no_context_takeover" if value.is_none() => std::mem::replace(&mut client_nct, true),
            "server_max_window_bits" => server_window.replace(window_bits(value?)?).is_some(),
            "client_max_window_bits" => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
                std::mem::replace(&mut client_window, true)
            }
            _ => return None,
        };
        if seen {
            return None;
        }
    }
    let mut response = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_window {
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    let d = Deflate {
        server_window_bits: server_window.unwrap_or(MAX_WINDOW_BITS),
    };
    Some((d, response))
}

/// A window size value: 1*DIGIT in 8..=15, no leading zero.
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>()
        .ok()
        .filter(|b| (MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(b))
}

/// Splits a header value at commas that are not inside a quoted string.
fn split_outside_quotes(v: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    v.split(move |c| {
        if c == '"' {
            quoted = !quoted;
        }
        c == ',' && !quoted
    })
}

thread_local! {
    /// One compressor per window size used on this thread (9-15 bits), made
    /// on first use and reset before each message.
    static COMPRESSORS: RefCell<[Option<Box<Compress>>; 7]> = const { RefCell::new([const { None }; 7]) };
    /// The thread's inflater (32 KiB window: reads any client window).
    static INFLATER: RefCell<Option<Box<Decompress>>> = const { RefCell::new(None) };
}

/// The compressed form of `payload` (RFC 7692 section 7.2.1: one sync-flushed
/// deflate stream without its 4-byte tail), readable with a window of
/// `window_bits`; `None` when it is below [`MIN_COMPRESS`] bytes or would
/// not get smaller (send it uncompressed).
///
/// A message no longer than the window cannot refer further back than the
/// window, so it is compressed with the full window whatever `window_bits`
/// says (the same bytes as for every other member). A window of 8 bits,
/// which zlib cannot compress with, leaves longer messages uncompressed.
pub fn compress(payload: &[u8], window_bits: u8) -> Option<Vec<u8>> {
    if payload.len() < MIN_COMPRESS {
        return None;
    }
    let bits = if payload.len() <= 1 << window_bits {
        MAX_WINDOW_BITS
    } else if window_bits > MIN_WINDOW_BITS {
        window_bits.min(MAX_WINDOW_BITS)
    } else {
        return None;
    };
    #[cfg(test)]
    tests::COMPRESSIONS.with(|n| n.set(n.get() + 1));
    COMPRESSORS.with_borrow_mut(|all| {
        let c = all[usize::from(bits - 9)]
            .get_or_insert_with(|| Box::new(Compress::new_with_window_bits(Compression::new(LEVEL), false, bits)));
        c.reset();
        deflate_with(c, payload)
    })
}

fn deflate_with(c: &mut Compress, payload: &[u8]) -> Option<Vec<u8>> {
    // Room for the whole input: a result that would not fit is not smaller.
    let mut out = Vec::with_capacity(payload.len() + 8);
    loop {
        let consumed = usize::try_from(c.total_in()).ok()?;
        c.compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
            .ok()?;
        let done = usize::try_from(c.total_in()).ok()? == payload.len();
        if done && out.len() < out.capacity() {
            break;
        }
        if out.len() >= payload.len() + 4 {
            return None;
        }
        out.reserve(64);
    }
    if !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    (out.len() < payload.len()).then_some(out)
}

/// Why a compressed client message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates past the size limit (close 1009).
    #[error("message over the size limit once inflated")]
    TooLarge,
    /// Not a valid deflate stream (or it uses context the server asked the
    /// client not to keep).
    #[error("invalid permessage-deflate data")]
    Invalid,
}

/// Inflates one compressed client message (without its tail) into at most
/// `max` bytes. The output grows with what the stream really yields, in
/// `INFLATE_CHUNK` steps, and never beyond `max` bytes of content: a
/// message that would inflate further ends with [`InflateError::TooLarge`]
/// before more is allocated.
pub fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with_borrow_mut(|slot| {
        let d = slot.get_or_insert_with(|| Box::new(Decompress::new_with_window_bits(false, MAX_WINDOW_BITS)));
        d.reset(false);
        let mut out = Vec::new();
        inflate_into(d, data, max, &mut out)?;
        Ok(out)
    })
}

/// The body of [`inflate`], writing into `out` (empty): on error `out`
/// shows how much was allocated.
fn inflate_into(d: &mut Decompress, data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
    out.reserve_exact(data.len().saturating_mul(2).clamp(64, INFLATE_CHUNK).min(max + 1));
    for input in [data, &TAIL[..]] {
        let start_in = d.total_in();
        loop {
            let used = usize::try_from(d.total_in() - start_in).map_err(|_| InflateError::Invalid)?;
            if used == input.len() && out.len() < out.capacity() {
                break;
            }
            if out.len() == out.capacity() {
                // At most one byte past the limit: enough to see it is over.
                out.reserve_exact(INFLATE_CHUNK.min(max + 1 - out.len()));
            }
            let before = (d.total_in(), d.total_out());
            let status = d
                .decompress_vec(&input[used..], out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            if out.len() > max {
                return Err(InflateError::TooLarge);
            }
            if status == Status::StreamEnd {
                // A final block ended the stream; the tail may follow it.
                return Ok(());
            }
            if (d.total_in(), d.total_out()) == before && out.len() < out.capacity() {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Messages compressed on this thread (a test's own count).
        pub(super) static COMPRESSIONS: Cell<usize> = const { Cell::new(0) };
    }

    /// How many messages this thread has compressed so far.
    pub(crate) fn compressions() -> usize {
        COMPRESSIONS.with(Cell::get)
    }

    fn offer(v: &str) -> Option<(Deflate, String)> {
        negotiate([v])
    }

    #[test]
    fn negotiation_follows_rfc_7692() {
        // Chromium's and Node's offer.
        let (d, r) = offer("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(d, Deflate::DEFAULT);
        assert_eq!(
            r,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let (d, r) = offer("permessage-deflate; server_max_window_bits=10; client_no_context_takeover").unwrap();
        assert_eq!(d.server_window_bits(), 10);
        assert!(!d.shares_frames());
        assert!(r.ends_with("; server_max_window_bits=10"), "{r}");
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=\"9\"")
                .unwrap()
                .0
                .server_window_bits(),
            9
        );
        // The first acceptable offer wins; bad ones are skipped.
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
            "permessage-deflate; mystery",
        ] {
            assert!(offer(bad).is_none(), "{bad}");
            let (d, _) = negotiate([bad, "permessage-deflate; server_max_window_bits=12"]).unwrap();
            assert_eq!(d.server_window_bits(), 12, "{bad}");
            let (d, _) = offer(&format!("{bad}, permessage-deflate")).unwrap();
            assert_eq!(d, Deflate::DEFAULT, "{bad}");
        }
        assert!(negotiate([]).is_none());
    }

    fn text(n: usize) -> Vec<u8> {
        let words = ["chat ", "room ", "hello ", "message ", "{\"op\":", "42 ", "é "];
        let mut out = Vec::new();
        let mut i = 7usize;
        while out.len() < n {
            i = i.wrapping_mul(31).wrapping_add(17);
            out.extend_from_slice(words[i % words.len()].as_bytes());
        }
        out.truncate(n);
        out
    }

    /// Inflates with an independent reader: flate2's raw inflater, fed the
    /// message and the tail RFC 7692 section 7.2.2 appends.
    fn reference_inflate(c: &[u8], window_bits: u8) -> Vec<u8> {
        let mut d = Decompress::new_with_window_bits(false, window_bits);
        let mut input = c.to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
        out
    }

    #[test]
    fn compressed_messages_inflate_back_within_the_negotiated_window() {
        for len in [0, 10, 127, 128, 200, 1000, 40_000, 300_000] {
            let p = text(len);
            for bits in [8, 9, 12, 15] {
                match compress(&p, bits) {
                    Some(c) => {
                        assert!(c.len() < p.len());
                        assert_eq!(reference_inflate(&c, bits.max(9)), p, "len {len} bits {bits}");
                        assert_eq!(inflate(&c, p.len()).unwrap(), p);
                    }
                    None => assert!(len < MIN_COMPRESS || (bits == 8 && len > 256), "len {len} bits {bits}"),
                }
            }
        }
        // Random bytes do not get smaller: sent as they are.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let noise: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
        assert!(compress(&noise, 15).is_none());
    }

    #[test]
    fn a_bomb_stops_at_the_limit_without_allocating_its_size() {
        // 8 MiB of zeros in ~8 KB of deflate.
        let mut c = Compress::new(Compression::new(9), false);
        let zeros = vec![0u8; 8 << 20];
        let mut bomb = Vec::with_capacity(1 << 20);
        c.compress_vec(&zeros, &mut bomb, FlushCompress::Sync).unwrap();
        assert!(bomb.len() < 10_000, "{}", bomb.len());
        bomb.truncate(bomb.len() - 4);
        // The error comes once the output passes the limit, and the buffer
        // never grew past it (plus the one byte that shows it is over).
        let limit = 256 << 10;
        let mut d = Decompress::new_with_window_bits(false, 15);
        let mut out = Vec::new();
        assert_eq!(
            inflate_into(&mut d, &bomb, limit, &mut out),
            Err(InflateError::TooLarge)
        );
        assert!(out.capacity() <= limit + 1, "{}", out.capacity());
        assert_eq!(inflate(&bomb, limit), Err(InflateError::TooLarge));
        // Exactly at the limit is fine.
        let p = text(limit);
        let ok = compress(&p, 15).unwrap();
        assert_eq!(inflate(&ok, limit).unwrap().len(), limit);
        assert_eq!(inflate(&ok, limit - 1), Err(InflateError::TooLarge));
    }

    #[test]
    fn garbage_is_refused_and_the_inflater_recovers() {
        assert_eq!(inflate(&[0xff, 0xff, 0xff, 0xff], 1024), Err(InflateError::Invalid));
        let p = text(500);
        assert_eq!(inflate(&compress(&p, 15).unwrap(), 1024).unwrap(), p);
        // A stored block ending the stream (BFINAL) is complete without the tail.
        let mut c = Compress::new(Compression::new(0), false);
        let mut out = Vec::with_capacity(600);
        c.compress_vec(&p, &mut out, FlushCompress::Finish).unwrap();
        assert_eq!(inflate(&out, 1024).unwrap(), p);
    }
}
