//! The browser side served by a node: the client SDK (`/client.js` and its
//! TypeScript declarations `/client.d.ts`, always), and in dev mode the demo
//! chat page (`/`, `/demo.js`, `/demo.css`) with its token endpoint
//! (`/dev/token`).
//!
//! The files live in `gateway/web/` and are compiled into the binary. The
//! token endpoint exists only in dev mode ([`Config::dev_mode`]: no key
//! configured, a random secret made for this process), so it can never mint
//! a token that a production key would accept.
//!
//! [`Config::dev_mode`]: crate::config::Config::dev_mode

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use crate::auth;
use crate::node::Node;
use crate::rooms::RoomId;

/// The client SDK, an ES module without dependencies.
pub const CLIENT_JS: &str = include_str!("../../web/client.js");
/// TypeScript declarations of [`CLIENT_JS`].
pub const CLIENT_DTS: &str = include_str!("../../web/client.d.ts");
const DEMO_HTML: &str = include_str!("../../web/demo.html");
const DEMO_JS: &str = include_str!("../../web/demo.js");
const DEMO_CSS: &str = include_str!("../../web/demo.css");

/// Lifetime of a dev token when the request names none, in seconds.
pub const DEV_TOKEN_TTL_SECS: u64 = 300;
/// Shortest and longest lifetime a dev token may be asked for, in seconds.
pub const DEV_TOKEN_TTL_RANGE: std::ops::RangeInclusive<u64> = 5..=3600;
/// Longest `sub` of a dev token, in bytes.
pub const DEV_SUB_MAX_LEN: usize = 64;

/// Adds the SDK routes, and in dev mode the demo and token routes.
pub(super) fn routes(router: Router<Arc<Node>>, dev_mode: bool) -> Router<Arc<Node>> {
    let r = router.route("/client.js", get(|| async { script(CLIENT_JS) })).route(
        "/client.d.ts",
        get(|| async { public(CLIENT_DTS, "application/typescript; charset=utf-8") }),
    );
    if !dev_mode {
        return r;
    }
    r.route("/", get(|| async { page(DEMO_HTML, "text/html; charset=utf-8") }))
        .route(
            "/demo.js",
            get(|| async { page(DEMO_JS, "text/javascript; charset=utf-8") }),
        )
        .route("/demo.css", get(|| async { page(DEMO_CSS, "text/css; charset=utf-8") }))
        .route("/dev/token", get(dev_token))
}

/// A compiled-in file, revalidated on each use, never content-sniffed.
fn file(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// The SDK may be imported from pages of any origin (`<script type=module>`
/// needs CORS): it is public, static and sent without credentials.
fn public(body: &'static str, content_type: &'static str) -> Response {
    let mut r = file(body, content_type);
    r.headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r
}

fn script(body: &'static str) -> Response {
    public(body, "text/javascript; charset=utf-8")
}

/// A demo file: same-origin only, scripts only from this origin.
fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut r = file(body, content_type);
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    r
}

/// Query of `GET /dev/token`.
#[derive(Debug, Deserialize)]
struct TokenQuery {
    /// The user id (`sub`): 1 to [`DEV_SUB_MAX_LEN`] characters from
    /// `A-Z a-z 0-9 _ - .`.
    sub: Option<String>,
    /// Lifetime in seconds, within [`DEV_TOKEN_TTL_RANGE`].
    ttl: Option<u64>,
    /// When given, a room token for this room (with `pub: true`) instead of
    /// a connection token.
    room: Option<String>,
}

/// `GET /dev/token?sub=alice[&ttl=SECONDS][&room=ROOM]`: `{"token":"<JWT>","expires_in":SECONDS}`.
/// A connection token grants every room (subscribe and publish). Bad input
/// answers 400 with the protocol's error shape (`bad_request`).
async fn dev_token(State(node): State<Arc<Node>>, query: Result<Query<TokenQuery>, QueryRejection>) -> Response {
    let Ok(Query(q)) = query else {
        return bad_request("the query is not valid: ?sub=USER[&ttl=SECONDS][&room=ROOM]");
    };
    let Some(sub) = q.sub.as_deref().filter(|s| valid_sub(s)) else {
        return bad_request("sub: 1 to 64 characters from A-Z a-z 0-9 _ - .");
    };
    let ttl = q.ttl.unwrap_or(DEV_TOKEN_TTL_SECS);
    if !DEV_TOKEN_TTL_RANGE.contains(&ttl) {
        return bad_request("ttl: 5 to 3600 seconds");
    }
    let (Some(secret), true) = (node.cfg.jwt_secret.as_deref(), node.cfg.dev_mode) else {
        return (StatusCode::NOT_FOUND, "not in dev mode").into_response();
    };
    let token = match q.room.as_deref() {
        None => auth::mint_hs256(secret.as_bytes(), sub, vec!["*".into()], vec!["*".into()], Some(ttl)),
        Some(room) if RoomId::parse(room).is_none() => {
            return bad_request("room: 1 to 128 characters from A-Z a-z 0-9 _ - :");
        }
        Some(room) => auth::mint_room_hs256(secret.as_bytes(), sub, room, ttl),
    };
    match token {
        Ok(token) => json_response(StatusCode::OK, &json!({ "token": token, "expires_in": ttl })),
        Err(e) => {
            tracing::error!(error = %e, "dev token could not be signed");
            let body = json!({ "error": { "code": "internal", "message": "could not sign the token" } });
            json_response(StatusCode::INTERNAL_SERVER_ERROR, &body)
        }
    }
}

fn valid_sub(s: &str) -> bool {
    !s.is_empty() && s.len() <= DEV_SUB_MAX_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

fn bad_request(message: &'static str) -> Response {
    let body = json!({ "error": { "code": "bad_request", "message": message } });
    json_response(StatusCode::BAD_REQUEST, &body)
}

/// A JSON answer that no cache keeps (tokens are secrets).
fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subs_are_checked() {
        assert!(valid_sub("alice"));
        assert!(valid_sub("bob.smith-2_x"));
        assert!(!valid_sub(""));
        assert!(!valid_sub("a b"));
        assert!(!valid_sub("<script>"));
        assert!(!valid_sub(&"a".repeat(65)));
    }

    #[test]
    fn the_sdk_is_cross_origin_and_the_demo_same_origin() {
        let sdk = script(CLIENT_JS);
        let demo = page(DEMO_HTML, "text/html; charset=utf-8");
        for (r, content_type) in [
            (&sdk, "text/javascript; charset=utf-8"),
            (&demo, "text/html; charset=utf-8"),
        ] {
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], content_type);
            assert_eq!(h[header::CACHE_CONTROL], "no-cache");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        assert_eq!(sdk.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(!sdk.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        assert!(!demo.headers().contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        assert!(
            demo.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .starts_with("default-src 'self'")
        );
    }
}
