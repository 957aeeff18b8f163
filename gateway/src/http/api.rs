//! The server API for application backends (`docs/server-api.md`): JSON
//! over HTTP on its own listener (`--api-listen`), authenticated by API key.
//!
//! `POST /api/<method>` with a JSON body and `Authorization: apikey <KEY>`;
//! the answer is `{"ok":{...}}` (HTTP 200) or `{"error":{"code","message"}}`
//! with the client protocol's error codes. In order, a request is checked
//! against the API's own rate limit, its key (every configured key is
//! compared in constant time; a refusal is logged without the key), its body
//! size, then run. The API port serves nothing else (no WebSocket upgrade);
//! the client port answers `/api/...` with 404.
//!
//! Owns the HTTP side of the API only: orders to connections are `control`,
//! publishing is the broker's.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use governor::{DefaultDirectRateLimiter, Quota};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::broker::{BusError, Outgoing};
use crate::control::{API_KEY_MARK, Broadcast, valid_close_code};
use crate::error::{ErrorCode, ProtoError};
use crate::model::RoomId;
use crate::node::Node;
use crate::protocol::Codec;
use crate::rooms::HistoryPage;

/// Most rooms in one `broadcast`.
pub const MAX_BROADCAST_ROOMS: usize = 1_000;
/// Longest `from`, `user` and `key`, bytes.
pub const MAX_NAME_LEN: usize = crate::model::MAX_USER_LEN;
/// The `from` of an API publish that names no sender.
pub const DEFAULT_FROM: &str = "server";

struct Api {
    node: Arc<Node>,
    /// SHA-1 of each key: compared in constant time, at a fixed length.
    keys: Vec<[u8; 20]>,
    limiter: Option<DefaultDirectRateLimiter>,
}

/// Serves the server API on `listener` until the node drains.
pub async fn serve_api(node: Arc<Node>, listener: TcpListener) {
    let keys = node
        .cfg
        .api_keys
        .iter()
        .map(|k| Sha1::digest(k.as_bytes()).into())
        .collect();
    let limiter = NonZeroU32::new(node.cfg.api_requests_per_sec)
        .filter(|_| !node.cfg.no_rate_limits)
        .map(|rate| {
            let burst = rate.saturating_mul(NonZeroU32::new(2).expect("2 > 0"));
            governor::RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
    let api = Arc::new(Api {
        node: node.clone(),
        keys,
        limiter,
    });
    let app = Router::new()
        .route("/api/{method}", post(handle))
        .fallback(any(not_api))
        .with_state(api);
    let token = node.shutdown.clone();
    let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await;
}

/// What the API port answers to anything but `POST /api/<method>`,
/// WebSocket upgrades included.
async fn not_api(headers: HeaderMap) -> Response {
    if headers.contains_key(header::UPGRADE) {
        return error(
            StatusCode::BAD_REQUEST,
            &ProtoError::bad_request("the server API port does not accept WebSocket upgrades; use the client port"),
        );
    }
    error(
        StatusCode::NOT_FOUND,
        &ProtoError::bad_request("not a server API call: POST /api/<method>"),
    )
}

/// What the client port answers to `/api/...`.
pub async fn not_on_client_port() -> Response {
    error(
        StatusCode::NOT_FOUND,
        &ProtoError::bad_request("the server API is not served on the client port (see --api-listen)"),
    )
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::RateLimited | ErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(status: StatusCode, e: &ProtoError) -> Response {
    let mut body = json!({"code": e.code.as_str(), "message": e.message});
    if let Some(ms) = e.retry_after_ms {
        body["retry_after_ms"] = json!(ms);
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": body }).to_string(),
    )
        .into_response()
}

fn fail(e: ProtoError) -> Response {
    error(status_of(e.code), &e)
}

fn ok(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"ok\":{body}}}"),
    )
        .into_response()
}

impl Api {
    /// The index of the presented key, if it is one of ours. Every key is
    /// compared (no early exit), each in constant time.
    fn key_index(&self, headers: &HeaderMap) -> Option<usize> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, key) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("apikey") {
            return None;
        }
        let presented: [u8; 20] = Sha1::digest(key.trim().as_bytes()).into();
        let mut found = None;
        for (i, k) in self.keys.iter().enumerate() {
            if bool::from(k.ct_eq(&presented)) {
                found = Some(i);
            }
        }
        found
    }
}

