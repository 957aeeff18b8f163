//! Token time and minting: the clock arithmetic for `exp`, the HS256
//! connection tokens `gateway token` prints, and the room tokens of the
//! dev-mode token endpoint.
//!
//! Owns [`now_secs`], [`until`] and [`deadline`] (turning an `exp` into a
//! timer that never overflows, capped at [`MAX_TIMER`]), [`mint_hs256`] and
//! [`mint_room_hs256`].
//!
//! Does not own verification (`auth`) or which `exp` values are accepted
//! ([`crate::auth::MAX_EXP_SECS`] is checked there).
//!
//! Pure functions of the wall clock and their arguments; no shared state.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Longest time a grant timer is armed for; a later expiry is re-checked then.
pub const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Time left until `exp` (seconds since the epoch) plus `leeway`: zero when
/// past, at most [`MAX_TIMER`]. Never overflows, whatever `exp` is.
pub fn until(exp: u64, leeway: Duration) -> Duration {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(exp))
        .and_then(|at| at.checked_add(leeway))
        .map_or(MAX_TIMER, |at| {
            at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
        })
        .min(MAX_TIMER)
}

/// The instant `exp` (seconds since the epoch) plus `leeway` is reached on
/// the monotonic clock, at most [`MAX_TIMER`] from now.
pub fn deadline(exp: u64, leeway: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + until(exp, leeway)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Claims of a connection token minted by `gateway token`.
#[derive(Debug, Serialize)]
pub struct MintClaims<'a> {
    pub sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    pub iat: u64,
    pub rooms: MintRooms,
}

/// The `rooms` claim of a minted token.
#[derive(Debug, Serialize)]
pub struct MintRooms {
    pub sub: Vec<String>,
    #[serde(rename = "pub")]
    pub publish: Vec<String>,
}

/// Signs an HS256 connection token.
pub fn mint_hs256(
    secret: &[u8],
    sub: &str,
    rooms: Vec<String>,
    publish: Vec<String>,
    ttl_secs: Option<u64>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = now_secs();
    let claims = MintClaims {
        sub,
        exp: ttl_secs.map(|t| now + t),
        iat: now,
        rooms: MintRooms { sub: rooms, publish },
    };
    sign_hs256(secret, &claims)
}

/// Claims of a room token minted by [`mint_room_hs256`].
#[derive(Debug, Serialize)]
pub struct MintRoomClaims<'a> {
    pub sub: &'a str,
    pub exp: u64,
    pub iat: u64,
    pub room: &'a str,
    #[serde(rename = "pub")]
    pub publish: bool,
}

/// Signs an HS256 room token: `sub` may join `room` and publish there for
/// `ttl_secs` seconds.
pub fn mint_room_hs256(
    secret: &[u8],
    sub: &str,
    room: &str,
    ttl_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = now_secs();
    let claims = MintRoomClaims {
        sub,
        exp: now + ttl_secs,
        iat: now,
        room,
        publish: true,
    };
    sign_hs256(secret, &claims)
}

fn sign_hs256(secret: &[u8], claims: &impl Serialize) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
}
