//! Verification keys: what one key is, what may go wrong loading keys, and
//! how a JWKS document becomes keys.
//!
//! Owns [`VerifyKey`] (a key pinned to an algorithm family, optionally to one
//! algorithm and to an issuer), [`KeyError`] and `parse_jwks`. It is the
//! leaf of `auth`: the verifier (`auth`) and the JWKS URL fetcher
//! ([`crate::auth::jwks`]) both read keys from here and this module uses
//! neither, so the two no longer depend on each other.
//!
//! Does not own which key verifies which token (the lookup in `auth`), token
//! parsing, or fetching over HTTP (`auth::jwks`).
//!
//! Invariants: an HMAC key is never shorter than [`MIN_HMAC_SECRET_BYTES`];
//! a key whose JWK names an algorithm keeps it, and that algorithm's family
//! matches the key's. Keys are immutable once built (shared by `Arc` snapshots).

use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

/// Shortest HS256/384/512 secret accepted, in bytes: RFC 7518 section 3.2
/// requires a key at least as long as the hash output (256 bits for HS256).
/// Shorter secrets fall to brute force from a single token.
pub const MIN_HMAC_SECRET_BYTES: usize = 32;

/// Why the key configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an RSA, EC or Ed25519 public key in PEM")]
    Pem { path: String },
    #[error("{path} is not a JWKS document")]
    Jwks {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} holds no usable signing key")]
    NoUsableKey { path: String },
    #[error("{url} is not an http:// or https:// URL")]
    Url { url: String },
    #[error("cannot build the HTTPS client for JWKS URLs")]
    HttpClient(#[source] std::io::Error),
    #[error("{entry:?} is not ISSUER=FILE_OR_URL")]
    IssuerKeys { entry: String },
    #[error("the JWT secret is empty")]
    EmptySecret,
    #[error("the JWT secret has {len} bytes; HS256 needs at least {MIN_HMAC_SECRET_BYTES} (RFC 7518 section 3.2)")]
    WeakSecret { len: usize },
}

/// One verification key, pinned to an algorithm family (and to one algorithm
/// when its JWK says so), optionally bound to an issuer.
pub struct VerifyKey {
    pub(crate) issuer: Option<Arc<str>>,
    pub(crate) kid: Option<String>,
    pub(crate) family: AlgorithmFamily,
    pub(crate) alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
}

impl VerifyKey {
    pub(crate) fn accepts(&self, alg: Algorithm, iss: Option<&str>) -> bool {
        self.family == alg.family()
            && self.alg.is_none_or(|a| a == alg)
            && self.issuer.as_deref().is_none_or(|i| Some(i) == iss)
    }
}

/// Reads a JWKS document. Keys meant for encryption (`use: enc`, as Keycloak
/// publishes next to its signing keys) and keys of algorithms this node does
/// not verify are skipped, not errors.
pub(crate) fn parse_jwks(bytes: &[u8], issuer: Option<&Arc<str>>) -> Result<Vec<VerifyKey>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(bytes)?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for raw in set.keys {
        if raw.get("use").and_then(Value::as_str).is_some_and(|u| u != "sig") {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        // A symmetric JWK is an HMAC secret: the same floor as --jwt-secret.
        if let AlgorithmParameters::OctetKey(k) = &jwk.algorithm
            && b64(&k.value).map_or(0, |v| v.len()) < MIN_HMAC_SECRET_BYTES
        {
            tracing::warn!(kid = ?jwk.common.key_id, "skipping a JWKS HMAC key shorter than 32 bytes");
            continue;
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => match Algorithm::try_from(a) {
                Ok(a) => Some(a),
                Err(_) => continue,
            },
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let family = key.family();
        if alg.is_some_and(|a| a.family() != family) {
            continue;
        }
        keys.push(VerifyKey {
            issuer: issuer.cloned(),
            kid: jwk.common.key_id.clone(),
            family,
            alg,
            key,
        });
    }
    Ok(keys)
}

/// Decodes one base64url part of a token or a JWK value (padding tolerated).
pub(crate) fn b64(part: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part.trim_end_matches('='))
}