async fn handle(
    State(api): State<Arc<Api>>,
    Path(method): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let node = &api.node;
    if let Some(limiter) = &api.limiter
        && let Err(not_until) = limiter.check()
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        metrics::counter!("gateway_api_requests_total", "method" => "any", "result" => "rate_limited").increment(1);
        return fail(ProtoError::rate_limited((wait.as_millis() as u64).max(1)));
    }
    let Some(key) = api.key_index(&headers) else {
        // Never the key itself: it is a secret, right or wrong.
        let presented = headers.contains_key(header::AUTHORIZATION);
        tracing::warn!(%peer, %method, key_presented = presented, "server API request refused: missing or wrong API key");
        metrics::counter!("gateway_api_requests_total", "method" => "any", "result" => "unauthorized").increment(1);
        return fail(ProtoError::new(ErrorCode::Unauthorized, "missing or wrong API key"));
    };
    let body = match axum::body::to_bytes(body, node.cfg.api_max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return fail(ProtoError::new(
                ErrorCode::TooLarge,
                format!("the body is over {} bytes", node.cfg.api_max_body_bytes),
            ));
        }
    };
    let result = match method.as_str() {
        "publish" => publish(&api, key, &body).await,
        "broadcast" => broadcast(&api, key, &body).await,
        "history" => history(node, &body).await,
        "room" => room(node, &body).await,
        "info" => info(node).await,
        "disconnect" => disconnect(node, &body).await,
        "unsubscribe" => unsubscribe(node, &body).await,
        "revoke" => revoke(node, &body).await,
        _ => Err(ProtoError::bad_request(
            "unknown method: publish, broadcast, history, room, info, disconnect, unsubscribe or revoke",
        )),
    };
    let label: &'static str = match method.as_str() {
        "publish" => "publish",
        "broadcast" => "broadcast",
        "history" => "history",
        "room" => "room",
        "info" => "info",
        "disconnect" => "disconnect",
        "unsubscribe" => "unsubscribe",
        "revoke" => "revoke",
        _ => "unknown",
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.code.as_str(),
    };
    metrics::counter!("gateway_api_requests_total", "method" => label, "result" => outcome).increment(1);
    match result {
        Ok(body) => ok(body),
        Err(e) => fail(e),
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(body).map_err(|e| ProtoError::bad_request(format!("invalid request: {e}")))
}

fn room_id(name: &str) -> Result<RoomId, ProtoError> {
    RoomId::parse(name).ok_or_else(|| ProtoError::bad_request("invalid room name"))
}

fn name<'a>(what: &str, v: &'a str) -> Result<&'a str, ProtoError> {
    if !crate::model::is_valid_user(v) {
        return Err(ProtoError::bad_request(format!(
            "{what} must be 1 to {MAX_NAME_LEN} bytes without control or bidirectional formatting characters"
        )));
    }
    Ok(v)
}

fn bus_error(e: &BusError) -> ProtoError {
    match e {
        BusError::Room(_) => ProtoError::new(ErrorCode::LimitExceeded, "the node holds too many rooms"),
        BusError::Unavailable(_) | BusError::Timeout => {
            ProtoError::new(ErrorCode::Unavailable, "the message bus is unavailable; retry")
        }
    }
}

#[derive(Deserialize)]
struct PublishReq<'a> {
    room: String,
    #[serde(borrow)]
    data: &'a RawValue,
    from: Option<String>,
    key: Option<String>,
}

#[derive(Deserialize)]
struct BroadcastReq<'a> {
    rooms: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
    from: Option<String>,
    key: Option<String>,
}

/// The stored idempotency key: scoped to the API key (its digest's first
/// 8 bytes), so keys of two API keys, and of clients, never collide.
fn scoped_key(api: &Api, index: usize, key: Option<&str>) -> Result<Option<String>, ProtoError> {
    let Some(key) = key else { return Ok(None) };
    let key = name("key", key)?;
    let id: String = api.keys[index][..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(Some(format!("{API_KEY_MARK}api:{id}:{key}")))
}

/// One publish, exactly as a client's goes: the bus stores it (durable
/// rooms in cluster mode) and every member sees the returned offset.
async fn publish_one(
    node: &Node,
    room: &RoomId,
    from: &str,
    data: &Bytes,
    key: Option<&str>,
) -> Result<u64, ProtoError> {
    let out = Outgoing { room, from, data, key };
    match node.publish(out).await {
        Ok(p) => Ok(p.offset),
        Err(e) => {
            tracing::debug!(%room, error = %e, "API publish failed");
            Err(bus_error(&e))
        }
    }
}

async fn publish(api: &Api, key: usize, body: &[u8]) -> Result<String, ProtoError> {
    let req: PublishReq = parse(body)?;
    let room = room_id(&req.room)?;
    let data = Bytes::copy_from_slice(req.data.get().as_bytes());
    crate::protocol::check_data(&data)?;
    let from = name("from", req.from.as_deref().unwrap_or(DEFAULT_FROM))?;
    let key = scoped_key(api, key, req.key.as_deref())?;
    let offset = publish_one(&api.node, &room, from, &data, key.as_deref()).await?;
    Ok(json!({ "offset": offset }).to_string())
}

async fn broadcast(api: &Api, key: usize, body: &[u8]) -> Result<String, ProtoError> {
    let req: BroadcastReq = parse(body)?;
    if req.rooms.is_empty() || req.rooms.len() > MAX_BROADCAST_ROOMS {
        return Err(ProtoError::bad_request(format!(
            "rooms must hold 1 to {MAX_BROADCAST_ROOMS} rooms"
        )));
    }
    let rooms = req.rooms.iter().map(|r| room_id(r)).collect::<Result<Vec<_>, _>>()?;
    let data = Bytes::copy_from_slice(req.data.get().as_bytes());
    crate::protocol::check_data(&data)?;
    let from = name("from", req.from.as_deref().unwrap_or(DEFAULT_FROM))?;
    let key = scoped_key(api, key, req.key.as_deref())?;
    let results = futures_util::future::join_all(
        rooms
            .iter()
            .map(|room| publish_one(&api.node, room, from, &data, key.as_deref())),
    )
    .await;
    let entries: Vec<Value> = rooms
        .iter()
        .zip(results)
        .map(|(room, r)| match r {
            Ok(offset) => json!({"room": room.as_str(), "offset": offset}),
            Err(e) => json!({"room": room.as_str(), "error": {"code": e.code.as_str(), "message": e.message}}),
        })
        .collect();
    Ok(json!({ "rooms": entries }).to_string())
}

#[derive(Deserialize)]
struct HistoryReq {
    room: String,
    limit: Option<u32>,
    before: Option<u64>,
}

async fn history(node: &Node, body: &[u8]) -> Result<String, ProtoError> {
    let req: HistoryReq = parse(body)?;
    let room = room_id(&req.room)?;
    let limit = (req.limit.unwrap_or(50) as usize).clamp(1, node.cfg.history_page_max);
    let (messages, more) = match node.rooms.history(&room, req.before, limit) {
        HistoryPage::Messages { messages, more } => (messages, more),
        HistoryPage::NeedsBackend => node
            .bus
            .history(&room, req.before, limit)
            .await
            .map_err(|e| bus_error(&e))?,
    };
    // The stored `message` pushes, verbatim.
    let mut out = String::from("{\"messages\":[");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&String::from_utf8_lossy(&m.frame(Codec::Json).payload()));
    }
    out.push_str(&format!("],\"more\":{more}}}"));
    Ok(out)
}

