//! Flags whose effect no other test showed: each test sets one (or a pair)
//! and checks the behaviour it changes, on a real node and real clients.

mod common;

use std::time::{Duration, Instant};

use common::{Ended, TestNode, within};
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn keyed(key: &str, n: u32) -> serde_json::Value {
    json!({"op":"publish","room":"k","key":key,"data":n})
}

/// `--dedup-window-ms`: a key is remembered that long, then a retry is new.
#[tokio::test]
async fn dedup_window_ms_bounds_how_long_a_key_is_remembered() {
    let node = TestNode::with(|o| o.dedup_window_ms = Some(200)).await;
    let mut c = node.client("alice").await;
    let first = c.request(keyed("k1", 1)).await["ok"]["offset"].as_u64();
    assert_eq!(c.request(keyed("k1", 1)).await["ok"]["offset"].as_u64(), first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = c.request(keyed("k1", 1)).await["ok"]["offset"].as_u64();
    assert!(later > first, "{later:?} after the window, {first:?} before");
}

/// `--dedup-max-keys`: the oldest key is forgotten past the cap.
#[tokio::test]
async fn dedup_max_keys_caps_the_keys_remembered_per_room() {
    let node = TestNode::with(|o| o.dedup_max_keys = Some(2)).await;
    let mut c = node.client("alice").await;
    let k1 = c.request(keyed("k1", 1)).await["ok"]["offset"].as_u64();
    let k2 = c.request(keyed("k2", 2)).await["ok"]["offset"].as_u64();
    assert_eq!(c.request(keyed("k2", 2)).await["ok"]["offset"].as_u64(), k2);
    c.request(keyed("k3", 3)).await;
    // k1 was the oldest of three: forgotten, so its retry is stored again.
    let again = c.request(keyed("k1", 1)).await["ok"]["offset"].as_u64();
    assert!(again > k1, "{again:?} vs {k1:?}");
}

/// `--history-page-max`: a larger `limit` is capped, `more` says so.
#[tokio::test]
async fn history_page_max_caps_a_page() {
    let node = TestNode::with(|o| o.history_page_max = Some(3)).await;
    let mut c = node.client("alice").await;
    for i in 0..5 {
        c.publish("h", json!(i)).await;
    }
    let r = c.request(json!({"op":"history","room":"h","limit":10})).await;
    assert_eq!(r["ok"]["messages"].as_array().map(Vec::len), Some(3), "{r}");
    assert_eq!(r["ok"]["more"], true);
}

/// `--max-rooms`: rooms with state on the node; one more is `limit_exceeded`.
#[tokio::test]
async fn max_rooms_caps_the_rooms_a_node_holds() {
    let node = TestNode::with(|o| o.max_rooms = Some(2)).await;
    let mut c = node.client("alice").await;
    let r = c
        .request(json!({"op":"subscribe","rooms":[{"room":"a"},{"room":"b"},{"room":"c"}]}))
        .await;
    let rooms = r["ok"]["rooms"].as_array().unwrap();
    assert!(
        rooms[0].get("error").is_none() && rooms[1].get("error").is_none(),
        "{r}"
    );
    assert_eq!(rooms[2]["error"]["code"], "limit_exceeded", "{r}");
}

/// `--history-total-bytes` with `--max-rooms`: rooms made by publishes
/// alone (nobody subscribed) neither hold memory past the node's history
/// budget nor hold their slots: the 20th such room is accepted with a cap of
/// 5 rooms, the least recently active rooms' history is dropped, and a room
/// with a member keeps its own.
#[tokio::test]
async fn history_total_bytes_and_max_rooms_evict_idle_rooms_not_refuse_new_ones() {
    let node = TestNode::with(|o| {
        o.max_rooms = Some(5);
        o.history_max_bytes = Some(4096);
        o.history_total_bytes = Some(8192);
        o.no_rate_limits = Some(true);
    })
    .await;
    let mut member = node.client("bob").await;
    member.subscribe(&["kept"]).await;
    let mut c = node.client("alice").await;
    let text = "x".repeat(500);
    assert!(c.publish("kept", json!({"text": text})).await["ok"].is_object());
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let r = c.publish(&format!("idle-{i}"), json!({"text": text})).await;
        assert!(r["ok"].is_object(), "room {i}: {r}");
    }
    let history = |room: &str| json!({"op":"history","room":room,"limit":10});
    let oldest = c.request(history("idle-0")).await;
    assert_eq!(oldest["ok"]["messages"], json!([]), "{oldest}");
    let newest = c.request(history("idle-19")).await;
    assert_eq!(newest["ok"]["messages"].as_array().map(Vec::len), Some(1), "{newest}");
    let kept = c.request(history("kept")).await;
    assert_eq!(kept["ok"]["messages"].as_array().map(Vec::len), Some(1), "{kept}");
    let (_, text) = common::http_get(&node.http("/metrics")).await;
    assert!(common::metric(&text, "gateway_history_bytes") <= 8192.0, "{text}");
    assert!(
        common::metric(&text, "gateway_history_evicted_rooms_total") >= 15.0,
        "{text}"
    );
}

