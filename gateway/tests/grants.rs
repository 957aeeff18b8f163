//! Issue 10: faults found by outside cases. Every grant with an expiry is
//! enforced at its expiry; dedup keys never cross users; the documented
//! 2,000-room resume fits the default frame limit and catch-up budget.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Ended, TestNode, sign, token};
use gateway::auth::now_secs;
use serde_json::{Value, json};

/// A connection token for `sub` granting `rooms` (subscribe) and `publish`.
async fn connect(node: &TestNode, sub: &str, rooms: &[&str], publish: &[&str]) -> Client {
    let mut c = Client::open(&node.url()).await;
    let r = c.connect(&token(sub, rooms, publish)).await;
    assert!(r.get("ok").is_some(), "{r}");
    c
}

fn room_token(sub: &str, room: &str, exp: u64) -> String {
    sign(&json!({"sub":sub,"room":room,"exp":exp,"pub":true}))
}

async fn subscribe_with(c: &mut Client, room: &str, token: &str) -> Value {
    let r = c
        .request(json!({"op":"subscribe","rooms":[{"room":room,"token":token}]}))
        .await;
    assert!(r["ok"]["rooms"][0].get("error").is_none(), "{r}");
    r
}

/// Waits for the next push that is not a `message` of `skip_room`.
async fn next_push_except(c: &mut Client, skip_room: &str) -> Value {
    loop {
        let p = c.next_push().await;
        if !(p["op"] == "message" && p["room"] == skip_room) {
            return p;
        }
    }
}

#[tokio::test]
async fn a_room_grant_ends_when_its_room_token_expires_even_across_a_refresh() {
    // Leeway 1 s: the grant ends 1 s after the room token's exp.
    let node = TestNode::with(|o| o.jwt_leeway_secs = Some(1)).await;
    let mut alice = connect(&node, "alice", &["general"], &["general"]).await;
    let mut bob = connect(&node, "bob", &["team-7"], &["team-7"]).await;
    bob.subscribe(&["team-7"]).await;
    let exp = now_secs() + 2;
    subscribe_with(&mut alice, "team-7", &room_token("alice", "team-7", exp)).await;
    let r = alice.publish("team-7", json!("while granted")).await;
    assert!(r["ok"]["offset"].as_u64().is_some(), "{r}");
    assert_eq!(bob.next_push().await["data"], "while granted");
    // A refresh of the connection token does not renew the room token.
    let r = alice
        .request(json!({"op":"refresh","token":token("alice", &["general"], &["general"])}))
        .await;
    assert!(r.get("ok").is_some(), "{r}");
    let started = Instant::now();
    let push = next_push_except(&mut alice, "team-7").await;
    assert_eq!(push["op"], "unsubscribed", "{push}");
    assert_eq!(push["room"], "team-7");
    assert_eq!(push["error"]["code"], "forbidden");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(now_secs() >= exp, "not before exp");
    // The grant is gone: publish and history are forbidden, and messages of
    // the room no longer arrive.
    assert_eq!(alice.publish("team-7", json!("x")).await["error"]["code"], "forbidden");
    let h = alice.request(json!({"op":"history","room":"team-7"})).await;
    assert_eq!(h["error"]["code"], "forbidden", "{h}");
    assert!(bob.publish("team-7", json!("after")).await.get("ok").is_some());
    assert_eq!(bob.next_push().await["data"], "after");
    assert!(alice.push_within(Duration::from_millis(500)).await.is_none());
    node.assert_serving().await;
}

#[tokio::test]
async fn a_room_token_renewed_before_expiry_keeps_the_room_without_a_gap() {
    let node = TestNode::with(|o| o.jwt_leeway_secs = Some(1)).await;
    let mut alice = connect(&node, "alice", &["general"], &["general"]).await;
    let mut bob = connect(&node, "bob", &["team-7"], &["team-7"]).await;
    bob.subscribe(&["team-7"]).await;
    subscribe_with(&mut alice, "team-7", &room_token("alice", "team-7", now_secs() + 2)).await;
    // Renewed by subscribing again with a fresh room token.
    subscribe_with(&mut alice, "team-7", &room_token("alice", "team-7", now_secs() + 600)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(bob.publish("team-7", json!("still here")).await.get("ok").is_some());
    let m = alice.next_push().await;
    assert_eq!(
        (m["op"].as_str(), m["data"].as_str()),
        (Some("message"), Some("still here")),
        "{m}"
    );
    assert!(alice.publish("team-7", json!("me too")).await.get("ok").is_some());
}

#[tokio::test]
async fn a_room_the_connection_token_also_grants_stays_but_loses_the_room_tokens_rights() {
    let node = TestNode::with(|o| o.jwt_leeway_secs = Some(1)).await;
    // Subscribing to team-* is granted, publishing is not.
    let mut alice = connect(&node, "alice", &["team-*"], &[]).await;
    let mut bob = node.client("bob").await;
    subscribe_with(&mut alice, "team-8", &room_token("alice", "team-8", now_secs() + 2)).await;
    assert!(alice.publish("team-8", json!("by token")).await.get("ok").is_some());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(alice.publish("team-8", json!("x")).await["error"]["code"], "forbidden");
    assert!(bob.publish("team-8", json!("hello")).await.get("ok").is_some());
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let p = alice.next_push().await;
        assert_ne!(p["op"], "unsubscribed", "the connection grants team-8: {p}");
        seen.push(p["data"].clone());
    }
    assert_eq!(seen, vec![json!("by token"), json!("hello")]);
}