#[derive(Deserialize)]
struct RoomReq {
    room: String,
}

async fn room(node: &Node, body: &[u8]) -> Result<String, ProtoError> {
    let req: RoomReq = parse(body)?;
    let room = room_id(&req.room)?;
    let p = node.presence.room(&room).await;
    let mut out = json!({ "count": p.count, "age_ms": p.age_ms });
    if let Some(users) = p.users {
        out["users"] = json!(users);
    }
    Ok(out.to_string())
}

async fn info(node: &Node) -> Result<String, ProtoError> {
    let nodes = match node.control.nodes().await {
        None => vec![node.info()],
        Some(Ok(nodes)) => nodes,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "info failed");
            return Err(ProtoError::new(
                ErrorCode::Unavailable,
                "the message bus is unavailable; retry",
            ));
        }
    };
    let connections: u64 = nodes.iter().map(|n| n.connections).sum();
    Ok(json!({
        "node": node.cfg.node_id,
        "mode": node.bus.kind(),
        "connections": connections,
        "nodes": nodes,
    })
    .to_string())
}

#[derive(Deserialize)]
struct DisconnectReq {
    user: String,
    code: Option<u16>,
    reconnect: Option<bool>,
}

async fn disconnect(node: &Node, body: &[u8]) -> Result<String, ProtoError> {
    let req: DisconnectReq = parse(body)?;
    let user = name("user", &req.user)?.to_string();
    let code = req.code.unwrap_or(4001);
    if !valid_close_code(code) {
        return Err(ProtoError::bad_request("code must be 1000, 1008, 1012 or 4000-4999"));
    }
    // 1012 means "come back"; every other code defaults to "do not".
    let reconnect = req.reconnect.unwrap_or(code == 1012);
    let order = Broadcast::Disconnect { user, code, reconnect };
    send(node, &order).await
}

#[derive(Deserialize)]
struct UnsubscribeReq {
    user: String,
    room: String,
}

async fn unsubscribe(node: &Node, body: &[u8]) -> Result<String, ProtoError> {
    let req: UnsubscribeReq = parse(body)?;
    let user = name("user", &req.user)?.to_string();
    let room = room_id(&req.room)?;
    let order = Broadcast::Unsubscribe {
        user,
        room: room.as_str().to_string(),
    };
    send(node, &order).await
}

async fn send(node: &Node, order: &Broadcast) -> Result<String, ProtoError> {
    match node.control.broadcast(order).await {
        Ok(_) => Ok("{}".into()),
        Err(e) => {
            tracing::debug!(error = %e, "control order failed");
            Err(ProtoError::new(
                ErrorCode::Unavailable,
                "the message bus is unavailable; retry",
            ))
        }
    }
}

#[derive(Deserialize)]
struct RevokeReq {
    user: String,
    before: Option<u64>,
}

async fn revoke(node: &Node, body: &[u8]) -> Result<String, ProtoError> {
    let req: RevokeReq = parse(body)?;
    let user = name("user", &req.user)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let before = req.before.unwrap_or(now);
    let control = &node.control;
    match control.revocations.revoke(&control.registry, user, before).await {
        Ok(_) => Ok(json!({ "durable": control.revocations.is_durable() }).to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "revocation failed");
            Err(ProtoError::new(
                ErrorCode::Unavailable,
                "the revocation could not be stored; retry",
            ))
        }
    }
}
