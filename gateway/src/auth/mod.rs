//! Local JWT verification: connection tokens, room tokens and room grants.
//!
//! Owns the [`Verifier`] and the rules of `docs/protocol.md#tokens`: which
//! held key may verify a token, which claims are required, and what a
//! verified token grants ([`Identity`], [`RoomGrant`]). Every node verifies
//! with keys it already holds: no call-out per connect, so a reconnect storm
//! costs CPU on the gateways and nothing elsewhere.
//!
//! Submodules, each a leaf this file builds on (none of them uses this file):
//! - [`keys`]: a verification key, [`KeyError`], reading JWKS documents;
//! - [`jwks`]: fetching and holding the key sets of JWKS URLs;
//! - [`grants`]: room patterns and the grants of a rooms claim;
//! - [`mint`]: `exp` clock arithmetic and minting HS256 tokens.
//!
//! Does not own the configuration: `config::verifier` builds a [`Verifier`]
//! from a `Config`, so this module never depends on `config`.
//!
//! Invariants:
//! - a token's `alg` must belong to the family of the key that verifies it (an
//!   HS token is never checked against a public key's bytes), and to the exact
//!   algorithm when a JWK names one; `none` and unknown algorithms never verify;
//! - a key bound to an issuer verifies only tokens whose `iss` is that issuer:
//!   keys are looked up by issuer and `kid` together, never by `kid` alone, so
//!   one issuer's `kid` cannot vouch for another issuer's tokens;
//! - token text is never logged or echoed; every refusal is an [`AuthError`]
//!   with a fixed message and a metrics label.
//!
//! Concurrency: [`Verifier`] is shared by every connection. Static keys are
//! immutable; remote key sets are swapped whole behind a lock held only to
//! clone an `Arc`. Only [`Verifier::prepare`] (and so `verify_connect`) may
//! wait, and only for the single in-flight fetch of a JWKS URL.

pub mod grants;
pub mod jwks;
pub mod keys;
pub mod mint;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

pub use crate::auth::grants::{Grants, Pattern};
use crate::auth::grants::{claim_at, grants_from};
use crate::auth::jwks::{JwksSource, SourceOptions};
pub(crate) use crate::auth::keys::parse_jwks;
pub use crate::auth::keys::{KeyError, MIN_HMAC_SECRET_BYTES, VerifyKey};
pub use crate::auth::mint::{
    MAX_TIMER, MintClaims, MintRoomClaims, MintRooms, deadline, mint_hs256, mint_room_hs256, now_secs, until,
};

/// Longest token accepted, in bytes; anything longer is refused before parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Latest `exp` accepted, seconds since the epoch (9999-12-31T23:59:59Z).
/// Later values are refused as [`AuthError::BadExpiry`] rather than turned
/// into timers that overflow.
pub const MAX_EXP_SECS: u64 = 253_402_300_799;

/// Why a token was refused. The label is what metrics count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is too large")]
    TooLarge,
    #[error("token algorithm is not accepted")]
    Algorithm,
    #[error("no key matches the token")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token has no sub")]
    MissingSub,
    #[error("token sub must be 1 to 256 bytes without control or bidirectional formatting characters")]
    BadSub,
    #[error("token is for another user")]
    WrongSub,
    #[error("room token is for another room")]
    WrongRoom,
    #[error("token room grants are malformed")]
    BadGrants,
    #[error("token exp is out of range")]
    BadExpiry,
    #[error("a room token cannot be used as a connection token")]
    RoomTokenAsConnect,
    #[error("not a room token")]
    NotRoomToken,
    #[error("room token has no exp")]
    MissingExpiry,
    #[error("no verification key is configured")]
    NoKeys,
}