/// `--user-max-conns`: one user's connections on the node are capped; the
/// connect past it answers `limit_exceeded` and closes 4029 (protocol.md:
/// too many connections, node, user or address); other users are not
/// counted, and a closed connection frees its place.
#[tokio::test]
async fn user_max_conns_caps_one_users_connections_with_4029() {
    let node = TestNode::with(|o| o.user_max_conns = Some(2)).await;
    let mut alice = vec![node.client("alice").await, node.client("alice").await];
    let mut third = common::Client::open(&node.url()).await;
    let r = third.connect(&node.token("alice")).await;
    assert_eq!(r["error"]["code"], "limit_exceeded", "{r}");
    assert_eq!(third.closed().await, Ended::Close(4029));
    let mut bob = node.client("bob").await;
    bob.subscribe(&["r"]).await;
    drop(alice.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = common::Client::open(&node.url()).await;
        if again.connect(&node.token("alice")).await["ok"].is_object() {
            break;
        }
        assert!(Instant::now() < deadline, "the closed connection never freed its place");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--ping-interval-ms`: the server sends WebSocket pings at that interval.
#[tokio::test]
async fn ping_interval_ms_sets_how_often_the_server_pings() {
    let node = TestNode::with(|o| o.ping_interval_ms = Some(200)).await;
    let mut c = node.client("alice").await;
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        if let Some(Ok(Message::Ping(_))) = within(c.ws.next()).await {
            pings += 1;
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "3 pings took {took:?}");
}

/// `--max-rate-limited` and `--rate-limited-window-ms`: how many early
/// retries a window tolerates before 4008, and how long the window is.
#[tokio::test]
async fn max_rate_limited_and_its_window_decide_when_a_flood_closes_4008() {
    let node = TestNode::with(|o| {
        o.publish_per_sec = Some(1);
        o.publish_burst = Some(1);
        o.max_rate_limited = Some(2);
        o.rate_limited_window_ms = Some(300);
    })
    .await;
    // At most two early retries per window, windows apart: tolerated.
    let mut slow = node.client("slow").await;
    for _ in 0..3 {
        for _ in 0..2 {
            slow.publish("r", json!(0)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    slow.send_json(&json!({"op":"ping"})).await;
    assert_eq!(slow.next_push().await["op"], "pong");
    // Four in one window: the third early one closes it.
    let mut flood = node.client("flood").await;
    for i in 0..6 {
        flood
            .send_json(&json!({"id":i,"op":"publish","room":"r","data":i}))
            .await;
    }
    assert_eq!(flood.closed().await, Ended::Close(4008));
}

/// `--room-publish-burst`: publishes a room takes at once, across users.
#[tokio::test]
async fn room_publish_burst_is_what_a_room_takes_at_once() {
    let node = TestNode::with(|o| {
        o.room_publish_per_sec = Some(1);
        o.room_publish_burst = Some(3);
    })
    .await;
    let mut codes = Vec::new();
    for u in 0..4 {
        let mut c = node.client(&format!("user{u}")).await;
        let r = c.publish("busy", json!(u)).await;
        codes.push(r["error"]["code"].as_str().unwrap_or("ok").to_string());
    }
    assert_eq!(codes, ["ok", "ok", "ok", "rate_limited"]);
}

/// `--outbox-max-frames`: frames queued for one connection; a member that
/// does not read is closed 4009 once that many wait, whatever their size.
#[tokio::test]
async fn outbox_max_frames_closes_a_member_with_too_many_queued_frames() {
    let node = TestNode::with(|o| {
        o.outbox_max_frames = Some(64);
        o.no_rate_limits = Some(true);
    })
    .await;
    let mut slow = node.client("slow").await;
    slow.subscribe(&["tiny"]).await;
    let mut publisher = node.client("publisher").await;
    // Tiny messages: the byte bound (4 MiB) is far; the frame count is not
    // once the socket buffers are full.
    let mut closed = false;
    for i in 0..200_000u32 {
        let r = publisher.request(json!({"op":"publish","room":"tiny","data":i})).await;
        assert!(r.get("ok").is_some(), "{r}");
        if i % 1_000 == 999 && node.running.node.peak_outbox_bytes() > 0 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the member was never closed");
    assert_eq!(slow.closed().await, Ended::Close(4009));
}

/// `--rate-limit-max-keys`: a keyed limiter holding more keys after a sweep
/// is reset (counted in `gateway_rate_limit_resets_total`).
#[tokio::test]
async fn rate_limit_max_keys_resets_a_limiter_holding_too_many_keys() {
    let node = TestNode::with(|o| {
        o.rate_limit_max_keys = Some(1);
        // Only the per-user limiter, slow to refill: its keys stay until
        // the sweep (a key whose bucket is full again is pruned instead).
        o.publish_per_sec = Some(0);
        o.room_publish_per_sec = Some(0);
        o.user_publish_per_sec = Some(1);
        o.user_publish_burst = Some(20);
    })
    .await;
    let resets = || {
        let text = gateway::metrics::prometheus().render();
        text.lines()
            .find(|l| l.starts_with("gateway_rate_limit_resets_total"))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = resets();
    // Three users, each 5 cells short (5 s to refill).
    for u in 0..3 {
        let mut c = node.client(&format!("u{u}")).await;
        for _ in 0..5 {
            c.publish(&format!("room{u}"), json!(0)).await;
        }
    }
    // The sweep runs every 2 s; a limiter still above 1 key is reset.
    let deadline = Instant::now() + Duration::from_secs(8);
    while resets() <= before {
        assert!(Instant::now() < deadline, "no reset counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
