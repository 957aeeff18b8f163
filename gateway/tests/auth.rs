//! Authentication and transport security over real sockets: every token
//! rejection, JWKS URLs (rotation, junk `kid` floods), issuer-bound keys,
//! room tokens, refresh and expiry, `Authorization: Bearer`, Origin, and
//! `wss://` with a certificate swapped under a running node.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, Ended, SECRET, TestNode, within};
use futures_util::{SinkExt, StreamExt};
use gateway::auth::now_secs;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ISS: &str = "https://idp.test/realms/chat";
const AUD: &str = "chat-gateway";

fn key_path(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn rsa(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(key_path(&format!("{name}.pem"))).unwrap()).unwrap()
}

fn ec(alg: &'static rcgen::SignatureAlgorithm) -> EncodingKey {
    let pair = rcgen::KeyPair::generate_for(alg).unwrap();
    EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap()
}

/// Ed25519 from a fixture: rcgen writes PKCS#8 v2, which jsonwebtoken's
/// JWK export does not read.
fn ed() -> EncodingKey {
    EncodingKey::from_ed_pem(&std::fs::read(key_path("ed25519.pem")).unwrap()).unwrap()
}

fn sign_with(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(String::from);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

/// A public JWK for `key`; `pin` keeps the JWK's `alg` (else family only).
fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str, pin: bool) -> Value {
    let mut j = Jwk::from_encoding_key(key, alg).unwrap();
    j.common.key_id = Some(kid.to_string());
    if !pin {
        j.common.key_algorithm = None;
    }
    let mut v = serde_json::to_value(j).unwrap();
    v["use"] = json!("sig");
    v
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISS, "aud": AUD, "exp": now_secs() + 600, "rooms": {"sub": ["*"], "pub": ["*"]}})
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A token whose header names `kid`, with a signature no key will match.
fn junk_kid_token(kid: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(json!({"alg":"RS256","typ":"JWT","kid":kid}).to_string().as_bytes()),
        b64(claims("junk").to_string().as_bytes()),
        b64(&[7u8; 256])
    )
}

/// Connects with `token`; returns the reply and, when refused, how it ended.
async fn try_connect(node: &TestNode, token: &str) -> (Value, Option<Ended>) {
    let mut c = Client::open(&node.url()).await;
    let r = c.connect(token).await;
    if r.get("ok").is_some() {
        (r, None)
    } else {
        let ended = c.closed().await;
        (r, Some(ended))
    }
}

async fn assert_refused(node: &TestNode, token: &str, what: &str) {
    let (r, ended) = try_connect(node, token).await;
    assert_eq!(r["error"]["code"], "unauthorized", "{what}: {r}");
    assert_eq!(ended, Some(Ended::Close(4001)), "{what}");
    if token.len() > 8 {
        assert!(!r.to_string().contains(token), "{what}: the token is echoed");
    }
}

async fn assert_accepted(node: &TestNode, token: &str, what: &str) {
    let (r, _) = try_connect(node, token).await;
    assert!(r.get("ok").is_some(), "{what}: {r}");
}