impl AuthError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::Algorithm => "algorithm",
            Self::UnknownKey => "unknown_key",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::MissingSub => "missing_sub",
            Self::BadSub => "bad_sub",
            Self::WrongSub => "wrong_sub",
            Self::WrongRoom => "wrong_room",
            Self::BadGrants => "bad_grants",
            Self::BadExpiry => "bad_exp",
            Self::RoomTokenAsConnect => "room_token_as_connect",
            Self::NotRoomToken => "not_room_token",
            Self::MissingExpiry => "missing_exp",
            Self::NoKeys => "no_keys",
        }
    }
}

/// A verified connection token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: Option<u64>,
    /// Issued at (`iat`), seconds since the epoch, 0 for a token without
    /// `iat`; revocations refuse tokens issued before their time.
    pub iat: u64,
    pub grants: Grants,
}

/// A verified room token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomGrant {
    pub publish: bool,
    pub exp: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    iat: Option<u64>,
    /// Present (even `null`) only in a room token.
    #[serde(default, deserialize_with = "present_value")]
    room: Option<Value>,
    #[serde(default, rename = "pub")]
    publish: Option<bool>,
    /// Everything else, where the rooms claim is looked up by path.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// Verification settings beyond the keys.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub leeway_secs: u64,
    /// Accepted `iss` for keys not bound to an issuer; empty = any.
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    /// Grants of a connection token without a rooms claim.
    pub default_grants: Grants,
    /// Path of the rooms claim, one segment per nesting level.
    pub rooms_claim: Vec<String>,
    /// How JWKS URLs are fetched.
    pub jwks: SourceOptions,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            leeway_secs: 5,
            issuers: Vec::new(),
            audiences: Vec::new(),
            default_grants: Grants::default(),
            rooms_claim: vec!["rooms".to_string()],
            jwks: SourceOptions::default(),
        }
    }
}

/// What the token says about itself before any signature is checked; used
/// only to pick keys.
struct Unverified<'a> {
    alg: Algorithm,
    kid: Option<String>,
    iss: Option<String>,
    token: &'a str,
}

/// True for a member that is there, whatever its value.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Header extensions the recipient must understand (RFC 7515 4.1.11);
    /// the gateway understands none, so a token with the member at all
    /// (even `null`) is refused.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

#[derive(Deserialize)]
struct RawIss {
    #[serde(default)]
    iss: Option<Value>,
}

fn b64(part: &str) -> Result<Vec<u8>, AuthError> {
    keys::b64(part).map_err(|_| AuthError::Malformed)
}

impl<'a> Unverified<'a> {
    fn read(token: &'a str, want_iss: bool) -> Result<Self, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed);
        };
        let header: RawHeader = serde_json::from_slice(&b64(h)?).map_err(|_| AuthError::Malformed)?;
        if header.crit {
            return Err(AuthError::Malformed);
        }
        // `none` and anything unknown end here, before any key is looked at.
        let alg = Algorithm::from_str(&header.alg).map_err(|_| AuthError::Algorithm)?;
        let iss = if want_iss {
            let raw: RawIss = serde_json::from_slice(&b64(p)?).map_err(|_| AuthError::Malformed)?;
            match raw.iss {
                None => None,
                Some(Value::String(s)) => Some(s),
                Some(_) => return Err(AuthError::Issuer),
            }
        } else {
            None
        };
        Ok(Self {
            alg,
            kid: header.kid,
            iss,
            token,
        })
    }
}

/// How far (seconds) beyond the leeway a token's `iat` may be ahead of this
/// node's clock before the token is refused as not valid yet.
pub const IAT_AHEAD_SECS: u64 = 60;

/// The node's verification keys and rules.
pub struct Verifier {
    keys: Vec<VerifyKey>,
    remote: Vec<Arc<JwksSource>>,
    /// Whether any key is bound to an issuer (then `iss` is read before lookup).
    bound: bool,
    opts: VerifyOptions,
}

/// Outcome of looking a token's key up in the keys held now.
enum Lookup {
    Decoded(Result<Claims, AuthError>),
    /// The token names a `kid` that a JWKS URL might have by now.
    Refetch,
}

impl Verifier {
    pub fn new(opts: VerifyOptions) -> Self {
        Self {
            keys: Vec::new(),
            remote: Vec::new(),
            bound: false,
            opts,
        }
    }

