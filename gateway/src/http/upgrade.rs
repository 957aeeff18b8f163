//! The WebSocket upgrade: checks (method, version, Origin allowlist,
//! sub-protocol), admission control, an optional `Authorization: Bearer`
//! token verified before the upgrade, and the hand-over of the bare socket
//! to the connection's own task.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::auth::Identity;
use crate::config::Config;
use crate::conn;
use crate::limits::Refusal;
use crate::node::Node;
use crate::transport::deflate;
use crate::transport::tcp::SharedTcp;

/// The JSON sub-protocol (the default).
pub const PROTOCOL_JSON: &str = "gw.v1.json";

/// The protobuf sub-protocol (binary frames, `proto/proto/client.proto`).
pub const PROTOCOL_PROTO: &str = "gw.v1.proto";

fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

/// A refusal before the upgrade: 503 or 429 with `Retry-After`; the
/// connection is closed so a storm does not hold sockets open.
fn refuse_admission(refusal: Refusal) -> Response {
    let mut r = refuse(refusal.status(), refusal.text());
    let h = r.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(refusal.retry_after_secs()));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Whether a `Sec-WebSocket-Key` is what RFC 6455 4.1 says a client sends:
/// 16 bytes in base64 (24 characters).
fn valid_key(key: &[u8]) -> bool {
    use base64::Engine as _;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

pub(super) fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the Origin header against the allowlist.
pub(super) fn origin_allowed(cfg: &Config, headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => cfg.allow_no_origin,
        Some(origin) => {
            cfg.allowed_origins.is_empty() || cfg.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
        }
    }
}

/// The token of an `Authorization: Bearer` header: `None` without the
/// header, `Err` when the header is not a bearer token.
pub(super) fn bearer(headers: &HeaderMap) -> Option<Result<String, ()>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let text = value.to_str().map_err(|_| ());
    Some(text.and_then(|t| {
        let (scheme, token) = t.trim().split_once(' ').ok_or(())?;
        let token = token.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
            Ok(token.to_string())
        } else {
            Err(())
        }
    }))
}

/// Verifies an `Authorization: Bearer` token before the upgrade; a refusal
/// is HTTP 401 (counted by reason, the token never echoed).
pub(super) async fn authorize_upgrade(node: &Node, headers: &HeaderMap) -> Result<Option<Identity>, Response> {
    let token = match bearer(headers) {
        None => return Ok(None),
        Some(Ok(t)) => t,
        Some(Err(())) => {
            node.metrics.auth_failed("malformed");
            return Err(unauthorized("Authorization must be Bearer <JWT>".to_string()));
        }
    };
    match node.verifier.verify_connect(&token).await {
        Ok(identity) => Ok(Some(identity)),
        Err(e) => {
            node.metrics.auth_failed(e.label());
            Err(unauthorized(e.to_string()))
        }
    }
}

/// HTTP 401 with a fixed message (an [`crate::auth::AuthError`] text, never the token).
pub(super) fn unauthorized(why: String) -> Response {
    let mut r = (StatusCode::UNAUTHORIZED, why).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    r
}

/// Picks the sub-protocol: the first one the client offered that this node
/// speaks; `Ok(None)` when the client offered none (JSON is the default),
/// `Err` when it offered only ones this node does not speak.
pub(super) fn pick_protocol(headers: &HeaderMap) -> Result<Option<&'static str>, ()> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find_map(|p| [PROTOCOL_JSON, PROTOCOL_PROTO].into_iter().find(|ours| ours == p))
        .map(Some)
        .ok_or(())
}

pub(super) async fn ws_upgrade(State(node): State<Arc<Node>>, mut req: Request) -> Response {
    if node.is_draining() {
        let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, "node draining");
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let headers = req.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return refuse(StatusCode::UPGRADE_REQUIRED, "WebSocket upgrade required");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        let mut r = refuse(StatusCode::BAD_REQUEST, "unsupported WebSocket version");
        r.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    if !valid_key(key.as_bytes()) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 4.1)",
        );
    }
    // RFC 6455 4.2.1 and HTTP/1.1 (RFC 9112 3.2): a request without Host is refused.
    if !headers.contains_key(header::HOST) {
        return refuse(StatusCode::BAD_REQUEST, "missing Host");
    }
    if !origin_allowed(&node.cfg, headers) {
        return refuse(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let Ok(protocol) = pick_protocol(headers) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no supported sub-protocol (gw.v1.json, gw.v1.proto)",
        );
    };
    let peer = req
        .extensions()
        .get::<SocketAddr>()
        .copied()
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let admit = match node.limits.admit(headers, peer) {
        Ok(a) => a,
        Err(refusal) => return refuse_admission(refusal),
    };
    // After admission: verifying a bearer token costs CPU a storm must not get.
    let key = key.clone();
    let identity = match authorize_upgrade(&node, req.headers()).await {
        Ok(i) => i,
        Err(refused) => return refused,
    };
    let accept = crate::transport::ws::accept_key(key.as_bytes());
    // permessage-deflate (RFC 7692): the first offer this node can accept.
    let compression = if node.cfg.permessage_deflate {
        deflate::negotiate(
            req.headers()
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )
    } else {
        None
    };
    let (deflate, extensions) = compression.unzip();
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(StatusCode::BAD_REQUEST, "connection cannot be upgraded");
    };
    let max_frame = node.cfg.max_frame_bytes;
    let proto = protocol == Some(PROTOCOL_PROTO);
    let task_node = node.clone();
    node.tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let upgrade = conn::Upgrade {
                    peer,
                    admit,
                    identity,
                    proto,
                    deflate,
                };
                start_conn(task_node, upgraded, max_frame, upgrade);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "upgrade failed"),
        }
    });
    let mut builder = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        builder = builder.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    if let Some(e) = extensions {
        builder = builder.header(header::SEC_WEBSOCKET_EXTENSIONS, e);
    }
    builder
        .body(Body::empty())
        .unwrap_or_else(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// Starts the connection's task on the socket under the upgraded HTTP
/// connection. hyper's boxed I/O is taken apart again so the connection holds
/// the bare socket (plain TCP: shared, without a lock, by the connection's
/// task and the flusher that writes its room messages), and the connection
/// gets a task of its own: its future is the whole per-connection state,
/// nothing of the upgrade stays in it. TLS connections are written by their
/// task only.
pub(super) fn start_conn(
    node: Arc<Node>,
    upgraded: hyper::upgrade::Upgraded,
    max_frame: usize,
    upgrade: conn::Upgrade,
) {
    let tracker = node.tracker.clone();
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let tcp = SharedTcp::new(parts.io.into_inner());
            let reader = crate::transport::ws::Reader::new(tcp.clone(), max_frame, &parts.read_buf);
            let sink = tcp.sink();
            tracker.spawn(conn::run(node, reader, tcp, Some(sink), upgrade));
            return;
        }
        Err(u) => u,
    };
    type TlsIo = tokio_rustls::server::TlsStream<TcpStream>;
    match upgraded.downcast::<TokioIo<TlsIo>>() {
        Ok(parts) => {
            let (r, w) = tokio::io::split(parts.io.into_inner());
            let reader = crate::transport::ws::Reader::new(r, max_frame, &parts.read_buf);
            tracker.spawn(conn::run(node, reader, w, None, upgrade));
        }
        Err(upgraded) => {
            let (r, w) = tokio::io::split(TokioIo::new(upgraded));
            let reader = crate::transport::ws::Reader::new(r, max_frame, &[]);
            tracker.spawn(conn::run(node, reader, w, None, upgrade));
        }
    }
}