fn write_tmp(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A JWKS endpoint on 127.0.0.1:0 that counts its requests.
struct JwksServer {
    url: String,
    body: Arc<parking_lot::Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/realms/chat/protocol/openid-connect/certs",
            listener.local_addr().unwrap()
        );
        let body = Arc::new(parking_lot::Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = b.lock().clone();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self { url, body, hits }
    }

    fn set(&self, body: String) {
        *self.body.lock() = body;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A node verifying with an HS secret and a JWKS file (RSA `rsa-a`, no
/// `alg` pin), requiring [`ISS`] and [`AUD`].
async fn strict_node(dir: &tempfile::TempDir) -> TestNode {
    let set = jwks(&[jwk(&rsa("rsa_a"), Algorithm::RS256, "rsa-a", false)]);
    let path = write_tmp(dir, "jwks.json", &set);
    TestNode::with(|o| {
        o.jwks = Some(path);
        o.jwt_issuer = Some(vec![ISS.into()]);
        o.jwt_audience = Some(vec![AUD.into()]);
        o.jwt_leeway_secs = Some(0);
    })
    .await
}

/// [`TestNode::assert_serving`] for [`strict_node`]: two users with RS256
/// tokens that carry [`ISS`] and [`AUD`] chat.
async fn assert_strict_serving(node: &TestNode) {
    let key = rsa("rsa_a");
    let room = format!("health-{}", common::rand_suffix());
    let mut a = Client::open(&node.url()).await;
    let mut b = Client::open(&node.url()).await;
    for (c, sub) in [(&mut a, "health-a"), (&mut b, "health-b")] {
        let r = c
            .connect(&sign_with(Algorithm::RS256, Some("rsa-a"), &key, &claims(sub)))
            .await;
        assert!(r.get("ok").is_some(), "{r}");
    }
    b.subscribe(&[&room]).await;
    assert!(a.publish(&room, json!("still here")).await.get("ok").is_some());
    assert_eq!(b.next_push().await["data"], "still here");
}

#[tokio::test]
async fn every_bad_connect_token_is_unauthorized_4001_and_the_node_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = strict_node(&dir).await;
    let key = rsa("rsa_a");
    let now = now_secs();
    let good = |patch: Value| {
        let mut c = claims("mallory");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        sign_with(Algorithm::RS256, Some("rsa-a"), &key, &c)
    };
    assert_accepted(&node, &good(json!({})), "the control token").await;

    let pub_pem = std::fs::read(key_path("rsa_a.pub.pem")).unwrap();
    let confused = sign_with(
        Algorithm::HS256,
        Some("rsa-a"),
        &EncodingKey::from_secret(&pub_pem),
        &claims("mallory"),
    );
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("mallory").to_string().as_bytes())
    );
    let big = format!("{}.{}.sig", b64(br#"{"alg":"RS256"}"#), "A".repeat(40 * 1024));
    let other_key = sign_with(Algorithm::RS256, Some("rsa-a"), &rsa("rsa_b"), &claims("mallory"));
    let cases = [
        (good(json!({"exp": now - 10})), "expired"),
        (good(json!({"nbf": now + 600})), "not yet valid"),
        (good(json!({"iss": "https://evil.test/realms/chat"})), "wrong iss"),
        (good(json!({"iss": null})), "no iss"),
        (good(json!({"aud": "someone-else"})), "wrong aud"),
        (good(json!({"sub": null})), "no sub"),
        (good(json!({"sub": ""})), "empty sub"),
        (good(json!({"rooms": "everything"})), "malformed rooms claim"),
        (
            sign_with(Algorithm::RS256, Some("unknown"), &key, &claims("mallory")),
            "unknown kid",
        ),
        (other_key, "signed by another key"),
        (confused, "HS256 signed with the RSA public key (algorithm confusion)"),
        (
            sign_with(
                Algorithm::HS256,
                None,
                &EncodingKey::from_secret(SECRET.as_bytes()),
                &claims("mallory"),
            )
            .replace("eyJ", "eyK"),
            "tampered",
        ),
        (none, "alg none"),
        ("garbage".to_string(), "garbage"),
        ("a.b.c".to_string(), "three garbage parts"),
        (String::new(), "empty"),
        (big, "40 KiB token inside a frame under the 64 KiB limit"),
    ];
    for (token, what) in &cases {
        assert_refused(&node, token, what).await;
    }

    // A 1 MiB token exceeds the frame limit: close 1009 before any parsing.
    let mut c = Client::open(&node.url()).await;
    let huge = json!({"id":1,"op":"connect","token":"x".repeat(1 << 20)}).to_string();
    let _ = c.ws.send(Message::text(huge)).await;
    assert_eq!(c.closed().await, Ended::Close(1009));

    // Refusals are counted by reason.
    let metrics = common::http_get(&node.http("/metrics")).await.1;
    for reason in [
        "expired",
        "not_yet_valid",
        "issuer",
        "audience",
        "missing_sub",
        "unknown_key",
        "signature",
        "algorithm",
        "malformed",
        "too_large",
        "bad_grants",
    ] {
        assert!(
            metrics.contains(&format!("gateway_auth_failures_total{{reason=\"{reason}\"}}")),
            "{reason} not counted"
        );
    }
    assert_strict_serving(&node).await;
}

#[tokio::test]
async fn algorithm_confusion_against_a_node_with_only_an_rsa_public_key() {
    let node = TestNode::with(|o| {
        o.jwt_secret = None;
        o.jwt_public_key = Some(vec![key_path("rsa_a.pub.pem").into()]);
    })
    .await;
    let c = json!({"sub":"u","exp":now_secs()+60,"rooms":{"sub":["*"],"pub":["*"]}});
    assert_accepted(&node, &sign_with(Algorithm::RS256, None, &rsa("rsa_a"), &c), "RS256").await;
    let pub_pem = std::fs::read(key_path("rsa_a.pub.pem")).unwrap();
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let t = sign_with(alg, None, &EncodingKey::from_secret(&pub_pem), &c);
        assert_refused(&node, &t, "HMAC over the public key").await;
    }
    // The RSA key does not verify EC tokens either.
    let t = sign_with(Algorithm::ES256, None, &ec(&rcgen::PKCS_ECDSA_P256_SHA256), &c);
    assert_refused(&node, &t, "ES256 against an RSA key").await;
    let mut ok = Client::open(&node.url()).await;
    let r = ok.connect(&sign_with(Algorithm::RS256, None, &rsa("rsa_a"), &c)).await;
    assert!(r.get("ok").is_some());
    ok.subscribe(&["x"]).await;
}

#[tokio::test]
async fn every_algorithm_verifies_with_its_own_key_family_only() {
    let dir = tempfile::tempdir().unwrap();
    let rsa_key = rsa("rsa_a");
    let (ec256, ec384, ed25519) = (
        ec(&rcgen::PKCS_ECDSA_P256_SHA256),
        ec(&rcgen::PKCS_ECDSA_P384_SHA384),
        ed(),
    );
    let set = jwks(&[
        jwk(&rsa_key, Algorithm::RS256, "rsa", false),
        jwk(&ec256, Algorithm::ES256, "ec256", true),
        jwk(&ec384, Algorithm::ES384, "ec384", true),
        jwk(&ed25519, Algorithm::EdDSA, "ed", true),
        // Keycloak publishes an encryption key next to its signing keys.
        json!({"kid":"enc","kty":"RSA","alg":"RSA-OAEP","use":"enc","n":"qqqq","e":"AQAB"}),
    ]);
    let path = write_tmp(&dir, "jwks.json", &set);
    let node = TestNode::with(|o| o.jwks = Some(path)).await;
    let c = claims("alg-user");
    let hs = |alg| sign_with(alg, None, &EncodingKey::from_secret(SECRET.as_bytes()), &c);
    for (alg, token) in [
        ("HS256", hs(Algorithm::HS256)),
        ("HS384", hs(Algorithm::HS384)),
        ("HS512", hs(Algorithm::HS512)),
        ("RS256", sign_with(Algorithm::RS256, Some("rsa"), &rsa_key, &c)),
        ("RS384", sign_with(Algorithm::RS384, Some("rsa"), &rsa_key, &c)),
        ("RS512", sign_with(Algorithm::RS512, Some("rsa"), &rsa_key, &c)),
        ("PS256", sign_with(Algorithm::PS256, Some("rsa"), &rsa_key, &c)),
        ("PS384", sign_with(Algorithm::PS384, Some("rsa"), &rsa_key, &c)),
        ("PS512", sign_with(Algorithm::PS512, Some("rsa"), &rsa_key, &c)),
        ("ES256", sign_with(Algorithm::ES256, Some("ec256"), &ec256, &c)),
        ("ES384", sign_with(Algorithm::ES384, Some("ec384"), &ec384, &c)),
        ("EdDSA", sign_with(Algorithm::EdDSA, Some("ed"), &ed25519, &c)),
    ] {
        assert_accepted(&node, &token, alg).await;
    }
    // A kid that names a key of another family, or of another pinned
    // algorithm of the same family, never verifies.
    for (what, token) in [
        (
            "RS256 naming an EC key",
            sign_with(Algorithm::RS256, Some("ec256"), &rsa_key, &c),
        ),
        (
            "ES384 naming an ES256 key",
            sign_with(Algorithm::ES384, Some("ec256"), &ec384, &c),
        ),
        (
            "ES256 naming the encryption key",
            sign_with(Algorithm::ES256, Some("enc"), &ec256, &c),
        ),
    ] {
        assert_refused(&node, &token, what).await;
    }
    node.assert_serving().await;
}

#[tokio::test]
async fn keys_are_looked_up_by_issuer_and_kid_together() {
    // Two issuers publish a key under the same kid. A token that claims
    // issuer B but is signed with A's key must not pass (a cache keyed by kid
    // alone would let it).
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (rsa("rsa_a"), rsa("rsa_b"));
    let iss_a = "https://idp-a.test/realms/a";
    let iss_b = "https://idp-b.test/realms/b";
    let file_a = write_tmp(&dir, "a.json", &jwks(&[jwk(&a, Algorithm::RS256, "shared", true)]));
    let server_b = JwksServer::start(jwks(&[jwk(&b, Algorithm::RS256, "shared", true)])).await;
    let node = TestNode::with(|o| {
        o.jwt_secret = None;
        o.jwt_issuer_keys = Some(vec![format!("{iss_a}={file_a}"), format!("{iss_b}={}", server_b.url)]);
    })
    .await;
    let tok = |iss: &str, key: &EncodingKey| {
        let mut c = claims("u");
        c["iss"] = json!(iss);
        sign_with(Algorithm::RS256, Some("shared"), key, &c)
    };
    assert_accepted(&node, &tok(iss_a, &a), "A's token, A's key").await;
    assert_accepted(&node, &tok(iss_b, &b), "B's token, B's key").await;
    assert_refused(&node, &tok(iss_b, &a), "claims B, signed by A").await;
    assert_refused(&node, &tok(iss_a, &b), "claims A, signed by B").await;
    assert_refused(&node, &tok("https://idp-c.test", &a), "unknown issuer").await;
    let mut no_iss = claims("u");
    no_iss.as_object_mut().unwrap().remove("iss");
    assert_refused(
        &node,
        &sign_with(Algorithm::RS256, Some("shared"), &a, &no_iss),
        "no iss",
    )
    .await;
}

#[tokio::test]
async fn jwks_url_rotation_is_picked_up_on_first_use_of_the_new_key() {
    let (k1, k2) = (rsa("rsa_a"), rsa("rsa_b"));
    let server = JwksServer::start(jwks(&[jwk(&k1, Algorithm::RS256, "k1", true)])).await;
    let url = server.url.clone();
    let node = TestNode::with(|o| {
        o.jwt_secret = None;
        o.jwks = Some(url);
        o.jwt_issuer = Some(vec![ISS.into()]);
    })
    .await;
    assert_accepted(&node, &sign_with(Algorithm::RS256, Some("k1"), &k1, &claims("a")), "k1").await;
    let before = server.hits();
    assert!(before >= 1, "fetched at start");
    // The IdP rotates: k2 appears (k1 stays for tokens already issued).
    server.set(jwks(&[
        jwk(&k1, Algorithm::RS256, "k1", true),
        jwk(&k2, Algorithm::RS256, "k2", true),
    ]));
    assert_accepted(
        &node,
        &sign_with(Algorithm::RS256, Some("k2"), &k2, &claims("b")),
        "k2 on first use",
    )
    .await;
    assert_eq!(server.hits(), before + 1, "one refetch for the new kid");
    // k2 is held now: more tokens cost no fetch.
    for i in 0..5 {
        assert_accepted(
            &node,
            &sign_with(Algorithm::RS256, Some("k2"), &k2, &claims(&format!("c{i}"))),
            "k2",
        )
        .await;
    }
    assert_eq!(server.hits(), before + 1);
    // A key that the IdP retires is dropped at the next fetch.
    server.set(jwks(&[jwk(&k2, Algorithm::RS256, "k2", true)]));
    node.running.node.verifier.remote_sources()[0].fetch_now().await;
    assert_refused(
        &node,
        &sign_with(Algorithm::RS256, Some("k1"), &k1, &claims("d")),
        "retired k1",
    )
    .await;
}

#[tokio::test]
async fn a_burst_of_1000_unknown_kids_makes_at_most_a_handful_of_jwks_fetches() {
    let k1 = rsa("rsa_a");
    let server = JwksServer::start(jwks(&[jwk(&k1, Algorithm::RS256, "k1", true)])).await;
    let url = server.url.clone();
    let node = Arc::new(
        TestNode::with(|o| {
            o.jwt_secret = None;
            o.jwks = Some(url);
        })
        .await,
    );
    assert_accepted(&node, &sign_with(Algorithm::RS256, Some("k1"), &k1, &claims("a")), "k1").await;
    let before = server.hits();
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    for _ in 0..1000 {
        let (node, refused, gate) = (node.clone(), refused.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let kid = format!("junk-{:016x}", rand::random::<u64>());
            let (r, ended) = try_connect(&node, &junk_kid_token(&kid)).await;
            if r["error"]["code"] == "unauthorized" && ended == Some(Ended::Close(4001)) {
                refused.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    within(async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    })
    .await;
    assert_eq!(refused.load(Ordering::SeqCst), 1000);
    let fetches = server.hits() - before;
    eprintln!("JWKS fetches for 1000 junk kids: {fetches}");
    assert!(fetches <= 3, "{fetches} JWKS fetches for 1000 junk kids");
    assert_accepted(
        &node,
        &sign_with(Algorithm::RS256, Some("k1"), &k1, &claims("b")),
        "k1 after",
    )
    .await;
}

#[tokio::test]
async fn rooms_claim_at_a_configured_path_and_a_default_grant() {
    let node = TestNode::with(|o| {
        o.jwt_rooms_claim = Some("chat.rooms".into());
        o.default_rooms = Some(vec!["lobby".into()]);
        o.default_pub = Some(vec!["lobby".into()]);
    })
    .await;
    let hs = |c: &Value| common::sign(c);
    // Keycloak-style: grants nested under a mapper's claim.
    let mut c = Client::open(&node.url()).await;
    let t = hs(&json!({"sub":"kc","exp":now_secs()+60,"chat":{"rooms":{"sub":["team-*"],"pub":["team-1"]}}}));
    assert!(c.connect(&t).await.get("ok").is_some());
    let r = c
        .request(json!({"op":"subscribe","rooms":[{"room":"team-2"},{"room":"lobby"}]}))
        .await;
    assert!(r["ok"]["rooms"][0].get("error").is_none(), "{r}");
    assert_eq!(r["ok"]["rooms"][1]["error"]["code"], "forbidden");
    assert!(c.publish("team-1", json!(1)).await.get("ok").is_some());
    assert_eq!(c.publish("team-2", json!(1)).await["error"]["code"], "forbidden");
    // A list at the path grants subscribing only.
    let mut l = Client::open(&node.url()).await;
    let t = hs(&json!({"sub":"list","chat":{"rooms":["news"]}}));
    assert!(l.connect(&t).await.get("ok").is_some());
    l.subscribe(&["news"]).await;
    assert_eq!(l.publish("news", json!(1)).await["error"]["code"], "forbidden");
    // No grants in the token: the configured default.
    let mut d = Client::open(&node.url()).await;
    assert!(d.connect(&hs(&json!({"sub":"plain"}))).await.get("ok").is_some());
    d.subscribe(&["lobby"]).await;
    assert!(d.publish("lobby", json!("hi")).await.get("ok").is_some());
    let r = d.request(json!({"op":"subscribe","rooms":[{"room":"team-1"}]})).await;
    assert_eq!(r["ok"]["rooms"][0]["error"]["code"], "forbidden");
}

#[tokio::test]
async fn room_tokens_for_another_user_or_room_or_expired_are_forbidden() {
    let dir = tempfile::tempdir().unwrap();
    let node = strict_node(&dir).await;
    let key = rsa("rsa_a");
    let mut c = Client::open(&node.url()).await;
    let mut conn_claims = claims("alice");
    conn_claims["rooms"] = json!({"sub":["general"],"pub":[]});
    assert!(
        c.connect(&sign_with(Algorithm::RS256, Some("rsa-a"), &key, &conn_claims))
            .await
            .get("ok")
            .is_some()
    );
    let room_token = |sub: &str, room: &str, exp: u64| {
        sign_with(
            Algorithm::RS256,
            Some("rsa-a"),
            &key,
            &json!({"sub":sub,"room":room,"pub":true,"exp":exp,"iss":ISS,"aud":AUD}),
        )
    };
    let exp = now_secs() + 600;
    let r = c
        .request(json!({"op":"subscribe","rooms":[
            {"room":"team-7","token":room_token("alice","team-7",exp)},
            {"room":"team-8","token":room_token("bob","team-8",exp)},
            {"room":"team-9","token":room_token("alice","team-1",exp)},
            {"room":"team-10","token":room_token("alice","team-10",now_secs() - 60)},
            {"room":"team-11","token":"garbage"},
            {"room":"team-12","token":sign_with(Algorithm::RS256, Some("rsa-a"), &rsa("rsa_b"), &json!({"sub":"alice","room":"team-12","iss":ISS,"aud":AUD}))}]}))
        .await;
    let rooms = r["ok"]["rooms"].as_array().unwrap();
    assert!(rooms[0].get("error").is_none(), "{r}");
    for e in &rooms[1..] {
        assert_eq!(e["error"]["code"], "forbidden", "{e}");
        assert!(!e.to_string().contains("eyJ"), "tokens are never echoed: {e}");
    }
    assert!(c.publish("team-7", json!("ok")).await.get("ok").is_some());
    assert_eq!(c.publish("team-8", json!("no")).await["error"]["code"], "forbidden");
    assert_strict_serving(&node).await;
}

#[tokio::test]
async fn refresh_with_another_sub_or_a_bad_token_is_refused_and_the_connection_stays() {
    let node = TestNode::start().await;
    let mut c = node.client("alice").await;
    c.subscribe(&["r"]).await;
    let exp = now_secs() + 600;
    for (token, what) in [
        (common::sign(&json!({"sub":"bob","exp":exp})), "another sub"),
        (common::sign(&json!({"sub":"alice","exp":now_secs() - 60})), "expired"),
        ("garbage".to_string(), "garbage"),
    ] {
        let r = c.request(json!({"op":"refresh","token":token})).await;
        assert_eq!(r["error"]["code"], "unauthorized", "{what}: {r}");
    }
    let mut p = node.client("p").await;
    p.publish("r", json!("still")).await;
    assert_eq!(c.next_push().await["data"], "still");
    let r = c.request(json!({"op":"ping"})).await;
    assert!(r.get("ok").is_some());
}

#[tokio::test]
async fn refresh_recomputes_grants_and_pushes_unsubscribed_for_revoked_rooms() {
    let node = TestNode::start().await;
    let exp = now_secs() + 600;
    let mut c = Client::open(&node.url()).await;
    let t = common::sign(&json!({"sub":"alice","exp":exp,"rooms":{"sub":["a","b"],"pub":["a","b"]}}));
    assert!(c.connect(&t).await.get("ok").is_some());
    c.subscribe(&["a", "b"]).await;
    let narrower = common::sign(&json!({"sub":"alice","exp":exp + 60,"rooms":{"sub":["a"],"pub":["a"]}}));
    let r = c.request(json!({"op":"refresh","token":narrower})).await;
    assert!(r["ok"]["expires_in"].as_u64().unwrap() > 600, "{r}");
    let push = c.next_push().await;
    assert_eq!(push["op"], "unsubscribed");
    assert_eq!(push["room"], "b");
    assert_eq!(push["error"]["code"], "forbidden");
    let mut p = node.client("p").await;
    p.publish("b", json!("gone")).await;
    p.publish("a", json!("kept")).await;
    assert_eq!(c.next_push().await["data"], "kept");
    assert_eq!(c.publish("b", json!(1)).await["error"]["code"], "forbidden");
}

fn wall_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test]
async fn expiry_closes_4010_on_time_and_refresh_before_expiry_keeps_subscriptions() {
    let node = TestNode::with(|o| o.jwt_leeway_secs = Some(0)).await;
    let exp = now_secs() + 2;
    let short = |sub: &str| common::sign(&json!({"sub":sub,"exp":exp,"rooms":{"sub":["*"],"pub":["*"]}}));
    let mut expiring = Client::open(&node.url()).await;
    assert!(expiring.connect(&short("eve")).await.get("ok").is_some());
    let mut kept = Client::open(&node.url()).await;
    assert!(kept.connect(&short("rita")).await.get("ok").is_some());
    kept.subscribe(&["keep"]).await;
    let longer = common::sign(&json!({"sub":"rita","exp":exp + 600,"rooms":{"sub":["*"],"pub":["*"]}}));
    let r = kept.request(json!({"op":"refresh","token":longer})).await;
    assert!(r["ok"]["expires_in"].as_u64().unwrap() > 590, "{r}");

    assert_eq!(expiring.closed().await, Ended::Close(4010));
    let at = wall_secs();
    assert!(at >= exp as f64, "closed {:.3} s before exp", exp as f64 - at);
    assert!(at < exp as f64 + 2.0, "closed {:.3} s after exp", at - exp as f64);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut p = node.client("p").await;
    p.publish("keep", json!("after the first exp")).await;
    assert_eq!(kept.next_push().await["data"], "after the first exp");
}

fn upgrade_request(url: &str, headers: &[(&str, &str)]) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_str(v).unwrap(),
        );
    }
    req
}