    /// The clock leeway applied to `exp` and `nbf`: a grant ends this long
    /// after its `exp`.
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.opts.leeway_secs)
    }

    /// Whether any key is configured.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty() || !self.remote.is_empty()
    }

    /// The JWKS URL sources (for the refresh task and tests).
    pub fn remote_sources(&self) -> &[Arc<JwksSource>] {
        &self.remote
    }

    /// Adds an HMAC secret (HS256/384/512) of at least
    /// [`MIN_HMAC_SECRET_BYTES`] bytes.
    ///
    /// # Errors
    /// [`KeyError::EmptySecret`], [`KeyError::WeakSecret`] when it is shorter.
    pub fn add_secret(&mut self, secret: &[u8]) -> Result<(), KeyError> {
        if secret.is_empty() {
            return Err(KeyError::EmptySecret);
        }
        if secret.len() < MIN_HMAC_SECRET_BYTES {
            return Err(KeyError::WeakSecret { len: secret.len() });
        }
        self.keys.push(VerifyKey {
            issuer: None,
            kid: None,
            family: AlgorithmFamily::Hmac,
            alg: None,
            key: DecodingKey::from_secret(secret),
        });
        Ok(())
    }

    /// Adds a PEM public key; its type decides the algorithm family.
    pub fn add_public_key_file(&mut self, path: &Path) -> Result<(), KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let (family, key) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
            (AlgorithmFamily::Rsa, k)
        } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
            (AlgorithmFamily::Ec, k)
        } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
            (AlgorithmFamily::Ed, k)
        } else {
            return Err(KeyError::Pem {
                path: path.display().to_string(),
            });
        };
        self.keys.push(VerifyKey {
            issuer: None,
            kid: None,
            family,
            alg: None,
            key,
        });
        Ok(())
    }

    /// Adds a JWKS file or URL (`http://` or `https://`), optionally bound to
    /// an issuer. Returns how many keys a file held (0 for a URL).
    pub fn add_jwks(&mut self, file_or_url: &str, issuer: Option<&str>) -> Result<usize, KeyError> {
        let issuer: Option<Arc<str>> = issuer.map(Arc::from);
        self.bound |= issuer.is_some();
        if file_or_url.starts_with("http://") || file_or_url.starts_with("https://") {
            let source = JwksSource::new(file_or_url, issuer, self.opts.jwks.clone())?;
            self.remote.push(Arc::new(source));
            return Ok(0);
        }
        self.add_jwks_file(Path::new(file_or_url), issuer)
    }

    /// Adds every signing key of a JWKS document read from a file.
    pub fn add_jwks_file(&mut self, path: &Path, issuer: Option<Arc<str>>) -> Result<usize, KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let keys = parse_jwks(&text, issuer.as_ref()).map_err(|source| KeyError::Jwks {
            path: path.display().to_string(),
            source,
        })?;
        if keys.is_empty() {
            return Err(KeyError::NoUsableKey {
                path: path.display().to_string(),
            });
        }
        self.bound |= issuer.is_some();
        let n = keys.len();
        self.keys.extend(keys);
        Ok(n)
    }

    /// Makes sure the keys that could verify `token` are loaded: when the
    /// token names a `kid` no held key has, asks the JWKS URLs that may hold it
    /// to refetch. Refetches are single-flight and rate-limited per URL, so
    /// this waits at most for one bounded fetch and junk `kid`s cost nothing
    /// after the first. Never fails: verification reports the outcome.
    pub async fn prepare(&self, token: &str) {
        if self.remote.is_empty() {
            return;
        }
        let Ok(t) = Unverified::read(token, self.bound) else {
            return;
        };
        if !matches!(self.lookup(&t, false), Lookup::Refetch) {
            return;
        }
        for source in &self.remote {
            if source.issuer().is_none_or(|i| Some(i) == t.iss.as_deref()) {
                source.refetch().await;
            }
        }
    }

    fn decode(&self, token: &str) -> Result<Claims, AuthError> {
        if !self.has_keys() {
            return Err(AuthError::NoKeys);
        }
        let t = Unverified::read(token, self.bound)?;
        match self.lookup(&t, true) {
            Lookup::Decoded(r) => r,
            Lookup::Refetch => Err(AuthError::UnknownKey),
        }
    }

    /// Finds the keys that may verify `t` and tries them. With `last` false,
    /// a `kid` only a JWKS URL could know answers [`Lookup::Refetch`].
    fn lookup(&self, t: &Unverified<'_>, last: bool) -> Lookup {
        let iss = t.iss.as_deref();
        let snapshots: Vec<_> = self
            .remote
            .iter()
            .filter(|s| s.issuer().is_none_or(|i| Some(i) == iss))
            .map(|s| s.keys())
            .collect();
        let held = || self.keys.iter().chain(snapshots.iter().flat_map(|s| s.iter()));
        let usable = || held().filter(|k| k.accepts(t.alg, iss));
        let by_kid: Vec<&VerifyKey> = match &t.kid {
            Some(kid) => usable().filter(|k| k.kid.as_deref() == Some(kid.as_str())).collect(),
            None => usable().collect(),
        };
        let candidates = if !by_kid.is_empty() {
            by_kid
        } else {
            let unloaded = self
                .remote
                .iter()
                .any(|s| s.issuer().is_none_or(|i| Some(i) == iss) && (t.kid.is_some() || !s.loaded()));
            if !last && unloaded {
                return Lookup::Refetch;
            }
            // Keys without a `kid` (secrets, PEM keys) verify tokens that name one.
            let kidless: Vec<&VerifyKey> = usable().filter(|k| k.kid.is_none()).collect();
            if kidless.is_empty() {
                return Lookup::Decoded(Err(self.why_no_key(t)));
            }
            kidless
        };
        let mut last_err = AuthError::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(t.token, &key.key, &self.validation(t.alg, key)) {
                Ok(data) => return Lookup::Decoded(Ok(data.claims)),
                Err(e) => {
                    last_err = match e.kind() {
                        ErrorKind::InvalidSignature => AuthError::Signature,
                        ErrorKind::ExpiredSignature => return Lookup::Decoded(Err(AuthError::Expired)),
                        ErrorKind::ImmatureSignature => return Lookup::Decoded(Err(AuthError::NotYetValid)),
                        ErrorKind::InvalidIssuer => return Lookup::Decoded(Err(AuthError::Issuer)),
                        ErrorKind::InvalidAudience => return Lookup::Decoded(Err(AuthError::Audience)),
                        ErrorKind::MissingRequiredClaim(c) if c == "iss" => {
                            return Lookup::Decoded(Err(AuthError::Issuer));
                        }
                        ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
                            return Lookup::Decoded(Err(AuthError::Audience));
                        }
                        ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                        _ => AuthError::Malformed,
                    }
                }
            }
        }
        Lookup::Decoded(Err(last_err))
    }

    /// The most precise reason no held key fits `t`: `Algorithm` when no key
    /// of its family exists at all, `Issuer` when only other issuers' keys
    /// would fit, else `UnknownKey`.
    fn why_no_key(&self, t: &Unverified<'_>) -> AuthError {
        let family = t.alg.family();
        let iss = t.iss.as_deref();
        let mut family_known = false;
        let mut issuer_fits = false;
        let mut check = |k: &VerifyKey| {
            if k.family == family {
                family_known = true;
                issuer_fits |= k.issuer.as_deref().is_none_or(|i| Some(i) == iss);
            }
        };
        self.keys.iter().for_each(&mut check);
        for s in &self.remote {
            s.keys().iter().for_each(&mut check);
        }
        let remote_fits = self.remote.iter().any(|s| s.issuer().is_none_or(|i| Some(i) == iss));
        if !family_known && self.remote.is_empty() {
            AuthError::Algorithm
        } else if family_known && !issuer_fits && !remote_fits {
            AuthError::Issuer
        } else {
            AuthError::UnknownKey
        }
    }

    fn validation(&self, alg: Algorithm, key: &VerifyKey) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.opts.leeway_secs;
        v.validate_nbf = true;
        v.required_spec_claims.clear();
        // A configured `iss` or `aud` is also required: a token without the
        // claim would otherwise pass the check.
        match &key.issuer {
            Some(i) => v.set_issuer(&[i.as_ref()]),
            None if self.opts.issuers.is_empty() => v.iss = None,
            None => v.set_issuer(&self.opts.issuers),
        }
        if v.iss.is_some() {
            v.required_spec_claims.insert("iss".to_string());
        }
        if self.opts.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.opts.audiences);
            v.required_spec_claims.insert("aud".to_string());
        }
        v
    }

    /// Verifies a connection token, refetching a JWKS URL first when the
    /// token names a `kid` not held yet (see [`Verifier::prepare`]).
    pub async fn verify_connect(&self, token: &str) -> Result<Identity, AuthError> {
        self.prepare(token).await;
        self.verify_connect_now(token)
    }

    /// Verifies a connection token with the keys held now; never waits.
    pub fn verify_connect_now(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = self.decode(token)?;
        // A room token names its room; it grants that room only and must
        // never open a connection.
        if claims.room.is_some() {
            return Err(AuthError::RoomTokenAsConnect);
        }
        check_exp(claims.exp)?;
        // Revocations compare `iat` with their time: a token dated in the
        // future would pass a `revoke` made now. A signer's clock a little
        // ahead is not refused (the leeway plus [`IAT_AHEAD_SECS`]).
        let ahead = self.opts.leeway_secs.saturating_add(IAT_AHEAD_SECS);
        if claims.iat.is_some_and(|iat| iat > now_secs().saturating_add(ahead)) {
            return Err(AuthError::NotYetValid);
        }
        let sub = claims.sub.filter(|s| !s.is_empty()).ok_or(AuthError::MissingSub)?;
        if !crate::model::is_valid_user(&sub) {
            return Err(AuthError::BadSub);
        }
        let grants = match claim_at(&claims.rest, &self.opts.rooms_claim) {
            None | Some(Value::Null) => self.opts.default_grants.clone(),
            Some(v) => grants_from(v).map_err(|_| AuthError::BadGrants)?,
        };
        Ok(Identity {
            sub,
            exp: claims.exp,
            iat: claims.iat.unwrap_or(0),
            grants,
        })
    }

    /// Verifies a room token presented by the connection of `sub` for `room`,
    /// with the keys held now (call [`Verifier::prepare`] first to pick up a
    /// rotated key).
    pub fn verify_room(&self, token: &str, sub: &str, room: &str) -> Result<RoomGrant, AuthError> {
        let claims = self.decode(token)?;
        match claims.sub.as_deref() {
            None | Some("") => return Err(AuthError::MissingSub),
            Some(s) if s != sub => return Err(AuthError::WrongSub),
            Some(_) => {}
        }
        match &claims.room {
            Some(Value::String(r)) if r == room => {}
            Some(Value::String(_)) => return Err(AuthError::WrongRoom),
            _ => return Err(AuthError::NotRoomToken),
        }
        // A room grant must end (the contract lists `exp` among a room
        // token's claims): one without would outlive every refresh.
        if claims.exp.is_none() {
            return Err(AuthError::MissingExpiry);
        }
        check_exp(claims.exp)?;
        Ok(RoomGrant {
            publish: claims.publish.unwrap_or(false),
            exp: claims.exp,
        })
    }
}

