//! Tokens verified per second, per algorithm: what one core spends on a
//! connect (or a refresh) before anything else happens.
//!
//! `cargo bench -p gateway --bench verify` (pin with `taskset -c 0` on a
//! shared machine). Each iteration is one full `verify_connect_now`: header
//! and key lookup, signature, claims and grants; no network.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gateway::auth::{Verifier, VerifyOptions, now_secs};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_string());
    let claims = json!({
        "sub": "user-12345",
        "exp": now_secs() + 3600,
        "iss": "https://idp.example/realms/chat",
        "rooms": {"sub": ["general", "team-*", "dm:user-12345:*"], "pub": ["general", "team-*"]},
    });
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(format!("{root}/tests/keys/rsa_a.pem")).unwrap()).unwrap();
    let ec_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec = EncodingKey::from_ec_pem(ec_pair.serialize_pem().as_bytes()).unwrap();
    let ed = EncodingKey::from_ed_pem(&std::fs::read(format!("{root}/tests/keys/ed25519.pem")).unwrap()).unwrap();
    let jwk = |k: &EncodingKey, alg, kid: &str| {
        let mut j = Jwk::from_encoding_key(k, alg).unwrap();
        j.common.key_id = Some(kid.to_string());
        j
    };
    let set = json!({"keys": [jwk(&rsa, Algorithm::RS256, "rsa"), jwk(&ec, Algorithm::ES256, "ec"), jwk(&ed, Algorithm::EdDSA, "ed")]});
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, set.to_string()).unwrap();
    let mut v = Verifier::new(VerifyOptions {
        issuers: vec!["https://idp.example/realms/chat".into()],
        ..Default::default()
    });
    v.add_secret(b"a-32-byte-secret-for-hs256-bench").unwrap();
    v.add_jwks(path.to_str().unwrap(), None).unwrap();

    let hs = EncodingKey::from_secret(b"a-32-byte-secret-for-hs256-bench");
    let cases = [
        ("HS256", sign(Algorithm::HS256, "hs", &hs)),
        ("RS256", sign(Algorithm::RS256, "rsa", &rsa)),
        ("ES256", sign(Algorithm::ES256, "ec", &ec)),
        ("EdDSA", sign(Algorithm::EdDSA, "ed", &ed)),
    ];
    let mut g = c.benchmark_group("verify_connect");
    g.throughput(Throughput::Elements(1));
    for (name, token) in &cases {
        assert!(v.verify_connect_now(token).is_ok(), "{name}");
        g.bench_function(*name, |b| b.iter(|| v.verify_connect_now(black_box(token)).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
