//! JWTs before and after the signature check.
//!
//! The input is tried two ways against an HS256 verifier: as the whole
//! token (header and payload decoding, algorithm choice, all before any
//! key is used), and as the payload of a token the verifier's own key signs
//! (so the claims decoder, the rooms claim and its patterns are reached).
//! Both must only verify or refuse; a verified connection token's grants
//! are then matched against a room.
#![no_main]
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gateway::auth::{Verifier, VerifyOptions};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret-0123456789-fuzz-secret";

fn verifier() -> Verifier {
    let mut v = Verifier::new(VerifyOptions::default());
    v.add_secret(SECRET).unwrap();
    v
}

fn check(v: &Verifier, token: &str) {
    if let Ok(id) = v.verify_connect_now(token) {
        let _ = id.grants.can_subscribe("general");
        let _ = id.grants.can_publish("team-7");
    }
    let _ = v.verify_room(token, "alice", "general");
}

fuzz_target!(|data: &[u8]| {
    thread_local! { static V: Verifier = verifier(); }
    V.with(|v| {
        if let Ok(text) = std::str::from_utf8(data) {
            check(v, text);
        }
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let signing_input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(data));
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, jsonwebtoken::Algorithm::HS256).unwrap();
        check(v, &format!("{signing_input}.{sig}"));
    });
});