/// Deserializes a present claim, `null` included, as `Some`.
fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Refuses an `exp` no timer could hold (see [`MAX_EXP_SECS`]).
fn check_exp(exp: Option<u64>) -> Result<(), AuthError> {
    match exp {
        Some(e) if e > MAX_EXP_SECS => Err(AuthError::BadExpiry),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const S: &[u8] = b"s3cret-s3cret-s3cret-s3cret-0123";
    const KEY_A: &[u8] = b"key-of-a-key-of-a-key-of-a-key-a";
    const KEY_B: &[u8] = b"key-of-b-key-of-b-key-of-b-key-b";

    #[test]
    fn hmac_secrets_shorter_than_32_bytes_are_refused() {
        let mut v = Verifier::new(VerifyOptions::default());
        assert!(matches!(v.add_secret(b"abc"), Err(KeyError::WeakSecret { len: 3 })));
        assert!(matches!(v.add_secret(&S[..31]), Err(KeyError::WeakSecret { len: 31 })));
        v.add_secret(S).unwrap();
        // The same floor for HMAC keys in a JWKS document: skipped.
        let short = json!({"keys":[{"kty":"oct","kid":"k","alg":"HS256","k":base64_url(b"short")}]});
        assert!(parse_jwks(short.to_string().as_bytes(), None).unwrap().is_empty());
    }

    #[test]
    fn room_and_connection_tokens_are_not_interchangeable() {
        let v = verifier();
        let exp = now_secs() + 60;
        let room = sign(json!({"sub":"alice","room":"r","exp":exp,"pub":true}), S);
        assert_eq!(v.verify_connect_now(&room).unwrap_err(), AuthError::RoomTokenAsConnect);
        let conn = sign(json!({"sub":"alice","exp":exp,"rooms":{"sub":["*"]}}), S);
        assert_eq!(v.verify_room(&conn, "alice", "r").unwrap_err(), AuthError::NotRoomToken);
        assert!(v.verify_room(&room, "alice", "r").is_ok());
        assert!(v.verify_connect_now(&conn).is_ok());
        // A `room` claim present but null is still a room token's shape.
        let null_room = sign(json!({"sub":"alice","room":null,"exp":exp}), S);
        assert_eq!(
            v.verify_connect_now(&null_room).unwrap_err(),
            AuthError::RoomTokenAsConnect
        );
        assert_eq!(
            v.verify_room(&null_room, "alice", "r").unwrap_err(),
            AuthError::NotRoomToken
        );
        // A room token without exp would be a grant that never ends.
        let forever = sign(json!({"sub":"alice","room":"r"}), S);
        assert_eq!(
            v.verify_room(&forever, "alice", "r").unwrap_err(),
            AuthError::MissingExpiry
        );
    }

    #[test]
    fn an_absurd_exp_is_refused_and_timers_never_overflow() {
        let v = verifier();
        for exp in [u64::MAX, MAX_EXP_SECS + 1] {
            let t = sign(json!({"sub":"a","exp":exp}), S);
            assert_eq!(v.verify_connect_now(&t).unwrap_err(), AuthError::BadExpiry, "{exp}");
            let r = sign(json!({"sub":"a","room":"r","exp":exp}), S);
            assert_eq!(v.verify_room(&r, "a", "r").unwrap_err(), AuthError::BadExpiry, "{exp}");
        }
        assert!(
            v.verify_connect_now(&sign(json!({"sub":"a","exp":MAX_EXP_SECS}), S))
                .is_ok()
        );
        assert_eq!(until(u64::MAX, Duration::from_secs(u64::MAX)), MAX_TIMER);
        assert_eq!(until(MAX_EXP_SECS, Duration::from_secs(5)), MAX_TIMER);
        assert_eq!(until(0, Duration::from_secs(5)), Duration::ZERO);
        let soon = until(now_secs() + 10, Duration::from_secs(5));
        assert!(
            soon > Duration::from_secs(13) && soon <= Duration::from_secs(15),
            "{soon:?}"
        );
    }

    fn sign(claims: serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn verifier() -> Verifier {
        let mut v = Verifier::new(VerifyOptions {
            leeway_secs: 5,
            ..Default::default()
        });
        v.add_secret(S).unwrap();
        v
    }

    #[test]
    fn a_good_token_gives_grants() {
        let t = sign(
            json!({"sub":"alice","exp":now_secs()+60,"rooms":{"sub":["general","team-*"],"pub":["general"]}}),
            S,
        );
        let id = verifier().verify_connect_now(&t).unwrap();
        assert_eq!(id.sub, "alice");
        assert!(id.grants.can_subscribe("team-1") && !id.grants.can_publish("team-1"));
        assert!(id.grants.can_publish("general"));
    }

    #[test]
    fn rejections() {
        let v = verifier();
        let now = now_secs();
        let cases = [
            (sign(json!({"sub":"a","exp":now-60}), S), AuthError::Expired),
            (sign(json!({"sub":"a","nbf":now+60}), S), AuthError::NotYetValid),
            (sign(json!({"sub":"a"}), b"other"), AuthError::Signature),
            (sign(json!({"exp":now+60}), S), AuthError::MissingSub),
            (sign(json!({"sub":"a","iat":now+3600}), S), AuthError::NotYetValid),
            (sign(json!({"sub":"a\u{0}b","exp":now+60}), S), AuthError::BadSub),
            (
                sign(json!({"sub":"mallory\u{202E}ecila","exp":now+60}), S),
                AuthError::BadSub,
            ),
            (sign(json!({"sub":"x".repeat(257),"exp":now+60}), S), AuthError::BadSub),
            ("garbage".to_string(), AuthError::Malformed),
            ("x".repeat(MAX_TOKEN_BYTES + 1), AuthError::TooLarge),
        ];
        for (token, want) in cases {
            assert_eq!(v.verify_connect_now(&token).unwrap_err(), want);
        }
        // alg none never verifies.
        let none = format!(
            "{}.{}.",
            base64_url(br#"{"alg":"none","typ":"JWT"}"#),
            base64_url(br#"{"sub":"a"}"#)
        );
        assert_eq!(v.verify_connect_now(&none).unwrap_err(), AuthError::Algorithm);
        // A critical header extension the gateway cannot understand.
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["x-policy".into()]);
        let crit =
            jsonwebtoken::encode(&header, &json!({"sub":"a","exp":now+60}), &EncodingKey::from_secret(S)).unwrap();
        assert_eq!(v.verify_connect_now(&crit).unwrap_err(), AuthError::Malformed);
        // Even a `crit` of null.
        let signed = format!(
            "{}.{}",
            base64_url(br#"{"alg":"HS256","crit":null}"#),
            base64_url(format!(r#"{{"sub":"a","exp":{}}}"#, now + 60).as_bytes())
        );
        let sig =
            jsonwebtoken::crypto::sign(signed.as_bytes(), &EncodingKey::from_secret(S), Algorithm::HS256).unwrap();
        let crit_null = format!("{signed}.{sig}");
        assert_eq!(v.verify_connect_now(&crit_null).unwrap_err(), AuthError::Malformed);
        let plain = crit_null.replace(
            &base64_url(br#"{"alg":"HS256","crit":null}"#),
            &base64_url(br#"{"alg":"HS256"}"#),
        );
        assert_eq!(
            v.verify_connect_now(&plain).unwrap_err(),
            AuthError::Signature,
            "the same token without crit is judged on its signature"
        );
    }

    #[test]
    fn room_tokens_are_bound_to_sub_and_room() {
        let v = verifier();
        let t = sign(json!({"sub":"alice","room":"team-7","pub":true,"exp":now_secs()+60}), S);
        assert!(v.verify_room(&t, "alice", "team-7").unwrap().publish);
        assert_eq!(v.verify_room(&t, "bob", "team-7").unwrap_err(), AuthError::WrongSub);
        assert_eq!(v.verify_room(&t, "alice", "team-8").unwrap_err(), AuthError::WrongRoom);
    }

    #[test]
    fn configured_iss_and_aud_are_required_not_only_checked() {
        let mut v = Verifier::new(VerifyOptions {
            issuers: vec!["https://idp".into()],
            audiences: vec!["chat".into()],
            ..Default::default()
        });
        v.add_secret(S).unwrap();
        let exp = now_secs() + 60;
        let ok = sign(json!({"sub":"a","exp":exp,"iss":"https://idp","aud":"chat"}), S);
        assert!(v.verify_connect_now(&ok).is_ok());
        let no_iss = sign(json!({"sub":"a","exp":exp,"aud":"chat"}), S);
        assert_eq!(v.verify_connect_now(&no_iss).unwrap_err(), AuthError::Issuer);
        let no_aud = sign(json!({"sub":"a","exp":exp,"iss":"https://idp"}), S);
        assert_eq!(v.verify_connect_now(&no_aud).unwrap_err(), AuthError::Audience);
        let aud_list = sign(
            json!({"sub":"a","exp":exp,"iss":"https://idp","aud":["account","chat"]}),
            S,
        );
        assert!(v.verify_connect_now(&aud_list).is_ok());
    }

    #[test]
    fn rooms_claim_path_and_forms() {
        let mut v = Verifier::new(VerifyOptions {
            rooms_claim: vec!["realm_access".into(), "chat".into()],
            default_grants: Grants {
                subscribe: vec![Pattern::new("lobby")],
                publish: vec![],
            },
            ..Default::default()
        });
        v.add_secret(S).unwrap();
        let obj = sign(
            json!({"sub":"a","realm_access":{"roles":["x"],"chat":{"sub":["t-*"],"pub":["t-1"]}}}),
            S,
        );
        let g = v.verify_connect_now(&obj).unwrap().grants;
        assert!(g.can_subscribe("t-9") && g.can_publish("t-1") && !g.can_publish("t-2"));
        let list = sign(json!({"sub":"a","realm_access":{"chat":["news"]}}), S);
        let g = v.verify_connect_now(&list).unwrap().grants;
        assert!(g.can_subscribe("news") && !g.can_publish("news"));
        let none = sign(json!({"sub":"a","rooms":{"sub":["*"]}}), S);
        let g = v.verify_connect_now(&none).unwrap().grants;
        assert!(
            g.can_subscribe("lobby") && !g.can_subscribe("other"),
            "the top-level rooms claim is not the path"
        );
        let bad = sign(json!({"sub":"a","realm_access":{"chat":{"sub":"t-1"}}}), S);
        assert_eq!(v.verify_connect_now(&bad).unwrap_err(), AuthError::BadGrants);
    }

    #[test]
    fn issuer_bound_jwks_keys_verify_only_their_issuer() {
        let dir = tempfile::tempdir().unwrap();
        // Two issuers publish an HMAC key under the same kid.
        let set = |k: &[u8]| json!({"keys":[{"kty":"oct","kid":"same","alg":"HS256","k":base64_url(k)}]}).to_string();
        std::fs::write(dir.path().join("a.json"), set(KEY_A)).unwrap();
        std::fs::write(dir.path().join("b.json"), set(KEY_B)).unwrap();
        let mut v = Verifier::new(VerifyOptions::default());
        v.add_jwks(dir.path().join("a.json").to_str().unwrap(), Some("https://a"))
            .unwrap();
        v.add_jwks(dir.path().join("b.json").to_str().unwrap(), Some("https://b"))
            .unwrap();
        let tok = |iss: &str, key: &[u8]| {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("same".into());
            jsonwebtoken::encode(&h, &json!({"sub":"u","iss":iss}), &EncodingKey::from_secret(key)).unwrap()
        };
        assert!(v.verify_connect_now(&tok("https://a", KEY_A)).is_ok());
        assert!(v.verify_connect_now(&tok("https://b", KEY_B)).is_ok());
        assert_eq!(
            v.verify_connect_now(&tok("https://b", KEY_A)).unwrap_err(),
            AuthError::Signature
        );
        assert_eq!(
            v.verify_connect_now(&tok("https://c", KEY_A)).unwrap_err(),
            AuthError::Issuer
        );
    }

    fn base64_url(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }
}
