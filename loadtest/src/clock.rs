//! The latency clock: send timestamps written into payloads and read back.
//!
//! Owns the payload layout every scenario and target shares, so the gateway and
//! nats-server are measured with the same bytes and the same clock. A payload
//! starts with a fixed-width stamp:
//!
//! ```text
//! LT1;t=<19 digits: wall-clock ns>;s=<12 digits: seq>;k=<4 digits: phase>;p=<3 digits: publisher>;xxxx...
//! ```
//!
//! Fixed width means the reader finds the stamp with one substring search and
//! reads digits at known offsets: no JSON parse, no allocation. The clock is
//! the wall clock (`CLOCK_REALTIME`, a vDSO call), so stamps written by one
//! load-generator process can be read by another on the same machine. The
//! publisher stamps the *scheduled* send time, not the time the write happened,
//! so a publisher held back by a slow server shows up as latency instead of
//! silently lowering the rate (no coordinated omission).

use std::time::{SystemTime, UNIX_EPOCH};

use memchr::memmem;

/// The marker that starts every stamp.
pub const MARKER: &[u8] = b"LT1;t=";
/// Bytes of the stamp, marker included; a payload is at least this long.
pub const STAMP_LEN: usize = 54;

const T_AT: usize = 6;
const S_AT: usize = 28;
const K_AT: usize = 43;
const P_AT: usize = 50;

/// Nanoseconds since the Unix epoch on the wall clock.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What a payload carries: when it was due to be sent and which message it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Scheduled send time, ns since the epoch.
    pub sent_ns: u64,
    /// Per-publisher sequence number, from 0.
    pub seq: u64,
    /// Phase (load step) the message belongs to.
    pub phase: u32,
    /// Publisher index.
    pub publisher: u16,
}

impl Stamp {
    pub const MAX_SEQ: u64 = 999_999_999_999;
    pub const MAX_PHASE: u32 = 9_999;
    pub const MAX_PUBLISHER: u16 = 999;

    /// Latency to `now_ns` in microseconds; `None` when the stamp lies in the
    /// future (the wall clock stepped back), which the caller counts.
    pub fn latency_us(&self, now_ns: u64) -> Option<u64> {
        now_ns.checked_sub(self.sent_ns).map(|d| d / 1_000)
    }
}

/// A publisher's send schedule for one phase: message `i` is due at
/// `start + i / rate`, and that due time is its stamp.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start_ns: u64,
    /// Messages per second.
    rate: f64,
}

impl Schedule {
    pub fn new(start_ns: u64, rate: f64) -> Self {
        Self {
            start_ns,
            rate: rate.max(1e-9),
        }
    }

    /// How many messages are due `elapsed_s` seconds after the start.
    pub fn due_by(&self, elapsed_s: f64) -> u64 {
        (elapsed_s.max(0.0) * self.rate) as u64 + 1
    }

    /// The stamp of message `i`.
    pub fn stamp_ns(&self, i: u64) -> u64 {
        self.start_ns + (i as f64 * 1e9 / self.rate) as u64
    }
}

/// A reusable payload buffer: the layout is written once, each message only
/// overwrites the digits.
#[derive(Clone, Debug)]
pub struct PayloadTemplate {
    buf: Vec<u8>,
}

impl PayloadTemplate {
    /// A payload of exactly `size` bytes (at least [`STAMP_LEN`]).
    pub fn new(size: usize) -> Self {
        let size = size.max(STAMP_LEN);
        let mut buf = Vec::with_capacity(size);
        buf.extend_from_slice(b"LT1;t=0000000000000000000;s=000000000000;k=0000;p=000;");
        debug_assert_eq!(buf.len(), STAMP_LEN);
        buf.resize(size, b'x');
        Self { buf }
    }

    /// Writes `stamp` and returns the payload.
    pub fn stamp(&mut self, stamp: &Stamp) -> &[u8] {
        write_digits(&mut self.buf[T_AT..T_AT + 19], stamp.sent_ns);
        write_digits(&mut self.buf[S_AT..S_AT + 12], stamp.seq.min(Stamp::MAX_SEQ));
        write_digits(
            &mut self.buf[K_AT..K_AT + 4],
            u64::from(stamp.phase.min(Stamp::MAX_PHASE)),
        );
        write_digits(
            &mut self.buf[P_AT..P_AT + 3],
            u64::from(stamp.publisher.min(Stamp::MAX_PUBLISHER)),
        );
        &self.buf
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buf.len()
    }
}

/// Finds stamps in received bytes. Build one per reader and reuse it: the
/// substring searcher is precomputed.
pub struct StampFinder {
    finder: memmem::Finder<'static>,
}

impl std::fmt::Debug for StampFinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StampFinder")
    }
}

impl Default for StampFinder {
    fn default() -> Self {
        Self {
            finder: memmem::Finder::new(MARKER),
        }
    }
}

