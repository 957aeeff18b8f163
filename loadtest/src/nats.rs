//! The NATS text protocol, client side, as carried over nats-server's
//! WebSocket listener.
//!
//! Owns framing only: turning a byte stream into protocol events and encoding
//! the few commands the load generator sends. WebSocket frame boundaries are
//! not message boundaries (nats-server packs several `MSG`s into a frame or
//! splits one across frames), so [`NatsParser`] consumes a stream: complete
//! messages are parsed straight from the caller's slice and only an unfinished
//! tail is copied into a reused buffer.

use anyhow::{Result, bail};
use memchr::memchr;

/// One server-to-client protocol event, borrowing from the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Msg {
        subject: &'a [u8],
        sid: u64,
        payload: &'a [u8],
    },
    Info(&'a [u8]),
    Ping,
    Pong,
    Ok,
    Err(&'a [u8]),
}

/// Longest control line accepted before the stream is declared broken.
const MAX_LINE: usize = 64 * 1024;
/// Largest message payload accepted.
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// Incremental parser; keep one per connection.
#[derive(Debug, Default)]
pub struct NatsParser {
    pending: Vec<u8>,
}

impl NatsParser {
    /// Feeds the next bytes of the stream, calling `on` for every complete event.
    pub fn feed(&mut self, data: &[u8], on: &mut impl FnMut(Event<'_>)) -> Result<()> {
        if self.pending.is_empty() {
            let used = parse(data, on)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            self.pending.extend_from_slice(data);
            let used = parse(&self.pending, on)?;
            self.pending.drain(..used);
        }
        Ok(())
    }

    /// Bytes held back waiting for the rest of a message.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Parses every complete event in `buf`; returns the bytes consumed.
fn parse(buf: &[u8], on: &mut impl FnMut(Event<'_>)) -> Result<usize> {
    let mut pos = 0;
    while pos < buf.len() {
        let Some(nl) = memchr(b'\n', &buf[pos..]) else {
            if buf.len() - pos > MAX_LINE {
                bail!("NATS control line longer than {MAX_LINE} bytes");
            }
            break;
        };
        let line_end = pos + nl + 1;
        let line = trim_crlf(&buf[pos..line_end]);
        let (op, args) = match memchr(b' ', line) {
            Some(sp) => (&line[..sp], &line[sp + 1..]),
            None => (line, &line[line.len()..]),
        };
        match op {
            b"MSG" | b"msg" => {
                let (subject, sid, size) = msg_args(args)?;
                let end = line_end + size + 2;
                if end > buf.len() {
                    break; // payload not complete yet
                }
                if &buf[end - 2..end] != b"\r\n" {
                    bail!("NATS MSG payload not followed by CRLF");
                }
                on(Event::Msg {
                    subject,
                    sid,
                    payload: &buf[line_end..end - 2],
                });
                pos = end;
                continue;
            }
            b"PING" | b"ping" => on(Event::Ping),
            b"PONG" | b"pong" => on(Event::Pong),
            b"+OK" | b"+ok" => on(Event::Ok),
            b"-ERR" | b"-err" => on(Event::Err(args)),
            b"INFO" | b"info" => on(Event::Info(args)),
            _ => bail!("unexpected NATS line {:?}", String::from_utf8_lossy(line)),
        }
        pos = line_end;
    }
    Ok(pos)
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `MSG <subject> <sid> [reply-to] <#bytes>`
fn msg_args(args: &[u8]) -> Result<(&[u8], u64, usize)> {
    let mut parts = args.split(|&b| b == b' ' || b == b'\t').filter(|p| !p.is_empty());
    let subject = parts.next();
    let sid = parts.next();
    let third = parts.next();
    let fourth = parts.next();
    let (Some(subject), Some(sid), Some(third)) = (subject, sid, third) else {
        bail!("short NATS MSG line {:?}", String::from_utf8_lossy(args));
    };
    let size = fourth.unwrap_or(third);
    let (Some(sid), Some(size)) = (number(sid), number(size)) else {
        bail!("bad NATS MSG line {:?}", String::from_utf8_lossy(args));
    };
    if size as usize > MAX_PAYLOAD {
        bail!("NATS MSG of {size} bytes is over the {MAX_PAYLOAD}-byte limit");
    }
    Ok((subject, sid, size as usize))
}

fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |v, &b| {
        let d = b.wrapping_sub(b'0');
        (d <= 9).then(|| v * 10 + u64::from(d))
    })
}

/// The `CONNECT` the load generator sends: no echo, no verbose `+OK`s.
pub fn connect(out: &mut Vec<u8>) {
    out.extend_from_slice(
        br#"CONNECT {"verbose":false,"pedantic":false,"protocol":1,"echo":false,"headers":false,"name":"loadtest","lang":"rust","version":"0.1"}"#,
    );
    out.extend_from_slice(b"\r\n");
}

pub fn sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    push_number(out, sid);
    out.extend_from_slice(b"\r\n");
}

pub fn publish(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    push_number(out, payload.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

pub fn ping(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PING\r\n");
}

pub fn pong(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PONG\r\n");
}

pub fn push_number(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Msg(Vec<u8>, u64, Vec<u8>),
        Info(Vec<u8>),
        Ping,
        Pong,
        Ok,
        Err(Vec<u8>),
    }

    fn collect(parser: &mut NatsParser, chunks: &[&[u8]]) -> Result<Vec<Owned>> {
        let mut out = Vec::new();
        for c in chunks {
            parser.feed(c, &mut |e| {
                out.push(match e {
                    Event::Msg { subject, sid, payload } => Owned::Msg(subject.to_vec(), sid, payload.to_vec()),
                    Event::Info(i) => Owned::Info(i.to_vec()),
                    Event::Ping => Owned::Ping,
                    Event::Pong => Owned::Pong,
                    Event::Ok => Owned::Ok,
                    Event::Err(e) => Owned::Err(e.to_vec()),
                })
            })?;
        }
        Ok(out)
    }

    fn stream() -> (Vec<u8>, Vec<Owned>) {
        let mut s = Vec::new();
        s.extend_from_slice(b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n");
        s.extend_from_slice(b"MSG bench 1 5\r\nhello\r\n");
        s.extend_from_slice(b"PING\r\n");
        // A payload containing CRLF and protocol words must not confuse the parser.
        s.extend_from_slice(b"MSG room.a 22 inbox.1 13\r\nPING\r\nMSG x\r\n\r\n");
        s.extend_from_slice(b"MSG empty 3 0\r\n\r\n");
        s.extend_from_slice(b"+OK\r\nPONG\r\n-ERR 'Slow Consumer'\r\n");
        let want = vec![
            Owned::Info(b"{\"server_id\":\"x\",\"max_payload\":1048576}".to_vec()),
            Owned::Msg(b"bench".to_vec(), 1, b"hello".to_vec()),
            Owned::Ping,
            Owned::Msg(b"room.a".to_vec(), 22, b"PING\r\nMSG x\r\n".to_vec()),
            Owned::Msg(b"empty".to_vec(), 3, Vec::new()),
            Owned::Ok,
            Owned::Pong,
            Owned::Err(b"'Slow Consumer'".to_vec()),
        ];
        (s, want)
    }

    #[test]
    fn whole_stream_in_one_chunk() {
        let (s, want) = stream();
        let mut p = NatsParser::default();
        assert_eq!(collect(&mut p, &[&s]).unwrap(), want);
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let (s, want) = stream();
        for cut in 0..=s.len() {
            let mut p = NatsParser::default();
            let got = collect(&mut p, &[&s[..cut], &s[cut..]]).unwrap();
            assert_eq!(got, want, "split at {cut}");
            assert_eq!(p.pending(), 0);
        }
    }

    #[test]
    fn byte_at_a_time_gives_the_same_events() {
        let (s, want) = stream();
        let chunks: Vec<&[u8]> = s.chunks(1).collect();
        let mut p = NatsParser::default();
        assert_eq!(collect(&mut p, &chunks).unwrap(), want);
    }

    #[test]
    fn incomplete_message_is_held_not_emitted() {
        let mut p = NatsParser::default();
        assert!(collect(&mut p, &[b"MSG a 1 10\r\n01234"]).unwrap().is_empty());
        assert_eq!(p.pending(), 17);
    }

    #[test]
    fn broken_streams_are_errors() {
        for bad in [
            &b"MSG a 1 3\r\nabcXY"[..],
            b"MSG a\r\n",
            b"MSG a b 3\r\nabc\r\n",
            b"HELLO\r\n",
        ] {
            assert!(collect(&mut NatsParser::default(), &[bad]).is_err(), "{bad:?}");
        }
        let long = vec![b'a'; MAX_LINE + 1];
        assert!(collect(&mut NatsParser::default(), &[&long]).is_err());
    }

    #[test]
    fn encoders_round_trip_through_the_parser() {
        let mut out = Vec::new();
        publish(&mut out, "bench", b"LT1;payload\r\nwith crlf");
        sub(&mut out, "r12", 4_000_000_001);
        ping(&mut out);
        pong(&mut out);
        connect(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("PUB bench 22\r\nLT1;payload\r\nwith crlf\r\nSUB r12 4000000001\r\n"));
        assert!(text.contains("PING\r\nPONG\r\nCONNECT {"));
        assert!(text.ends_with("}\r\n"));
        // A server echoing the PUB as a MSG yields the same payload.
        let msg = b"MSG bench 1 22\r\nLT1;payload\r\nwith crlf\r\n";
        let got = collect(&mut NatsParser::default(), &[msg]).unwrap();
        assert_eq!(
            got,
            vec![Owned::Msg(b"bench".to_vec(), 1, b"LT1;payload\r\nwith crlf".to_vec())]
        );
    }
}
