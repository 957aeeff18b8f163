//! The HTTP side of a node: the router (`/ws`, `/healthz`, `/readyz`,
//! `/metrics`), the server API on its own listener (`api`), the listener and the accept loop (`listener`), the
//! WebSocket upgrade (`upgrade`), and the browser files (`web`: the client
//! SDK, and in dev mode the demo page and its token endpoint). `serve` runs a [`Node`] on a bound
//! listener until shutdown and then drains it.
//!
//! Owns HTTP only: what a connection does is `conn`, the services are `node`.

pub mod api;
mod listener;
mod upgrade;
pub mod web;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::net::TcpListener;

use crate::broker::Bus;
use crate::metrics;
use crate::node::{DrainReport, Node, drain};
use crate::rooms;
pub use listener::listen;
pub use upgrade::{PROTOCOL_JSON, PROTOCOL_PROTO};

/// Serves the node on `listener` until `shutdown` resolves, then drains.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: impl Future<Output = ()>) -> DrainReport {
    let router = router(node.clone());
    node.start_services();
    let accept = listener::accept_loop(node.clone(), listener, router);
    tokio::pin!(accept);
    tokio::select! {
        () = &mut accept => {}
        () = shutdown => {}
    }
    // The listener stays open while the node drains: `/healthz` answers 200,
    // `/readyz` 503 and a WebSocket upgrade 503, each on a connection that
    // serves one request; it closes when the drain is over.
    let drained = drain(&node);
    tokio::pin!(drained);
    loop {
        tokio::select! {
            report = &mut drained => return report,
            () = &mut accept => {}
        }
    }
}

/// The HTTP routes of a node.
pub fn router(node: Arc<Node>) -> Router {
    let mut r = Router::new()
        .route("/ws", get(upgrade::ws_upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/api/{*method}", any(api::not_on_client_port));
    if node.cfg.metrics_listen.is_none() {
        r = r.route("/metrics", get(metrics_text));
    }
    r = web::routes(r, node.cfg.dev_mode);
    r.with_state(node)
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    }
}

async fn metrics_text(State(node): State<Arc<Node>>) -> Response {
    let m = &node.metrics;
    m.conns_active.set(node.conns_active() as f64);
    m.conns_limit.set(node.cfg.max_connections as f64);
    m.rooms_active.set(node.rooms.len() as f64);
    m.history_bytes.set(node.rooms.history_bytes() as f64);
    // The flushers count in their own atomics (no metric call per write).
    let flushed = node.rooms.flushers().stats();
    m.flusher_writes_total.absolute(flushed.writes);
    m.flusher_frames_total.absolute(flushed.frames);
    m.flusher_handoffs_total.absolute(flushed.handoffs);
    if let Bus::Nats(n) = &node.bus {
        metrics::nats_connected(n.is_connected());
    }
    let tree = node.rooms.tree_stats();
    m.tree_shard_runs_total.absolute(tree.batches.load(Ordering::Relaxed));
    m.tree_deliveries_total
        .absolute(tree.deliveries.load(Ordering::Relaxed));
    m.tree_overruns_total.absolute(tree.overruns.load(Ordering::Relaxed));
    m.tree_shards.set(tree.shards.load(Ordering::Relaxed) as f64);
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    m.tasks_alive.set(tasks as f64);
    let mut text = metrics::prometheus().render();
    metrics::render_histograms(&mut text);
    if node.cfg.room_metrics_top > 0 {
        // Room names are user data (`dm:alice:bob`): only operator-listed
        // patterns are shown by name, everything else is summed in `_other`.
        let patterns = &node.cfg.room_metrics_rooms;
        let shown = |room: &str| room != rooms::OTHER_ROOMS && patterns.iter().any(|p| p.matches(room));
        let rooms = node.rooms.top_rooms(node.cfg.room_metrics_top, shown);
        rooms::render_metrics(&mut text, &rooms);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Serves `/metrics` alone (for `--metrics-listen`).
pub async fn serve_metrics(node: Arc<Node>, listener: TcpListener) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(node.clone());
    let token = node.shutdown.clone();
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await;
}
