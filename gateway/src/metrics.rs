//! Metric names and cached handles.
//!
//! Names start with `gateway_` and end with the unit. Handles are registered
//! once per node, so the hot path bumps an atomic instead of looking a metric up
//! by name. The Prometheus recorder is process-wide (installed once), which lets
//! tests run many nodes in one process.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, counter, describe_gauge, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::CloseReason;

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the node folds the exporter's buffered histogram samples into
/// their buckets ([`PrometheusHandle::run_upkeep`]), so memory stays bounded
/// between scrapes.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ])
                .expect("static buckets are valid")
                // A count of rooms, not seconds.
                .set_buckets_for_metric(
                    Matcher::Full("gateway_subscribe_rooms".into()),
                    &[1.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 2_000.0, 5_000.0],
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is already installed (embedding
            // applications); then their recorder gets our metrics.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Handles for one node's metrics.
pub struct Metrics {
    pub conns_active: Gauge,
    /// `--max-connections` (`gateway_conns_limit`), for the share in use.
    pub conns_limit: Gauge,
    pub conns_total: Counter,
    pub rooms_active: Gauge,
    /// Encoded bytes of stored history across the node's rooms (set at scrape).
    pub history_bytes: Gauge,
    pub published_total: Counter,
    pub deduplicated_total: Counter,
    pub deliveries_total: Counter,
    pub slow_closes_total: Counter,
    pub bad_frames_total: Counter,
    pub publish_seconds: Histogram,
    pub subscribe_rooms: Histogram,
    /// Flushers: write calls, frames written (frames / writes = batching),
    /// and sockets handed to their connection's task because they were full.
    pub flusher_writes_total: Counter,
    pub flusher_frames_total: Counter,
    pub flusher_handoffs_total: Counter,
    /// The node tier (rooms above `--tree-threshold`): shard runs (a task
    /// took one shard's waiting messages), deliveries queued by shards, and
    /// shards that fell more than the outbox frame cap behind.
    pub tree_shard_runs_total: Counter,
    pub tree_deliveries_total: Counter,
    pub tree_overruns_total: Counter,
    /// Shards of split rooms on the node now.
    pub tree_shards: Gauge,
    /// Tasks alive in the node's async runtime (connections, flushers, bus,
    /// services), as of the last scrape: a leak shows here first in a soak.
    pub tasks_alive: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        prometheus();
        // Series that exist from the start (at 0), so rates and dashboards
        // show 0 instead of no data before the first event.
        for source in ["cache", "stream"] {
            counter!("gateway_history_pages_total", "source" => source).increment(0);
        }
        for code in CLOSE_CODE_LABELS {
            counter!("gateway_disconnects_total", "code" => code).increment(0);
        }
        describe_gauge!("gateway_tasks_alive", "Tasks alive in the node's async runtime.");
        // Counted by `rooms::budget`.
        counter!("gateway_history_evicted_rooms_total").increment(0);
        Self {
            conns_active: gauge!("gateway_conns_active"),
            conns_limit: gauge!("gateway_conns_limit"),
            conns_total: counter!("gateway_conns_total"),
            rooms_active: gauge!("gateway_rooms_active"),
            history_bytes: gauge!("gateway_history_bytes"),
            published_total: counter!("gateway_published_messages_total"),
            deduplicated_total: counter!("gateway_deduplicated_messages_total"),
            deliveries_total: counter!("gateway_deliveries_total"),
            slow_closes_total: counter!("gateway_slow_closes_total"),
            bad_frames_total: counter!("gateway_bad_frames_total"),
            publish_seconds: histogram!("gateway_publish_seconds"),
            subscribe_rooms: histogram!("gateway_subscribe_rooms"),
            flusher_writes_total: counter!("gateway_flusher_writes_total"),
            flusher_frames_total: counter!("gateway_flusher_frames_total"),
            flusher_handoffs_total: counter!("gateway_flusher_handoffs_total"),
            tree_shard_runs_total: counter!("gateway_tree_shard_runs_total"),
            tree_deliveries_total: counter!("gateway_tree_deliveries_total"),
            tree_overruns_total: counter!("gateway_tree_overruns_total"),
            tree_shards: gauge!("gateway_tree_shards"),
            tasks_alive: gauge!("gateway_tasks_alive"),
        }
    }

    /// Counts a closed connection by reason, and by the close code it ended
    /// with (`gateway_disconnects_total{code}`, see [`close_code_label`]).
    pub fn closed(&self, reason: CloseReason) {
        counter!("gateway_closes_total", "reason" => reason.label()).increment(1);
        counter!("gateway_disconnects_total", "code" => close_code_label(reason)).increment(1);
    }

    /// Counts a refused token by reason.
    pub fn auth_failed(&self, reason: &'static str) {
        counter!("gateway_auth_failures_total", "reason" => reason).increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// Rate limits and admission control (`limits`). Handles are made once per
// node and cached there.

/// `rate_limited` replies by limit.
pub fn rate_limited(limit: &'static str) -> Counter {
    counter!("gateway_rate_limited_total", "limit" => limit)
}

/// Upgrades refused before the upgrade, by reason.
pub fn admission_refused(reason: &'static str) -> Counter {
    counter!("gateway_admission_refused_total", "reason" => reason)
}

/// Keyed limiters reset because they held more than `rate_limit_max_keys` keys.
pub fn rate_limit_resets() -> Counter {
    counter!("gateway_rate_limit_resets_total")
}

/// Keys held by the keyed limiters (users, rooms, addresses), as of the last sweep.
pub fn rate_limit_keys() -> Gauge {
    gauge!("gateway_rate_limit_keys")
}

/// Upgrades admitted and not yet through `connect`, as of the last sweep.
pub fn handshakes_in_progress() -> Gauge {
    gauge!("gateway_handshakes_in_progress")
}

/// Handshakes closed with 4001 to make room in a full handshake table.
pub fn handshakes_shed() -> Counter {
    counter!("gateway_handshakes_shed_total")
}

/// Counts a JWKS fetch by what started it (`refresh`, `unknown_kid`) and how it ended.
pub fn jwks_fetched(trigger: &'static str, result: &'static str) {
    counter!("gateway_jwks_fetches_total", "trigger" => trigger, "result" => result).increment(1);
}

/// Counts an unknown-`kid` refetch skipped by the rate limit.
pub fn jwks_refetch_limited() {
    counter!("gateway_jwks_refetches_limited_total").increment(1);
}

/// Counts a TLS certificate reload by result.
pub fn tls_reloaded(result: &'static str) {
    counter!("gateway_tls_reloads_total", "result" => result).increment(1);
}

/// The `code` label of `gateway_disconnects_total`: the close code the
/// connection ended with (sent by the gateway, or the client's echoed back),
/// `none` when it ended without a close frame (the socket failed or the
/// client vanished), and `other` for a client's code outside 1000 and 1001,
/// so a client cannot grow the label set.
pub fn close_code_label(reason: CloseReason) -> &'static str {
    // Each arm returns one of CLOSE_CODE_LABELS.
    match reason.code() {
        None => "none",
        Some(1000) => "1000",
        Some(1001) => "1001",
        Some(_) if matches!(reason, CloseReason::ClientClosed(_)) => "other",
        Some(1002) => "1002",
        Some(1007) => "1007",
        Some(1009) => "1009",
        Some(1012) => "1012",
        Some(4001) => "4001",
        Some(4008) => "4008",
        Some(4009) => "4009",
        Some(4010) => "4010",
        Some(4029) => "4029",
        Some(_) => "other",
    }
}

/// Every value of `gateway_disconnects_total`'s `code` label.
pub const CLOSE_CODE_LABELS: [&str; 13] = [
    "none", "1000", "1001", "1002", "1007", "1009", "1012", "4001", "4008", "4009", "4010", "4029", "other",
];

/// Counts a `history` page by where it came from: `cache` (this node's room
/// log) or `stream` (read from JetStream because the cache did not hold it).
pub fn history_page(source: &'static str) {
    counter!("gateway_history_pages_total", "source" => source).increment(1);
}

// NATS and JetStream (cluster mode only; absent on an embedded node).

/// Counts a NATS connection loss (`gateway_nats_disconnects_total`).
pub fn nats_disconnected() {
    counter!("gateway_nats_disconnects_total").increment(1);
}

/// Counts a NATS reconnection after a loss (`gateway_nats_reconnects_total`).
pub fn nats_reconnected() {
    counter!("gateway_nats_reconnects_total").increment(1);
}

/// Registers the NATS and JetStream series at 0 (cluster mode, at start).
pub fn nats_registered() {
    counter!("gateway_nats_disconnects_total").increment(0);
    counter!("gateway_nats_reconnects_total").increment(0);
    for kind in ["timeout", "not_connected", "error"] {
        counter!("gateway_jetstream_publish_errors_total", "kind" => kind).increment(0);
    }
}

/// Sets `gateway_nats_connected`: 1 while the node can publish to NATS, 0 otherwise.
pub fn nats_connected(up: bool) {
    gauge!("gateway_nats_connected").set(if up { 1.0 } else { 0.0 });
}

/// JetStream publish time, from the send to the stream's acknowledgement
/// (`gateway_jetstream_publish_seconds`, successful publishes only).
pub fn jetstream_publish_seconds() -> Histogram {
    histogram!("gateway_jetstream_publish_seconds")
}

/// Counts a failed JetStream publish by kind: `timeout` (no acknowledgement
/// within `--nats-publish-timeout-ms`), `not_connected` (refused at once
/// while NATS is down), `error` (the send or the acknowledgement failed).
pub fn jetstream_publish_failed(kind: &'static str) {
    counter!("gateway_jetstream_publish_errors_total", "kind" => kind).increment(1);
}

/// A Prometheus histogram with fixed buckets, recorded with a few relaxed
/// atomic adds and no allocation: for the fan-out path, where one message
/// records once per node (not once per member). Process-wide, like the
/// recorder; rendered by [`render_histograms`].
pub struct AtomicHistogram {
    name: &'static str,
    help: &'static str,
    /// Upper bounds (`le`), nanoseconds, ascending.
    bounds: &'static [u64],
    /// One per bound plus `+Inf`, not cumulative.
    buckets: [AtomicU64; MAX_BUCKETS + 1],
    /// Sum of the recorded values, nanoseconds.
    sum_nanos: AtomicU64,
}

const MAX_BUCKETS: usize = 16;

impl AtomicHistogram {
    const fn new(name: &'static str, help: &'static str, bounds: &'static [u64]) -> Self {
        assert!(bounds.len() <= MAX_BUCKETS);
        Self {
            name,
            help,
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    #[inline]
    pub fn record(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds.partition_point(|&b| b < nanos);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets[..=self.bounds.len()]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Appends the histogram in the Prometheus text format (`_bucket{le}`
    /// cumulative, `_sum` in seconds, `_count`).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = self.name;
        let _ = writeln!(out, "# HELP {name} {}", self.help);
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let le = *bound as f64 / 1e9;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

const US: u64 = 1_000;
const MS: u64 = 1_000_000;

/// Latency bucket bounds, nanoseconds: 10 µs to 10 s in 1-2.5-5 steps. Each
/// histogram takes the run that fits what it measures.
const LATENCY_BOUNDS: [u64; 19] = [
    10 * US,
    25 * US,
    50 * US,
    100 * US,
    250 * US,
    500 * US,
    MS,
    2 * MS + MS / 2,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    1_000 * MS,
    2_500 * MS,
    5_000 * MS,
    10_000 * MS,
];

/// `gateway_fanout_seconds`: per message and node, from the message's arrival
/// on the node (a publish on the embedded bus, or a message received from
/// NATS, before decoding) to the last local member's outbox having it queued
/// (the sockets are written after, by the flushers). Includes waiting for the
/// room's lock. Recorded by the bus (`broker`), so the room log's messages
/// stay as small as they were; messages applied later, after a gap was
/// repaired, are not observed. Buckets 10 µs to 1 s.
pub static FANOUT_SECONDS: AtomicHistogram = AtomicHistogram::new(
    "gateway_fanout_seconds",
    "Time from a message's arrival on the node to the last local member queued, per message",
    LATENCY_BOUNDS.split_at(16).0,
);

/// `gateway_publish_delivery_seconds`: per message and node, from the
/// publish being accepted (the message's `ts`, taken on the node the client
/// published to, millisecond resolution) to the last local member queued on
/// this node. Across nodes it includes the JetStream round trip and any clock
/// offset between the two hosts. Buckets 1 ms to 10 s.
pub static PUBLISH_DELIVERY_SECONDS: AtomicHistogram = AtomicHistogram::new(
    "gateway_publish_delivery_seconds",
    "Time from the publish being accepted (the message ts, ms resolution) to the last local member queued on this node",
    LATENCY_BOUNDS.split_at(6).1,
);

/// Records one fanned-out message: its fan-out time (`since_arrival`) and
/// its publish-to-delivery time (since `ts_ms`, the publish time in
/// milliseconds since the Unix epoch; a `ts` in the future counts as 0).
/// Called once per message per node, after the broadcast.
#[inline]
pub fn fanned_out(since_arrival: Duration, ts_ms: u64) {
    FANOUT_SECONDS.record(since_arrival);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    PUBLISH_DELIVERY_SECONDS.record(now.saturating_sub(Duration::from_millis(ts_ms)));
}

/// Appends the process-wide fixed-bucket histograms to a `/metrics` text.
pub fn render_histograms(out: &mut String) {
    FANOUT_SECONDS.render(out);
    PUBLISH_DELIVERY_SECONDS.render(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cost of [`fanned_out`] (both histograms' records), for
    /// docs/benchmarks.md: `cargo test --release -p gateway --lib
    /// metrics::tests::fanned_out_cost -- --ignored --nocapture`. Prints
    /// nanoseconds per call; asserts nothing about time.
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn fanned_out_cost() {
        const N: u32 = 10_000_000;
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let started = std::time::Instant::now();
        for i in 0..N {
            fanned_out(Duration::from_micros(u64::from(i % 5_000)), std::hint::black_box(ts));
        }
        let per = started.elapsed().as_nanos() as f64 / f64::from(N);
        println!("fanned_out: {per:.1} ns per call ({N} calls)");
    }

    #[test]
    fn atomic_histogram_buckets_are_upper_inclusive_and_cumulative() {
        static H: AtomicHistogram = AtomicHistogram::new("h_seconds", "test", &[MS, 10 * MS]);
        H.record(Duration::from_micros(500));
        H.record(Duration::from_millis(1));
        H.record(Duration::from_millis(5));
        H.record(Duration::from_secs(1));
        assert_eq!(H.count(), 4);
        let mut out = String::new();
        H.render(&mut out);
        assert!(out.contains("h_seconds_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{le=\"0.01\"} 3\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("h_seconds_sum 1.0065\n"), "{out}");
        assert!(out.contains("h_seconds_count 4\n"), "{out}");
    }

    #[test]
    fn latency_histograms_take_their_bucket_runs() {
        assert_eq!(FANOUT_SECONDS.bounds.first(), Some(&(10 * US)));
        assert_eq!(FANOUT_SECONDS.bounds.last(), Some(&(1_000 * MS)));
        assert_eq!(PUBLISH_DELIVERY_SECONDS.bounds.first(), Some(&MS));
        assert_eq!(PUBLISH_DELIVERY_SECONDS.bounds.last(), Some(&(10_000 * MS)));
        for h in [&FANOUT_SECONDS, &PUBLISH_DELIVERY_SECONDS] {
            assert!(h.bounds.windows(2).all(|w| w[0] < w[1]), "{}", h.name);
        }
    }

    #[test]
    fn disconnect_codes_are_bounded() {
        assert_eq!(close_code_label(CloseReason::SlowConsumer), "4009");
        assert_eq!(close_code_label(CloseReason::NodeDraining), "1012");
        assert_eq!(close_code_label(CloseReason::ClientGone), "none");
        assert_eq!(close_code_label(CloseReason::ClientClosed(None)), "1000");
        assert_eq!(close_code_label(CloseReason::ClientClosed(Some(1001))), "1001");
        assert_eq!(close_code_label(CloseReason::ClientClosed(Some(4009))), "other");
        assert_eq!(close_code_label(CloseReason::ClientClosed(Some(3999))), "other");
        for reason in [
            CloseReason::ClientGone,
            CloseReason::ClientClosed(None),
            CloseReason::ClientClosed(Some(1001)),
            CloseReason::ClientClosed(Some(3000)),
            CloseReason::TooLarge,
            CloseReason::NodeDraining,
            CloseReason::Unauthorized,
            CloseReason::PolicyViolation,
            CloseReason::SlowConsumer,
            CloseReason::TokenExpired,
            CloseReason::TooManyConnections,
            CloseReason::IdleTimeout,
            CloseReason::ProtocolError,
            CloseReason::BadPayload,
        ] {
            assert!(CLOSE_CODE_LABELS.contains(&close_code_label(reason)), "{reason:?}");
        }
    }
}
