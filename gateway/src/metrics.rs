//! Metric names and cached handles.
//!
//! Names start with `gateway_` and end with the unit. Handles are registered
//! once per node, so the hot path bumps an atomic instead of looking a metric up
//! by name. The Prometheus recorder is process-wide (installed once), which lets
//! tests run many nodes in one process.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::CloseReason;

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

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
    pub conns_total: Counter,
    pub rooms_active: Gauge,
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
}

impl Metrics {
    pub fn new() -> Self {
        prometheus();
        Self {
            conns_active: gauge!("gateway_conns_active"),
            conns_total: counter!("gateway_conns_total"),
            rooms_active: gauge!("gateway_rooms_active"),
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
        }
    }

    /// Counts a closed connection by reason.
    pub fn closed(&self, reason: CloseReason) {
        counter!("gateway_closes_total", "reason" => reason.label()).increment(1);
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