impl StampFinder {
    /// The first stamp in `bytes`, or `None` when there is none or it is
    /// malformed (truncated, non-digits, wrong separators).
    pub fn find(&self, bytes: &[u8]) -> Option<Stamp> {
        let at = self.finder.find(bytes)?;
        let s = bytes.get(at..at + STAMP_LEN)?;
        if s[T_AT + 19] != b';' || &s[S_AT - 2..S_AT] != b"s=" || &s[K_AT - 2..K_AT] != b"k=" {
            return None;
        }
        if &s[P_AT - 2..P_AT] != b"p=" || s[STAMP_LEN - 1] != b';' {
            return None;
        }
        Some(Stamp {
            sent_ns: read_digits(&s[T_AT..T_AT + 19])?,
            seq: read_digits(&s[S_AT..S_AT + 12])?,
            phase: read_digits(&s[K_AT..K_AT + 4])? as u32,
            publisher: read_digits(&s[P_AT..P_AT + 3])? as u16,
        })
    }
}

fn write_digits(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn read_digits(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &b in s {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + u64::from(d);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(sent_ns: u64, seq: u64) -> Stamp {
        Stamp {
            sent_ns,
            seq,
            phase: 7,
            publisher: 3,
        }
    }

    #[test]
    fn stamp_round_trips_at_field_limits() {
        let mut t = PayloadTemplate::new(200);
        let finder = StampFinder::default();
        for s in [
            stamp(0, 0),
            stamp(1_764_201_234_567_890_123, 42),
            Stamp {
                sent_ns: u64::MAX / 2,
                seq: Stamp::MAX_SEQ,
                phase: 9_999,
                publisher: 999,
            },
        ] {
            let bytes = t.stamp(&s).to_vec();
            assert_eq!(bytes.len(), 200);
            assert_eq!(finder.find(&bytes), Some(s));
        }
    }

    #[test]
    fn stamp_is_found_inside_a_json_envelope() {
        let mut t = PayloadTemplate::new(80);
        let s = stamp(1_700_000_000_000_000_000, 9);
        let payload = String::from_utf8(t.stamp(&s).to_vec()).unwrap();
        let frame =
            format!(r#"{{"op":"message","room":"bench","offset":12,"ts":1,"from":"pub-0","data":"{payload}"}}"#);
        assert_eq!(StampFinder::default().find(frame.as_bytes()), Some(s));
    }

    #[test]
    fn truncated_or_corrupt_stamps_are_rejected() {
        let mut t = PayloadTemplate::new(60);
        let bytes = t.stamp(&stamp(123, 4)).to_vec();
        let finder = StampFinder::default();
        assert_eq!(finder.find(&bytes[..STAMP_LEN - 1]), None);
        let mut bad = bytes.clone();
        bad[T_AT + 3] = b'a';
        assert_eq!(finder.find(&bad), None);
        let mut bad = bytes;
        bad[S_AT - 1] = b':';
        assert_eq!(finder.find(&bad), None);
        assert_eq!(finder.find(b"no stamp here"), None);
    }

    #[test]
    fn small_sizes_still_hold_a_whole_stamp() {
        assert_eq!(PayloadTemplate::new(1).len(), STAMP_LEN);
    }

    #[test]
    fn latency_is_receive_minus_scheduled_send_in_micros() {
        let s = stamp(1_000_000_000, 0);
        assert_eq!(s.latency_us(1_000_000_000), Some(0));
        assert_eq!(s.latency_us(1_002_500_999), Some(2_500));
        // A stamp from the future (clock stepped back) is reported, not clamped.
        assert_eq!(s.latency_us(999_999_999), None);
    }

    #[test]
    fn first_message_is_due_at_once_not_one_interval_late() {
        // Regression: counting due messages as floor(elapsed * rate) sent
        // message i at (i + 1) / rate stamped i / rate, adding one whole
        // interval of false latency (100 ms at 10 messages/s).
        let s = Schedule::new(5_000_000_000, 10.0);
        assert_eq!(s.due_by(0.0), 1);
        assert_eq!(s.due_by(0.099), 1);
        assert_eq!(s.due_by(0.1), 2);
        assert_eq!(s.due_by(1.0), 11);
        assert_eq!(s.stamp_ns(0), 5_000_000_000);
        assert_eq!(s.stamp_ns(10), 6_000_000_000);
        // Every message is stamped no later than the moment it becomes due.
        for i in 0..100u64 {
            let due_at = (s.stamp_ns(i) - 5_000_000_000) as f64 / 1e9;
            assert!(s.due_by(due_at + 1e-9) > i, "message {i} not due at its stamp");
        }
    }

    #[test]
    fn clock_measures_a_real_sleep() {
        let mut t = PayloadTemplate::new(100);
        let s = stamp(now_ns(), 1);
        let bytes = t.stamp(&s).to_vec();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let got = StampFinder::default().find(&bytes).unwrap();
        let lat = got.latency_us(now_ns()).unwrap();
        assert!((20_000..2_000_000).contains(&lat), "latency {lat} us");
    }
}
