//! Local JWT verification: connection tokens, room tokens and room grants.
//!
//! Owns the verification keys and the rules of `docs/protocol.md#tokens`. Every
//! node verifies with keys it already holds: no call-out per connect, so a
//! reconnect storm costs CPU on the gateways and nothing elsewhere.
//!
//! Invariants: a token's `alg` must belong to the family of the key that
//! verifies it (an HS token is never checked against a public key's bytes);
//! `none` and unknown algorithms never verify; token text is never logged or
//! echoed.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use jsonwebtoken::{AlgorithmFamily, jwk::JwkSet};
use serde::{Deserialize, Serialize};

/// Longest token accepted, in bytes; anything longer is refused before parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

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
    #[error("token is for another user")]
    WrongSub,
    #[error("room token is for another room")]
    WrongRoom,
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
            Self::WrongSub => "wrong_sub",
            Self::WrongRoom => "wrong_room",
            Self::NoKeys => "no_keys",
        }
    }
}

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
    #[error("JWKS key {kid:?} in {path} cannot be used")]
    Jwk {
        path: String,
        kid: Option<String>,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    #[error("the JWT secret is empty")]
    EmptySecret,
}

/// A room-name pattern: `*` matches any run of room characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Box<str>);

impl Pattern {
    pub fn new(p: &str) -> Self {
        Self(p.into())
    }

    pub fn matches(&self, room: &str) -> bool {
        glob(self.0.as_bytes(), room.as_bytes())
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard match with backtracking to the last `*`.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// What a connection may do with rooms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub subscribe: Vec<Pattern>,
    pub publish: Vec<Pattern>,
}

impl Grants {
    pub fn can_subscribe(&self, room: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(room))
    }

    pub fn can_publish(&self, room: &str) -> bool {
        self.publish.iter().any(|p| p.matches(room))
    }
}

/// A verified connection token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: Option<u64>,
    pub grants: Grants,
}

/// A verified room token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomGrant {
    pub publish: bool,
    pub exp: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RoomsClaim {
    #[serde(default)]
    sub: Vec<String>,
    #[serde(default, rename = "pub")]
    publish: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    rooms: Option<RoomsClaim>,
    #[serde(default)]
    room: Option<String>,
    #[serde(default, rename = "pub")]
    publish: Option<bool>,
}

struct VerifyKey {
    kid: Option<String>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

/// Verification settings beyond the keys.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub leeway_secs: u64,
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    /// Grants of a connection token without a `rooms` claim.
    pub default_grants: Grants,
}

/// The node's verification keys and rules.
pub struct Verifier {
    keys: Vec<VerifyKey>,
    opts: VerifyOptions,
}

impl Verifier {
    pub fn new(opts: VerifyOptions) -> Self {
        Self { keys: Vec::new(), opts }
    }

    /// Whether any key is configured.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Adds an HMAC secret (HS256/384/512).
    pub fn add_secret(&mut self, secret: &[u8]) -> Result<(), KeyError> {
        if secret.is_empty() {
            return Err(KeyError::EmptySecret);
        }
        self.keys.push(VerifyKey {
            kid: None,
            family: AlgorithmFamily::Hmac,
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
        self.keys.push(VerifyKey { kid: None, family, key });
        Ok(())
    }

    /// Adds every key of a JWKS document read from a file.
    pub fn add_jwks_file(&mut self, path: &Path) -> Result<usize, KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let set: JwkSet = serde_json::from_slice(&text).map_err(|source| KeyError::Jwks {
            path: path.display().to_string(),
            source,
        })?;
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let key = DecodingKey::from_jwk(jwk).map_err(|source| KeyError::Jwk {
                path: path.display().to_string(),
                kid: kid.clone(),
                source,
            })?;
            self.keys.push(VerifyKey {
                kid,
                family: key.family(),
                key,
            });
        }
        Ok(set.keys.len())
    }

