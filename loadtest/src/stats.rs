//! Measurement: latency histograms, delivery counts per phase, and the
//! per-subscriber bookkeeping that feeds them.
//!
//! All connection tasks run on one thread (a current-thread runtime with a
//! `LocalSet`), so they share one [`Recorder`] through `Rc<RefCell<_>>` with
//! no locks; a subscriber borrows it once per TCP read, not once per message.

use std::cell::RefCell;
use std::rc::Rc;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::clock::{Stamp, StampFinder};
use crate::seq::{Seen, SeqTracker};

/// Latency histogram in microseconds, 1 us to 1 hour, 3 significant digits.
#[derive(Clone, Debug)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Hist {
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> Latency {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1_000.0;
        Latency {
            count: self.0.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.0.max() as f64 / 1_000.0,
        }
    }
}

/// Percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Deliveries of one phase, attributed by the phase written in each payload,
/// so late arrivals still count for the phase that sent them.
#[derive(Debug, Default)]
pub struct PhaseStats {
    pub latency: Hist,
    pub unique: u64,
    pub duplicates: u64,
    /// Stamps dated in the future (the wall clock stepped back).
    pub future_stamps: u64,
}

#[derive(Debug, Default)]
pub struct Recorder {
    phases: Vec<PhaseStats>,
    /// Sequence numbers beyond a tracker's span.
    pub out_of_range: u64,
    /// Frames without a stamp that a subscriber received (replies, pings).
    pub unstamped: u64,
    /// New deliveries whose latency was recorded (all of them unless the
    /// scenario measures a sample of its subscribers).
    pub measured: u64,
}

impl Recorder {
    pub fn shared() -> Rc<RefCell<Recorder>> {
        Rc::new(RefCell::new(Recorder::default()))
    }

    pub fn phase(&mut self, k: u32) -> &mut PhaseStats {
        let k = k as usize;
        if k >= self.phases.len() {
            self.phases.resize_with(k + 1, PhaseStats::default);
        }
        &mut self.phases[k]
    }

    pub fn unique(&self, k: u32) -> u64 {
        self.phases.get(k as usize).map_or(0, |p| p.unique)
    }
}

/// One subscriber's view: a tracker per publisher.
#[derive(Debug, Default)]
pub struct SubscriberBook {
    trackers: Vec<SeqTracker>,
    finder: StampFinder,
}

impl SubscriberBook {
    /// Accounts one received payload read at `now_ns`.
    #[cfg(test)]
    pub fn on_payload(&mut self, rec: &mut Recorder, payload: &[u8], now_ns: u64) {
        self.on_payload_as(rec, payload, Some(now_ns));
    }

    /// Accounts one received payload; its latency is recorded only with a
    /// read time (`None`: counted for loss and duplicates only).
    pub fn on_payload_as(&mut self, rec: &mut Recorder, payload: &[u8], now_ns: Option<u64>) {
        let Some(stamp) = self.finder.find(payload) else {
            rec.unstamped += 1;
            return;
        };
        self.account_as(rec, &stamp, now_ns);
    }

    #[cfg(test)]
    pub fn account(&mut self, rec: &mut Recorder, stamp: &Stamp, now_ns: u64) {
        self.account_as(rec, stamp, Some(now_ns));
    }

    fn account_as(&mut self, rec: &mut Recorder, stamp: &Stamp, now_ns: Option<u64>) {
        let p = stamp.publisher as usize;
        if p >= self.trackers.len() {
            self.trackers.resize_with(p + 1, SeqTracker::default);
        }
        match self.trackers[p].observe(stamp.seq) {
            Seen::New => {
                let Some(now_ns) = now_ns else {
                    rec.phase(stamp.phase).unique += 1;
                    return;
                };
                rec.measured += 1;
                let phase = rec.phase(stamp.phase);
                phase.unique += 1;
                match stamp.latency_us(now_ns) {
                    Some(us) => phase.latency.record_us(us),
                    None => phase.future_stamps += 1,
                }
            }
            Seen::Duplicate => rec.phase(stamp.phase).duplicates += 1,
            Seen::OutOfRange => rec.out_of_range += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::PayloadTemplate;

    #[test]
    fn deliveries_are_attributed_to_the_phase_in_the_payload() {
        let mut rec = Recorder::default();
        let mut book = SubscriberBook::default();
        let mut t = PayloadTemplate::new(100);
        let now = 10_000_000_000;
        for seq in 0..10 {
            let phase = if seq < 6 { 1 } else { 2 };
            let p = t
                .stamp(&Stamp {
                    sent_ns: now - 5_000_000,
                    seq,
                    phase,
                    publisher: 0,
                })
                .to_vec();
            book.on_payload(&mut rec, &p, now);
        }
        // A duplicate of phase 1 and a second publisher's seq 0 (not a duplicate).
        let dup = t
            .stamp(&Stamp {
                sent_ns: now,
                seq: 3,
                phase: 1,
                publisher: 0,
            })
            .to_vec();
        book.on_payload(&mut rec, &dup, now);
        let other = t
            .stamp(&Stamp {
                sent_ns: now,
                seq: 3,
                phase: 2,
                publisher: 1,
            })
            .to_vec();
        book.on_payload(&mut rec, &other, now);
        book.on_payload(&mut rec, br#"{"id":4,"ok":{}}"#, now);
        assert_eq!((rec.unique(1), rec.phase(1).duplicates), (6, 1));
        assert_eq!((rec.unique(2), rec.phase(2).duplicates), (5, 0));
        assert_eq!(rec.unstamped, 1);
        let lat = rec.phase(1).latency.summary();
        assert_eq!(lat.count, 6);
        assert!((lat.p50_ms - 5.0).abs() < 0.01, "{lat:?}");
    }

    #[test]
    fn future_stamps_are_counted_not_recorded() {
        let mut rec = Recorder::default();
        let mut book = SubscriberBook::default();
        let s = Stamp {
            sent_ns: 2_000,
            seq: 0,
            phase: 0,
            publisher: 0,
        };
        book.account(&mut rec, &s, 1_000);
        assert_eq!(
            (rec.unique(0), rec.phase(0).future_stamps, rec.phase(0).latency.count()),
            (1, 1, 0)
        );
    }

    #[test]
    fn histogram_percentiles_are_in_milliseconds() {
        let mut h = Hist::default();
        for us in 1..=1000 {
            h.record_us(us * 1000);
        }
        let s = h.summary();
        assert!(
            (s.p50_ms - 500.0).abs() < 1.0 && (s.p99_ms - 990.0).abs() < 1.0,
            "{s:?}"
        );
        assert!((s.max_ms - 1000.0).abs() < 1.0);
    }
}