#[tokio::test]
async fn a_connection_token_accepted_inside_the_leeway_is_not_closed_at_once() {
    let node = TestNode::with(|o| o.jwt_leeway_secs = Some(3)).await;
    let mut c = Client::open(&node.url()).await;
    let exp = now_secs() - 1;
    let r = c
        .connect(&sign(
            &json!({"sub":"alice","exp":exp,"rooms":{"sub":["*"],"pub":["*"]}}),
        ))
        .await;
    assert_eq!(r["ok"]["expires_in"], 0, "{r}");
    // Still open a second later: it may refresh.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.send_json(&json!({"op":"ping"})).await;
    assert_eq!(c.next_push().await["op"], "pong");
    // Closed when the leeway is over (exp + 3 s).
    assert_eq!(c.closed().await, Ended::Close(4010));
    assert!(now_secs() >= exp + 3);
}

#[tokio::test]
async fn one_users_dedup_key_never_swallows_another_users_message() {
    let node = TestNode::start().await;
    let mut carol = node.client("carol").await;
    carol.subscribe(&["kr"]).await;
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    let publish = json!({"op":"publish","room":"kr","key":"c1-000001","data":"a"});
    let a = alice.request(publish.clone()).await;
    let mut from_bob = publish.clone();
    from_bob["data"] = json!("b");
    let b = bob.request(from_bob).await;
    let (a, b) = (a["ok"]["offset"].as_u64().unwrap(), b["ok"]["offset"].as_u64().unwrap());
    assert_ne!(a, b, "bob's message was stored");
    let seen: Vec<Value> = vec![carol.next_push().await, carol.next_push().await];
    assert_eq!(
        (seen[0]["from"].clone(), seen[0]["data"].clone()),
        (json!("alice"), json!("a"))
    );
    assert_eq!(
        (seen[1]["from"].clone(), seen[1]["data"].clone()),
        (json!("bob"), json!("b"))
    );
    // A retry by the same user still answers the first offset, stored once.
    let retry = alice.request(publish).await;
    assert_eq!(retry["ok"]["offset"].as_u64(), Some(a));
    assert!(carol.push_within(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn the_frame_limit_is_in_the_connect_reply() {
    let node = TestNode::start().await;
    let mut c = Client::open(&node.url()).await;
    let r = c.connect(&node.token("alice")).await;
    assert_eq!(r["ok"]["max_frame_bytes"], 262_144, "{r}");
}

/// A 64-character room name.
fn long_name(i: usize) -> String {
    let name = format!("team:project-{i:04}-");
    format!("{name}{}", "x".repeat(64 - name.len()))
}

#[tokio::test]
async fn a_2000_room_resume_frame_fits_the_default_frame_limit_and_catchup_budget() {
    const ROOMS: usize = 2_000;
    // Default settings, except that publishing is unlimited to seed the rooms.
    let node = TestNode::with(|o| {
        o.publish_per_sec = Some(0);
        o.user_publish_per_sec = Some(0);
        o.room_publish_per_sec = Some(0);
    })
    .await;
    let names: Vec<String> = (0..ROOMS).map(long_name).collect();
    let mut seeder = node.client("seeder").await;
    for (i, room) in names.iter().enumerate() {
        for n in 0..2 {
            let r = seeder.publish(room, json!({"i": i, "n": n})).await;
            assert_eq!(r["ok"]["offset"].as_u64(), Some(n + 1), "{r}");
        }
    }
    // The client saw offset 1 of every room and resumes in one frame.
    let entries: Vec<Value> = names.iter().map(|r| json!({"room": r, "since": 1})).collect();
    let frame = json!({"id": 1, "op": "subscribe", "rooms": entries}).to_string();
    assert!(frame.len() > 65_536, "{} bytes: over the old 64 KiB limit", frame.len());
    assert!(frame.len() < 262_144);
    let mut c = node.client("alice").await;
    c.send_text(frame).await;
    let reply = c.reply(1).await;
    let rooms = reply["ok"]["rooms"].as_array().unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(rooms.len(), ROOMS);
    for (e, name) in rooms.iter().zip(&names) {
        assert_eq!(e["room"], name.as_str());
        assert_eq!(e["recovered"], true, "{e}");
        assert_eq!(e["offset"], 2);
    }
    // Every missed message, once, in room order.
    for (i, name) in names.iter().enumerate() {
        let m = c.next_push().await;
        assert_eq!(
            (m["room"].as_str(), m["offset"].as_u64()),
            (Some(name.as_str()), Some(2))
        );
        assert_eq!(m["data"], json!({"i": i, "n": 1}));
    }
    assert!(c.push_within(Duration::from_millis(300)).await.is_none());
    // The frame: 1,489 entries of 17-character names with since.
    let mut c = node.client("bob").await;
    let entries: Vec<Value> = (0..1_489)
        .map(|i| json!({"room": format!("team:proj-{i:06}"), "since": 123_456}))
        .collect();
    let r = c.request(json!({"op":"subscribe","rooms":entries})).await;
    assert_eq!(r["ok"]["rooms"].as_array().map(Vec::len), Some(1_489), "{r}");
}

#[tokio::test]
async fn a_frame_over_the_limit_still_closes_1009() {
    let node = TestNode::with(|o| o.max_frame_bytes = Some(100_000)).await;
    let mut c = node.client("alice").await;
    c.send_text(format!("{{\"op\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(100_000)))
        .await;
    assert_eq!(c.closed().await, Ended::Close(1009));
    node.assert_serving().await;
}