    fn decode(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        if self.keys.is_empty() {
            return Err(AuthError::NoKeys);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => AuthError::Algorithm,
            _ => AuthError::Malformed,
        })?;
        let family = header.alg.family();
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| k.family == family)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(if self.keys.iter().any(|k| k.family == family) {
                AuthError::UnknownKey
            } else {
                AuthError::Algorithm
            });
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.opts.leeway_secs;
        validation.validate_nbf = true;
        validation.required_spec_claims.clear();
        if self.opts.issuers.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&self.opts.issuers);
        }
        if self.opts.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.opts.audiences);
        }
        let mut last = AuthError::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => AuthError::Signature,
                        ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                        ErrorKind::ImmatureSignature => return Err(AuthError::NotYetValid),
                        ErrorKind::InvalidIssuer => return Err(AuthError::Issuer),
                        ErrorKind::InvalidAudience => return Err(AuthError::Audience),
                        ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                        _ => AuthError::Malformed,
                    }
                }
            }
        }
        Err(last)
    }

    /// Verifies a connection token.
    pub fn verify_connect(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = self.decode(token)?;
        let sub = claims.sub.filter(|s| !s.is_empty()).ok_or(AuthError::MissingSub)?;
        let grants = match claims.rooms {
            Some(r) => Grants {
                subscribe: r.sub.iter().map(|p| Pattern::new(p)).collect(),
                publish: r.publish.iter().map(|p| Pattern::new(p)).collect(),
            },
            None => self.opts.default_grants.clone(),
        };
        Ok(Identity {
            sub,
            exp: claims.exp,
            grants,
        })
    }

    /// Verifies a room token presented by the connection of `sub` for `room`.
    pub fn verify_room(&self, token: &str, sub: &str, room: &str) -> Result<RoomGrant, AuthError> {
        let claims = self.decode(token)?;
        match claims.sub.as_deref() {
            None | Some("") => return Err(AuthError::MissingSub),
            Some(s) if s != sub => return Err(AuthError::WrongSub),
            Some(_) => {}
        }
        if claims.room.as_deref() != Some(room) {
            return Err(AuthError::WrongRoom);
        }
        Ok(RoomGrant {
            publish: claims.publish.unwrap_or(false),
            exp: claims.exp,
        })
    }
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
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        v.add_secret(b"s3cret").unwrap();
        v
    }

    #[test]
    fn patterns() {
        let p = Pattern::new("team-*");
        assert!(p.matches("team-7") && p.matches("team-") && !p.matches("team") && !p.matches("xteam-1"));
        assert!(Pattern::new("*").matches("anything:at_all"));
        assert!(Pattern::new("a*b*c").matches("aXXbYYc") && !Pattern::new("a*b*c").matches("aXXbYY"));
        assert!(Pattern::new("general").matches("general") && !Pattern::new("general").matches("general2"));
    }

    #[test]
    fn a_good_token_gives_grants() {
        let t = sign(
            json!({"sub":"alice","exp":now_secs()+60,"rooms":{"sub":["general","team-*"],"pub":["general"]}}),
            b"s3cret",
        );
        let id = verifier().verify_connect(&t).unwrap();
        assert_eq!(id.sub, "alice");
        assert!(id.grants.can_subscribe("team-1") && !id.grants.can_publish("team-1"));
        assert!(id.grants.can_publish("general"));
    }

    #[test]
    fn rejections() {
        let v = verifier();
        let now = now_secs();
        let cases = [
            (sign(json!({"sub":"a","exp":now-60}), b"s3cret"), AuthError::Expired),
            (sign(json!({"sub":"a","nbf":now+60}), b"s3cret"), AuthError::NotYetValid),
            (sign(json!({"sub":"a"}), b"other"), AuthError::Signature),
            (sign(json!({"exp":now+60}), b"s3cret"), AuthError::MissingSub),
            ("garbage".to_string(), AuthError::Malformed),
            ("x".repeat(MAX_TOKEN_BYTES + 1), AuthError::TooLarge),
        ];
        for (token, want) in cases {
            assert_eq!(v.verify_connect(&token).unwrap_err(), want);
        }
        // alg none never verifies.
        let none = format!(
            "{}.{}.",
            base64_url(br#"{"alg":"none","typ":"JWT"}"#),
            base64_url(br#"{"sub":"a"}"#)
        );
        assert!(v.verify_connect(&none).is_err());
    }

    #[test]
    fn room_tokens_are_bound_to_sub_and_room() {
        let v = verifier();
        let t = sign(
            json!({"sub":"alice","room":"team-7","pub":true,"exp":now_secs()+60}),
            b"s3cret",
        );
        assert!(v.verify_room(&t, "alice", "team-7").unwrap().publish);
        assert_eq!(v.verify_room(&t, "bob", "team-7").unwrap_err(), AuthError::WrongSub);
        assert_eq!(v.verify_room(&t, "alice", "team-8").unwrap_err(), AuthError::WrongRoom);
    }

    fn base64_url(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }
}