#[tokio::test]
async fn authorization_bearer_on_the_upgrade_is_equivalent_to_connect() {
    let node = TestNode::start().await;
    let good = common::token("bot", &["*"], &["*"]);
    let bearer = format!("Bearer {good}");
    // No connect frame needed.
    let mut c = Client::try_open(upgrade_request(&node.url(), &[("authorization", &bearer)]))
        .await
        .expect("upgrade");
    c.subscribe(&["r"]).await;
    assert!(c.publish("r", json!("from a bot")).await.get("ok").is_some());
    assert_eq!(c.next_push().await["from"], "bot");
    // A connect frame first is still answered like any connect.
    let mut c2 = Client::try_open(upgrade_request(&node.url(), &[("authorization", &bearer)]))
        .await
        .expect("upgrade");
    let r = c2.connect(&good).await;
    assert_eq!(r["ok"]["node"], "test-node", "{r}");
    // Bad headers are refused with 401 before the upgrade.
    let expired = common::sign(&json!({"sub":"bot","exp":now_secs() - 60}));
    let over_limit = format!("{}.{}.sig", b64(br#"{"alg":"HS256"}"#), "A".repeat(20 * 1024));
    for (value, what) in [
        (format!("Bearer {expired}"), "expired"),
        ("Bearer garbage".to_string(), "garbage"),
        (format!("Basic {}", b64(b"u:p")), "not bearer"),
        (format!("Bearer {over_limit}"), "20 KiB token"),
    ] {
        let status = Client::try_open(upgrade_request(&node.url(), &[("authorization", &value)])).await;
        assert_eq!(status.err(), Some(401), "{what}");
    }
    // A 1 MiB header never reaches the verifier: the HTTP layer refuses it.
    let huge = format!("Bearer {}", "A".repeat(1 << 20));
    let status = Client::try_open(upgrade_request(&node.url(), &[("authorization", &huge)]))
        .await
        .err();
    eprintln!("1 MiB Authorization header: HTTP {status:?}");
    assert!(matches!(status, Some(431 | 0)), "{status:?}");
    node.assert_serving().await;
}

#[tokio::test]
async fn origin_allowlist_accepts_listed_origins_and_refuses_others_with_403() {
    let node = TestNode::with(|o| {
        o.allowed_origins = Some(vec!["https://chat.example.com".into()]);
        o.allow_no_origin = Some(false);
    })
    .await;
    let mut ok = Client::try_open(upgrade_request(&node.url(), &[("origin", "https://chat.example.com")]))
        .await
        .expect("allowed origin upgrades");
    assert!(ok.connect(&node.token("alice")).await.get("ok").is_some());
    for origin in ["https://evil.example.net", "http://chat.example.com", "null"] {
        let r = Client::try_open(upgrade_request(&node.url(), &[("origin", origin)])).await;
        assert_eq!(r.err(), Some(403), "{origin}");
    }
    let r = Client::try_open(upgrade_request(&node.url(), &[])).await;
    assert_eq!(r.err(), Some(403), "no Origin while allow_no_origin is false");
    let mut ok2 = Client::try_open(upgrade_request(&node.url(), &[("origin", "https://chat.example.com")]))
        .await
        .unwrap();
    ok2.connect(&node.token("bob")).await;
    ok2.subscribe(&["o"]).await;
    ok.publish("o", json!("hi")).await;
    assert_eq!(ok2.next_push().await["data"], "hi");
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

fn self_signed() -> (String, String, rustls::pki_types::CertificateDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem(), c.cert.der().clone())
}

/// Opens `wss://localhost/ws` at `addr`, trusting only `root`.
async fn wss_open(addr: SocketAddr, root: &rustls::pki_types::CertificateDer<'static>) -> Result<Wss, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(gateway::transport::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = within(connector.connect(name, tcp)).await.map_err(|e| e.to_string())?;
    let (ws, _) = within(tokio_tungstenite::client_async(
        format!("wss://localhost:{}/ws", addr.port()),
        tls,
    ))
    .await
    .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// A `wss://` client that keeps pushes read while waiting for a reply.
struct WssClient {
    ws: Wss,
    pushes: std::collections::VecDeque<Value>,
}

impl WssClient {
    async fn request(&mut self, cmd: Value) -> Value {
        let id = cmd["id"].clone();
        self.ws.send(Message::text(cmd.to_string())).await.unwrap();
        loop {
            let v = self.next_frame().await;
            if v["id"] == id {
                return v;
            }
            self.pushes.push_back(v);
        }
    }

    async fn next_push(&mut self) -> Value {
        if let Some(p) = self.pushes.pop_front() {
            return p;
        }
        loop {
            let v = self.next_frame().await;
            if v.get("id").is_none() {
                return v;
            }
        }
    }

    async fn next_frame(&mut self) -> Value {
        loop {
            match within(self.ws.next()).await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("wss connection ended: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn wss_round_trip_and_a_certificate_swap_seen_by_new_connections_only() {
    gateway::transport::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a, root_a) = self_signed();
    let cert_path = write_tmp(&dir, "tls.crt", &cert_a);
    let key_path = write_tmp(&dir, "tls.key", &key_a);
    let node = TestNode::with(|o| {
        o.tls_cert = Some(cert_path.clone().into());
        o.tls_key = Some(key_path.clone().into());
        o.tls_reload_ms = Some(100);
    })
    .await;
    let addr = node.running.addr;
    let mut old = WssClient {
        ws: wss_open(addr, &root_a).await.expect("wss with certificate A"),
        pushes: Default::default(),
    };
    let r = old
        .request(json!({"id":1,"op":"connect","token":node.token("old")}))
        .await;
    assert!(r.get("ok").is_some(), "{r}");
    old.request(json!({"id":2,"op":"subscribe","rooms":[{"room":"tls"}]}))
        .await;
    old.request(json!({"id":3,"op":"publish","room":"tls","data":"round trip"}))
        .await;
    assert_eq!(old.next_push().await["data"], "round trip");

    // Renewal: certificate B replaces A on disk (key first, then cert, like a
    // non-atomic copy; the half-written state is never served).
    let (cert_b, key_b, root_b) = self_signed();
    std::fs::write(&key_path, key_b).unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    std::fs::write(&cert_path, cert_b).unwrap();
    let mut new = None;
    for _ in 0..50 {
        if let Ok(ws) = wss_open(addr, &root_b).await {
            new = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut new = WssClient {
        ws: new.expect("new connections see certificate B"),
        pushes: Default::default(),
    };
    assert!(
        wss_open(addr, &root_a).await.is_err(),
        "certificate A is no longer served"
    );
    let r = new
        .request(json!({"id":1,"op":"connect","token":node.token("new")}))
        .await;
    assert!(r.get("ok").is_some(), "{r}");
    new.request(json!({"id":2,"op":"publish","room":"tls","data":"after the swap"}))
        .await;
    // The connection made under certificate A keeps working.
    assert_eq!(old.next_push().await["data"], "after the swap");
    old.request(json!({"id":4,"op":"publish","room":"tls","data":"old still talks"}))
        .await;
    assert_eq!(old.next_push().await["data"], "old still talks");
    // Plain ws:// on a TLS port does not upgrade.
    assert!(tokio_tungstenite::connect_async(node.url()).await.is_err());
}

/// Authenticated connects per second on one node: TCP connect, upgrade,
/// `connect` with a token, reply. The node runs on one worker thread and the
/// clients on another thread, so each has about one core. A measurement, not
/// a check:
/// `cargo test --release -p gateway --test auth -- --ignored --nocapture authenticated_connects_per_second`
#[test]
#[ignore = "measurement; run with --release -- --ignored --nocapture"]
fn authenticated_connects_per_second() {
    const TOTAL: usize = 4000;
    const CONCURRENCY: usize = 32;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rsa_key = rsa("rsa_a");
    let ec_key = ec(&rcgen::PKCS_ECDSA_P256_SHA256);
    let path = write_tmp(
        &dir,
        "jwks.json",
        &jwks(&[
            jwk(&rsa_key, Algorithm::RS256, "rsa", true),
            jwk(&ec_key, Algorithm::ES256, "ec", true),
        ]),
    );
    let c = claims("bench");
    let cases = [
        (
            "HS256",
            sign_with(Algorithm::HS256, None, &EncodingKey::from_secret(SECRET.as_bytes()), &c),
        ),
        ("RS256", sign_with(Algorithm::RS256, Some("rsa"), &rsa_key, &c)),
        ("ES256", sign_with(Algorithm::ES256, Some("ec"), &ec_key, &c)),
    ];
    for (name, token) in cases {
        let mut opts = common::test_opts();
        opts.jwks = Some(path.clone());
        opts.max_connections = Some(100_000);
        let cfg = gateway::Config::resolve(opts).unwrap();
        let running = server_rt.block_on(gateway::Running::bind_local(cfg)).unwrap();
        let url = format!("ws://{}/ws", running.addr);
        let rate = client_rt.block_on(async {
            let next = Arc::new(AtomicUsize::new(0));
            let started = std::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..CONCURRENCY {
                let (next, url, token) = (next.clone(), url.clone(), token.clone());
                tasks.spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < TOTAL {
                        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
                        let frame = json!({"id":1,"op":"connect","token":token}).to_string();
                        ws.send(Message::text(frame)).await.unwrap();
                        match ws.next().await {
                            Some(Ok(Message::Text(t))) => assert!(t.contains("\"ok\""), "{t}"),
                            other => panic!("{other:?}"),
                        }
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
            TOTAL as f64 / started.elapsed().as_secs_f64()
        });
        println!("authenticated connects/s, {name}: {rate:.0} ({TOTAL} connects, {CONCURRENCY} at a time)");
        server_rt.block_on(running.shutdown());
    }
}

/// The binary as an operator runs it: `--tls-cert/--tls-key` serve `wss://`,
/// and SIGHUP reloads a renewed certificate (polling is set to an hour here,
/// so only the signal can explain the swap).
#[tokio::test]
async fn the_binary_serves_wss_and_reloads_the_certificate_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a, root_a) = self_signed();
    let cert_path = write_tmp(&dir, "tls.crt", &cert_a);
    let key_path = write_tmp(&dir, "tls.key", &key_a);
    let child = common::process::GatewayProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--tls-cert",
        &cert_path,
        "--tls-key",
        &key_path,
        "--tls-reload-ms",
        "3600000",
    ]);
    // The listening line (the first that names the bound address) says wss://.
    let logs = child.logs();
    let line = logs.lines().find(|l| l.contains(&child.addr)).unwrap();
    assert!(line.contains("wss://"), "{line}");
    let addr: SocketAddr = child.addr.parse().unwrap();
    let mut c = WssClient {
        ws: wss_open(addr, &root_a).await.expect("wss with certificate A"),
        pushes: Default::default(),
    };
    let r = c
        .request(json!({"id":1,"op":"connect","token":common::token("ops", &["*"], &["*"])}))
        .await;
    assert!(r.get("ok").is_some(), "{r}");

    let (cert_b, key_b, root_b) = self_signed();
    std::fs::write(&key_path, key_b).unwrap();
    std::fs::write(&cert_path, cert_b).unwrap();
    assert!(wss_open(addr, &root_b).await.is_err(), "no reload before the signal");
    child.signal("HUP");
    let mut swapped = false;
    for _ in 0..50 {
        if wss_open(addr, &root_b).await.is_ok() {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(swapped, "SIGHUP reloads the certificate");
    let r = c.request(json!({"id":2,"op":"ping"})).await;
    assert!(
        r.get("ok").is_some(),
        "the connection made before the reload goes on: {r}"
    );
}

/// `--jwks-refresh-secs`: a JWKS URL is fetched again on that interval
/// without any token asking for it.
#[tokio::test]
async fn jwks_refresh_secs_sets_the_routine_refetch_interval() {
    let k1 = rsa("rsa_a");
    let server = JwksServer::start(jwks(&[jwk(&k1, Algorithm::RS256, "k1", true)])).await;
    let url = server.url.clone();
    let node = TestNode::with(|o| {
        o.jwt_secret = None;
        o.jwks = Some(url);
        o.jwks_refresh_secs = Some(1);
    })
    .await;
    assert_accepted(&node, &sign_with(Algorithm::RS256, Some("k1"), &k1, &claims("a")), "k1").await;
    let first = server.hits();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let later = server.hits();
    assert!(later >= first + 2, "{first} fetches, then {later} 2.5 s later");
}
