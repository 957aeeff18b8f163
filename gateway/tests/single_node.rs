//! The single-node gateway over real sockets: chat, recovery, history,
//! de-duplication, limits, slow consumers and drain.

mod common;

use std::time::Duration;

use common::{Client, Ended, TestNode, http_status, sign, token, within};
use serde_json::{Value, json};

#[tokio::test]
async fn two_clients_chat_and_a_third_in_another_room_sees_nothing() {
    let node = TestNode::start().await;
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    let mut carol = node.client("carol").await;
    alice.subscribe(&["general"]).await;
    bob.subscribe(&["general"]).await;
    carol.subscribe(&["random"]).await;

    let r = alice.publish("general", json!({"text":"hi bob"})).await;
    let offset = r["ok"]["offset"].as_u64().expect("offset");
    for c in [&mut alice, &mut bob] {
        let m = c.next_push().await;
        assert_eq!(m["op"], "message");
        assert_eq!(m["room"], "general");
        assert_eq!(m["offset"], offset);
        assert_eq!(m["from"], "alice");
        assert_eq!(m["data"]["text"], "hi bob");
        assert!(m["ts"].as_u64().unwrap() > 1_600_000_000_000);
    }
    let r = bob.publish("general", json!("hi alice")).await;
    assert!(r["ok"]["offset"].as_u64().unwrap() > offset);
    assert_eq!(alice.next_push().await["data"], "hi alice");

    // A publisher that is not subscribed gets its offset and no push.
    let mut dave = node.client("dave").await;
    let r = dave.publish("general", json!("from outside")).await;
    assert!(r["ok"]["offset"].as_u64().is_some(), "{r}");
    assert_eq!(bob.next_push().await["data"], "hi alice");
    assert_eq!(bob.next_push().await["data"], "from outside");

    assert!(carol.push_within(Duration::from_millis(300)).await.is_none());
    assert!(dave.push_within(Duration::from_millis(50)).await.is_none());
    assert!(node.shutdown().await.clean);
}

#[tokio::test]
async fn from_and_ts_are_set_by_the_server() {
    let node = TestNode::start().await;
    let mut a = node.client("alice").await;
    a.subscribe(&["r"]).await;
    a.request(json!({"op":"publish","room":"r","data":1,"from":"mallory","ts":5}))
        .await;
    let m = a.next_push().await;
    assert_eq!(m["from"], "alice");
    assert_ne!(m["ts"], 5);
}

#[tokio::test]
async fn one_subscribe_frame_with_2000_rooms() {
    let node = TestNode::start().await;
    let mut user = node.client("busy").await;
    let rooms: Vec<String> = (0..2000).map(|i| format!("room-{i}")).collect();
    let refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let r = user.subscribe(&refs).await;
    let entries = r["ok"]["rooms"].as_array().unwrap();
    assert_eq!(entries.len(), 2000);
    assert!(entries.iter().all(|e| e.get("error").is_none() && e["offset"] == 0));
    let mut other = node.client("other").await;
    for room in ["room-0", "room-1234", "room-1999"] {
        other.publish(room, json!(room)).await;
        let m = user.next_push().await;
        assert_eq!(m["room"], room);
        assert_eq!(m["data"], room);
    }
}

#[tokio::test]
async fn reconnect_with_since_gets_exactly_the_missed_messages_then_live_ones() {
    let node = TestNode::start().await;
    let mut writer = node.client("writer").await;
    let mut reader = node.client("reader").await;
    reader.subscribe(&["r"]).await;
    writer.publish("r", json!(1)).await;
    let seen = reader.next_push().await["offset"].as_u64().unwrap();
    drop(reader);

    let mut missed = Vec::new();
    for i in 2..=6 {
        let r = writer.publish("r", json!(i)).await;
        missed.push(r["ok"]["offset"].as_u64().unwrap());
    }
    let mut reader = node.client("reader").await;
    let r = reader
        .request(json!({"op":"subscribe","rooms":[{"room":"r","since":seen}]}))
        .await;
    assert_eq!(r["ok"]["rooms"][0]["recovered"], true, "{r}");
    assert_eq!(r["ok"]["rooms"][0]["offset"], *missed.last().unwrap());
    let live = writer.publish("r", json!("live")).await["ok"]["offset"]
        .as_u64()
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..missed.len() + 1 {
        got.push(reader.next_push().await["offset"].as_u64().unwrap());
    }
    let mut want = missed.clone();
    want.push(live);
    assert_eq!(got, want, "missed messages in order, then live, none twice");
    assert!(reader.push_within(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn since_older_than_the_log_is_not_recovered() {
    let node = TestNode::with(|o| {
        o.history_size = Some(5);
        // 12 publishes back to back: over the per-connection burst of 10.
        o.publish_burst = Some(20);
    })
    .await;
    let mut writer = node.client("writer").await;
    for i in 0..12 {
        writer.publish("r", json!(i)).await;
    }
    let mut reader = node.client("reader").await;
    let r = reader
        .request(json!({"op":"subscribe","rooms":[{"room":"r","since":2},{"room":"r2","since":0}]}))
        .await;
    assert_eq!(r["ok"]["rooms"][0]["recovered"], false, "{r}");
    assert_eq!(r["ok"]["rooms"][0]["offset"], 12);
    assert_eq!(
        r["ok"]["rooms"][1]["recovered"], true,
        "an empty room is fully recovered"
    );
    // Nothing is replayed for an unrecovered room; live messages still come.
    writer.publish("r", json!("live")).await;
    assert_eq!(reader.next_push().await["data"], "live");
}

#[tokio::test]
async fn history_pages_backwards_with_before_and_more() {
    let node = TestNode::start().await;
    let mut c = node.client("alice").await;
    for i in 1..=7 {
        c.publish("h", json!(i)).await;
    }
    let r = c.request(json!({"op":"history","room":"h","limit":3})).await;
    let page: Vec<u64> = offsets(&r["ok"]["messages"]);
    assert_eq!(page, vec![5, 6, 7]);
    assert_eq!(r["ok"]["more"], true);
    assert_eq!(r["ok"]["messages"][0]["data"], 5);
    assert_eq!(r["ok"]["messages"][0]["from"], "alice");
    let r = c.request(json!({"op":"history","room":"h","limit":3,"before":5})).await;
    assert_eq!(offsets(&r["ok"]["messages"]), vec![2, 3, 4]);
    assert_eq!(r["ok"]["more"], true);
    let r = c.request(json!({"op":"history","room":"h","limit":3,"before":2})).await;
    assert_eq!(offsets(&r["ok"]["messages"]), vec![1]);
    assert_eq!(r["ok"]["more"], false);
    let r = c.request(json!({"op":"history","room":"h"})).await;
    assert_eq!(offsets(&r["ok"]["messages"]).len(), 7, "default limit is 50");
}

fn offsets(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_publish_retried_with_the_same_key_is_stored_once() {
    let node = TestNode::start().await;
    let mut sub = node.client("sub").await;
    sub.subscribe(&["k"]).await;
    let mut p = node.client("pub").await;
    let cmd = json!({"op":"publish","room":"k","data":"once","key":"msg-1"});
    let first = p.request(cmd.clone()).await;
    let second = p.request(cmd).await;
    assert_eq!(first["ok"]["offset"], second["ok"]["offset"]);
    let other = p
        .request(json!({"op":"publish","room":"k","data":"twice","key":"msg-2"}))
        .await;
    assert_ne!(other["ok"]["offset"], first["ok"]["offset"]);
    assert_eq!(sub.next_push().await["data"], "once");
    assert_eq!(sub.next_push().await["data"], "twice");
    let h = p.request(json!({"op":"history","room":"k"})).await;
    assert_eq!(h["ok"]["messages"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn malformed_json_and_unknown_op_are_bad_requests() {
    let node = TestNode::start().await;
    let mut c = node.client("alice").await;
    c.send_text("{this is not json").await;
    let f = c.next_frame().await;
    assert_eq!(f["error"]["code"], "bad_request", "{f}");
    let r = c.request(json!({"op":"explode"})).await;
    assert_eq!(r["error"]["code"], "bad_request");
    let r = c.request(json!({"op":"history","room":"r","limit":"many"})).await;
    assert_eq!(r["error"]["code"], "bad_request");
    // The connection is still usable.
    c.subscribe(&["ok"]).await;
    node.assert_serving().await;
}

#[tokio::test]
async fn a_command_before_connect_is_unauthorized() {
    let node = TestNode::start().await;
    let mut c = Client::open(&node.url()).await;
    let r = c.request(json!({"op":"subscribe","rooms":[{"room":"a"}]})).await;
    assert_eq!(r["error"]["code"], "unauthorized");
    assert_eq!(c.closed().await, Ended::Close(4001));
    node.assert_serving().await;
}

#[tokio::test]
async fn no_connect_within_the_auth_timeout_closes_4001() {
    let node = TestNode::with(|o| o.auth_timeout_ms = Some(300)).await;
    let mut c = Client::open(&node.url()).await;
    let f = c.next_frame().await;
    assert_eq!(f["error"]["code"], "unauthorized");
    assert_eq!(c.closed().await, Ended::Close(4001));
    node.assert_serving().await;
}

#[tokio::test]
async fn forged_and_expired_tokens_close_4001() {
    let node = TestNode::start().await;
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub":"mallory","rooms":{"sub":["*"],"pub":["*"]}}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap();
    let expired = sign(&json!({"sub":"old","exp": gateway::auth::now_secs() - 3600}));
    for bad in [forged, expired, "garbage".to_string(), String::new()] {
        let mut c = Client::open(&node.url()).await;
        let r = c.connect(&bad).await;
        assert_eq!(r["error"]["code"], "unauthorized", "{r}");
        assert!(
            !r.to_string().contains(&bad) || bad.is_empty(),
            "tokens are never echoed"
        );
        assert_eq!(c.closed().await, Ended::Close(4001));
    }
    node.assert_serving().await;
}

#[tokio::test]
async fn rooms_outside_the_token_are_forbidden_per_room() {
    let node = TestNode::start().await;
    let mut c = Client::open(&node.url()).await;
    c.connect(&token("limited", &["general", "team-*"], &["general"])).await;
    let r = c
        .request(json!({"op":"subscribe","rooms":[{"room":"general"},{"room":"secret"},{"room":"team-7"}]}))
        .await;
    let rooms = &r["ok"]["rooms"];
    assert!(rooms[0].get("error").is_none());
    assert_eq!(rooms[1]["room"], "secret");
    assert_eq!(rooms[1]["error"]["code"], "forbidden");
    assert!(rooms[2].get("error").is_none());
    let r = c.publish("team-7", json!("x")).await;
    assert_eq!(r["error"]["code"], "forbidden");
    let r = c.publish("general", json!("x")).await;
    assert!(r["ok"]["offset"].as_u64().is_some());
    let r = c.request(json!({"op":"history","room":"secret"})).await;
    assert_eq!(r["error"]["code"], "forbidden");
    // A token without a rooms claim grants nothing by default.
    let mut bare = Client::open(&node.url()).await;
    let r = bare.connect(&sign(&json!({"sub":"bare"}))).await;
    assert_eq!(r["ok"]["expires_in"], Value::Null);
    let r = bare
        .request(json!({"op":"subscribe","rooms":[{"room":"general"}]}))
        .await;
    assert_eq!(r["ok"]["rooms"][0]["error"]["code"], "forbidden");
    node.assert_serving().await;
}

#[tokio::test]
async fn invalid_room_names_are_bad_requests() {
    let node = TestNode::start().await;
    let mut c = node.client("alice").await;
    let long = "x".repeat(129);
    let names = ["chat.>", "*", "a.b", "a b", "", long.as_str(), "ünï"];
    let entries: Vec<Value> = names.iter().map(|n| json!({"room": n})).collect();
    let r = c.request(json!({"op":"subscribe","rooms":entries})).await;
    for (i, e) in r["ok"]["rooms"].as_array().unwrap().iter().enumerate() {
        assert_eq!(e["error"]["code"], "bad_request", "{}: {e}", names[i]);
    }
    for n in names {
        let r = c.publish(n, json!(1)).await;
        assert_eq!(r["error"]["code"], "bad_request", "{n}: {r}");
    }
    let ok = "y".repeat(128);
    c.subscribe(&[ok.as_str()]).await;
    node.assert_serving().await;
}

#[tokio::test]
async fn a_1_mib_frame_closes_1009() {
    let node = TestNode::start().await;
    let mut c = node.client("alice").await;
    let big = format!(r#"{{"op":"publish","room":"r","data":"{}"}}"#, "x".repeat(1 << 20));
    // The server may close before the whole frame is written.
    let _ = futures_util::SinkExt::send(&mut c.ws, tokio_tungstenite::tungstenite::Message::text(big)).await;
    assert_eq!(c.closed().await, Ended::Close(1009));
    node.assert_serving().await;
}

#[tokio::test]
async fn a_binary_frame_on_the_json_protocol_is_a_bad_request() {
    let node = TestNode::start().await;
    let mut c = node.client("alice").await;
    c.send_binary(b"{\"op\":\"ping\"}".to_vec()).await;
    let f = c.next_frame().await;
    assert_eq!(f["error"]["code"], "bad_request");
    node.assert_serving().await;
}

#[tokio::test]
async fn repeated_bad_frames_close_4008() {
    let node = TestNode::with(|o| o.max_bad_frames = Some(5)).await;
    let mut c = node.client("alice").await;
    for _ in 0..10 {
        c.send_text("nope").await;
    }
    assert_eq!(c.closed().await, Ended::Close(4008));
    node.assert_serving().await;
}

#[tokio::test]
async fn a_burst_of_10000_subscribe_frames() {
    let node = TestNode::start().await;
    let mut c = node.client("flood").await;
    for i in 0..10_000u32 {
        let f = json!({"id": i, "op":"subscribe","rooms":[{"room": format!("f-{}", i % 50)}]});
        futures_util::SinkExt::feed(&mut c.ws, tokio_tungstenite::tungstenite::Message::text(f.to_string()))
            .await
            .unwrap();
    }
    futures_util::SinkExt::flush(&mut c.ws).await.unwrap();
    // Either every reply arrives, or the node closes the flooder with 4008
    // (rate-limit abuse); it never falls over, and others do not notice.
    let reader = async {
        let mut replies = 0;
        loop {
            match c.ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_))) => {
                    replies += 1;
                    if replies == 10_000 {
                        return (replies, None);
                    }
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                    return (replies, f.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                _ => return (replies, None),
            }
        }
    };
    let (replies, close) = within(reader).await;
    assert!(
        replies == 10_000 || close == Some(4008),
        "{replies} replies, close {close:?}"
    );
    node.assert_serving().await;
    assert!(node.running.node.rooms.len() <= 60);
}

use futures_util::StreamExt;

#[tokio::test]
async fn a_member_that_never_reads_is_closed_4009_while_others_get_everything() {
    const CAP: usize = 64 * 1024;
    const MESSAGES: usize = 4_000;
    let node = TestNode::with(|o| {
        o.outbox_max_bytes = Some(CAP);
        // The outbox holds at least one frame of the largest size.
        o.max_frame_bytes = Some(CAP);
        o.write_timeout_ms = Some(60_000);
        // One publisher sends 4,000 messages as fast as it can.
        o.no_rate_limits = Some(true);
    })
    .await;
    let mut slow = node.client("slow").await;
    slow.subscribe(&["hot"]).await;
    let mut fast = node.client("fast").await;
    fast.subscribe(&["hot"]).await;
    let mut publisher = node.client("publisher").await;
    let payload = "p".repeat(4_000);
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(MESSAGES);
        while got.len() < MESSAGES {
            let m = fast.next_push().await;
            got.push(m["offset"].as_u64().unwrap());
        }
        got
    });
    // One publish in flight at a time: the fast member keeps up, the slow one
    // (which never reads) fills its socket buffers and then its outbox.
    for _ in 0..MESSAGES {
        let r = publisher.publish("hot", json!(payload)).await;
        assert!(r["ok"]["offset"].as_u64().is_some(), "{r}");
    }
    let got = within(reader).await.unwrap();
    let mut sorted = got.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), MESSAGES, "no loss, no duplicate");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in offset order");
    // The slow member is closed as a slow consumer once it reads again.
    assert_eq!(slow.closed().await, Ended::Close(4009));
    // Memory stayed bounded: no outbox ever held more than its cap.
    let peak = node.running.node.peak_outbox_bytes();
    assert!(peak <= CAP, "peak outbox {peak} > cap {CAP}");
    assert!(peak > 0);
    node.assert_serving().await;
}

#[tokio::test]
async fn ping_gets_pong_and_unsubscribe_stops_pushes() {
    let node = TestNode::start().await;
    let mut c = node.client("alice").await;
    c.send_text(r#"{"op":"ping"}"#).await;
    assert_eq!(c.next_frame().await, json!({"op":"pong"}));
    c.subscribe(&["a", "b"]).await;
    let r = c.request(json!({"op":"unsubscribe","rooms":["a"]})).await;
    assert_eq!(r, json!({"id": r["id"], "ok": {}}));
    c.publish("a", json!("gone")).await;
    c.publish("b", json!("here")).await;
    assert_eq!(c.next_push().await["data"], "here");
}

#[tokio::test]
async fn subscribing_twice_is_not_an_error() {
    let node = TestNode::start().await;
    let mut c = node.client("alice").await;
    c.subscribe(&["a"]).await;
    let r = c.subscribe(&["a"]).await;
    assert!(r["ok"]["rooms"][0].get("error").is_none());
    c.publish("a", json!(1)).await;
    assert_eq!(c.next_push().await["data"], 1);
    assert!(
        c.push_within(Duration::from_millis(200)).await.is_none(),
        "one membership, one push"
    );
}

#[tokio::test]
async fn rooms_per_connection_are_capped() {
    let node = TestNode::with(|o| o.max_rooms_per_conn = Some(3)).await;
    let mut c = node.client("alice").await;
    let r = c.subscribe(&["a", "b", "c", "d"]).await;
    assert_eq!(r["ok"]["rooms"][3]["error"]["code"], "limit_exceeded");
    assert!(r["ok"]["rooms"][2].get("error").is_none());
}

#[tokio::test]
async fn connections_over_the_node_cap_close_4029() {
    let node = TestNode::with(|o| o.max_connections = Some(2)).await;
    let _a = node.client("a").await;
    let _b = node.client("b").await;
    let mut c = Client::open(&node.url()).await;
    assert_eq!(c.closed().await, Ended::Close(4029));
}

#[tokio::test]
async fn the_token_expiring_closes_4010_and_refresh_extends_it() {
    let node = TestNode::with(|o| o.jwt_leeway_secs = Some(0)).await;
    let now = gateway::auth::now_secs();
    let short = |sub: &str| sign(&json!({"sub":sub,"exp":now + 2,"rooms":{"sub":["*"],"pub":["*"]}}));
    let mut expiring = Client::open(&node.url()).await;
    let r = expiring.connect(&short("eve")).await;
    assert!(r["ok"]["expires_in"].as_u64().unwrap() <= 2);
    let mut refreshed = Client::open(&node.url()).await;
    refreshed.connect(&short("rita")).await;
    refreshed.subscribe(&["keep"]).await;
    let long = sign(&json!({"sub":"rita","exp":now + 600,"rooms":{"sub":["*"],"pub":["*"]}}));
    let r = refreshed.request(json!({"op":"refresh","token":long})).await;
    assert!(r["ok"]["expires_in"].as_u64().unwrap() > 500, "{r}");
    // expires_in is the token's time left, even past the expiry timer's
    // one-year cap.
    let two_years = 2 * 365 * 24 * 3600;
    let far = sign(&json!({"sub":"rita","exp":now + two_years,"rooms":{"sub":["*"],"pub":["*"]}}));
    let r = refreshed.request(json!({"op":"refresh","token":far})).await;
    assert!(r["ok"]["expires_in"].as_u64().unwrap() > two_years - 60, "{r}");
    let other = sign(&json!({"sub":"someone-else","exp":now + 600}));
    let r = refreshed.request(json!({"op":"refresh","token":other})).await;
    assert_eq!(r["error"]["code"], "unauthorized");
    assert_eq!(expiring.closed().await, Ended::Close(4010));
    // Still connected and subscribed after the first token's expiry.
    let mut p = node.client("p").await;
    p.publish("keep", json!("still")).await;
    assert_eq!(refreshed.next_push().await["data"], "still");
}

#[tokio::test]
async fn room_tokens_grant_rooms_the_connection_token_does_not() {
    let node = TestNode::start().await;
    let mut c = Client::open(&node.url()).await;
    c.connect(&token("alice", &["general"], &[])).await;
    let exp = gateway::auth::now_secs() + 600;
    let good = sign(&json!({"sub":"alice","room":"team-7","pub":true,"exp":exp}));
    let other_user = sign(&json!({"sub":"bob","room":"team-8","exp":exp}));
    let other_room = sign(&json!({"sub":"alice","room":"team-1","exp":exp}));
    let r = c
        .request(json!({"op":"subscribe","rooms":[
            {"room":"team-7","token":good},
            {"room":"team-8","token":other_user},
            {"room":"team-9","token":other_room}]}))
        .await;
    let rooms = &r["ok"]["rooms"];
    assert!(rooms[0].get("error").is_none(), "{r}");
    assert_eq!(rooms[1]["error"]["code"], "forbidden");
    assert_eq!(rooms[2]["error"]["code"], "forbidden");
    let r = c.publish("team-7", json!("with room token")).await;
    assert!(r["ok"]["offset"].as_u64().is_some(), "{r}");
    assert_eq!(c.next_push().await["data"], "with room token");
}

#[tokio::test]
async fn health_and_readiness() {
    let node = TestNode::start().await;
    assert_eq!(http_status(&node.http("/healthz")).await, 200);
    assert_eq!(http_status(&node.http("/readyz")).await, 200);
    assert_eq!(http_status(&node.http("/metrics")).await, 200);
    assert_eq!(http_status(&node.http("/ws")).await, 426);
}

#[tokio::test]
async fn a_draining_node_still_answers_its_probes_and_refuses_upgrades() {
    // Closes spread over 3 s: the drain lasts that long with clients on.
    let node = TestNode::with(|o| o.drain_spread_ms = Some(3000)).await;
    let (healthz, readyz, ws) = (node.http("/healthz"), node.http("/readyz"), node.url());
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(node.client(&format!("d{i}")).await);
    }
    let report = tokio::spawn(node.shutdown());
    let ready = common::wait_for_status(&readyz, 503).await;
    assert_eq!(ready, Some(503), "not ready while draining");
    assert_eq!(http_status(&healthz).await, 200, "alive while draining");
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let refused = Client::try_open(ws.as_str().into_client_request().unwrap()).await;
    assert_eq!(refused.err(), Some(503), "no new connections while draining");
    for c in &mut clients {
        assert_eq!(c.closed().await, Ended::Close(1012));
    }
    assert!(within(report).await.unwrap().clean);
}

#[tokio::test]
async fn shutdown_sends_1012_to_every_client() {
    let node = TestNode::start().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = node.client(&format!("u{i}")).await;
        c.subscribe(&["r"]).await;
        clients.push(c);
    }
    let report = tokio::spawn(node.shutdown());
    for c in &mut clients {
        assert_eq!(c.closed().await, Ended::Close(1012));
    }
    let report = within(report).await.unwrap();
    assert!(report.clean);
    assert_eq!(report.conns_at_start, 20);
}

#[tokio::test]
async fn notify_mode_pushes_coalesced_activity_instead_of_messages() {
    let node = TestNode::with(|o| o.activity_interval_ms = Some(300)).await;
    let mut bg = node.client("background").await;
    let r = bg
        .request(json!({"op":"subscribe","rooms":[{"room":"quiet","mode":"notify"},{"room":"loud"}]}))
        .await;
    assert!(r["ok"]["rooms"][0].get("error").is_none(), "{r}");
    assert_eq!(r["ok"]["rooms"][0]["offset"], 0);
    let mut p = node.client("poster").await;
    let mut last = 0;
    for i in 0..5 {
        last = p.publish("quiet", json!(i)).await["ok"]["offset"].as_u64().unwrap();
    }
    let a = bg.next_push().await;
    assert_eq!(
        a,
        json!({"op":"activity","room":"quiet","offset":last,"count":5}),
        "one coalesced push"
    );
    // Full-mode rooms still get messages; a quiet room sends nothing more.
    p.publish("loud", json!("full")).await;
    assert_eq!(bg.next_push().await["data"], "full");
    for i in 0..2 {
        last = p.publish("quiet", json!(i)).await["ok"]["offset"].as_u64().unwrap();
    }
    let a = bg.next_push().await;
    assert_eq!(
        (a["op"].as_str(), a["count"].as_u64(), a["offset"].as_u64()),
        (Some("activity"), Some(2), Some(last))
    );
    // Switching the room to full mode: messages, no more activity.
    bg.request(json!({"op":"subscribe","rooms":[{"room":"quiet"}]})).await;
    p.publish("quiet", json!("now full")).await;
    let m = bg.next_push().await;
    assert_eq!(
        (m["op"].as_str(), m["data"].as_str()),
        (Some("message"), Some("now full"))
    );
    assert!(bg.push_within(Duration::from_millis(500)).await.is_none());
    // Unsubscribing stops everything.
    bg.request(json!({"op":"subscribe","rooms":[{"room":"quiet","mode":"notify"}]}))
        .await;
    p.publish("quiet", json!("x")).await;
    bg.request(json!({"op":"unsubscribe","rooms":["quiet"]})).await;
    assert!(bg.push_within(Duration::from_millis(600)).await.is_none());
}

#[tokio::test]
async fn one_room_named_twice_in_a_frame_ends_in_the_last_mode_only() {
    let node = TestNode::with(|o| o.activity_interval_ms = Some(100)).await;
    let mut bg = node.client("twice").await;
    let r = bg
        .request(json!({"op":"subscribe","rooms":[{"room":"dup"},{"room":"dup","mode":"notify"}]}))
        .await;
    assert_eq!(r["ok"]["rooms"].as_array().unwrap().len(), 2, "{r}");
    let mut p = node.client("poster").await;
    let offset = p.publish("dup", json!("hi")).await["ok"]["offset"].as_u64().unwrap();
    // Notify mode only: an activity push, never the message itself.
    assert_eq!(
        bg.next_push().await,
        json!({"op":"activity","room":"dup","offset":offset,"count":1})
    );
    assert!(bg.push_within(Duration::from_millis(300)).await.is_none());
    // And the other way round, then leaving: nothing is left behind.
    bg.request(json!({"op":"subscribe","rooms":[{"room":"dup","mode":"notify"},{"room":"dup"}]}))
        .await;
    p.publish("dup", json!("full")).await;
    let m = bg.next_push().await;
    assert_eq!((m["op"].as_str(), m["data"].as_str()), (Some("message"), Some("full")));
    assert!(
        bg.push_within(Duration::from_millis(300)).await.is_none(),
        "one membership"
    );
    bg.request(json!({"op":"unsubscribe","rooms":["dup"]})).await;
    p.publish("dup", json!("gone")).await;
    assert!(bg.push_within(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let node = TestNode::with(|o| o.idle_timeout_ms = Some(400)).await;
    let mut silent = node.client("silent").await;
    let mut chatty = node.client("chatty").await;
    let started = std::time::Instant::now();
    let keep_alive = async {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            chatty.send_text(r#"{"op":"ping"}"#).await;
            assert_eq!(chatty.next_frame().await["op"], "pong");
        }
    };
    let (ended, ()) = tokio::join!(silent.closed(), keep_alive);
    assert_eq!(ended, Ended::Close(1001));
    assert!(started.elapsed() >= Duration::from_millis(400));
    // The client that kept talking is still connected.
    chatty.subscribe(&["still"]).await;
}

/// Many members, messages at irregular moments, on a multi-threaded runtime:
/// every message reaches every member, whoever writes it (the flusher or the
/// member's own task, when the socket is busy or a reply is queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_reaches_every_member_under_concurrent_writers() {
    const MEMBERS: usize = 40;
    const MESSAGES: usize = 300;
    let node = TestNode::with(|o| {
        o.no_rate_limits = Some(true);
        o.fanout_shards = Some(3);
    })
    .await;
    let mut readers = Vec::new();
    for i in 0..MEMBERS {
        let mut c = node.client(&format!("m{i}")).await;
        c.subscribe(&["busy"]).await;
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < MESSAGES {
                let m = c.next_push().await;
                if m["op"] != "message" {
                    continue; // the pong push of a ping
                }
                got.push(m["offset"].as_u64().unwrap());
                // Some members also send commands, so replies and pushes mix.
                if i % 4 == 0 && got.len() % 25 == 0 {
                    let r = c.request(json!({"op":"ping"})).await;
                    assert!(r["ok"].is_object(), "{r}");
                }
            }
            got
        }));
    }
    let mut publisher = node.client("pub").await;
    for i in 0..MESSAGES {
        let r = publisher.publish("busy", json!(i)).await;
        assert!(r["ok"]["offset"].is_u64(), "{r}");
        if i % 7 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for r in readers {
        let got = within(r).await.unwrap();
        assert_eq!(got, (1..=MESSAGES as u64).collect::<Vec<_>>());
    }
    // The flushers did the writing, and say so.
    let (status, text) = common::http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let (writes, frames) = (
        value("gateway_flusher_writes_total"),
        value("gateway_flusher_frames_total"),
    );
    assert!(writes > 0.0 && frames >= writes, "writes {writes}, frames {frames}");
}

/// `/metrics` shows per-room series for the busiest rooms only, so the number
/// of room series is bounded by `--room-metrics-top`; the rest are summed in
/// `room="_other"`.
#[tokio::test]
async fn per_room_metrics_show_only_the_busiest_rooms() {
    let node = TestNode::with(|o| {
        o.no_rate_limits = Some(true);
        o.room_metrics_top = Some(2);
        o.room_metrics_rooms = Some(vec!["busy-*".into(), "medium-*".into(), "quiet-*".into()]);
    })
    .await;
    let suffix = common::rand_suffix();
    let rooms: Vec<String> = ["busy", "medium", "quiet"]
        .iter()
        .map(|r| format!("{r}-{suffix}"))
        .collect();
    let mut members = Vec::new();
    for (i, room) in rooms.iter().enumerate() {
        // busy: 3 members, medium: 2, quiet: 1.
        for m in 0..(3 - i) {
            let mut c = node.client(&format!("m{i}{m}")).await;
            c.subscribe(&[room.as_str()]).await;
            members.push(c);
        }
    }
    let mut publisher = node.client("publisher").await;
    for (room, n) in rooms.iter().zip([5, 3, 1]) {
        for i in 0..n {
            publisher.publish(room, json!(i)).await;
        }
    }
    let (status, text) = common::http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    let series = |name: &str, room: &str| -> Option<u64> {
        let prefix = format!("{name}{{room=\"{room}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
    };
    assert_eq!(series("gateway_room_messages_total", &rooms[0]), Some(5));
    assert_eq!(series("gateway_room_deliveries_total", &rooms[0]), Some(15));
    assert_eq!(series("gateway_room_members", &rooms[0]), Some(3));
    assert_eq!(series("gateway_room_deliveries_total", &rooms[1]), Some(6));
    assert_eq!(series("gateway_room_members", &rooms[2]), None, "only the top 2 rooms");
    let room_lines = text.lines().filter(|l| l.starts_with("gateway_room_members{")).count();
    assert_eq!(room_lines, 3, "the top 2 and _other");
    // The quiet room is summed in _other: sums over `room` still add up.
    assert_eq!(series("gateway_room_members", "_other"), Some(1));
    assert_eq!(series("gateway_room_deliveries_total", "_other"), Some(1));
    // A scrape changes nothing: the next one (another Prometheus, say) sees the
    // same ranking, by the traffic of the last 30-60 s, and the same counters.
    let (_, again) = common::http_get(&node.http("/metrics")).await;
    let rooms_of = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("gateway_room_"))
            .map(String::from)
            .collect()
    };
    assert_eq!(rooms_of(&again), rooms_of(&text));
    assert!(again.contains(&format!("gateway_room_messages_total{{room=\"{}\"}} 5", rooms[0])));
    assert!(again.contains(&format!("gateway_room_members{{room=\"{}\"}} 2", rooms[1])));
    drop(members);
}

/// Issue 18 item 4: an anonymous `GET /metrics` on the client port listed
/// `gateway_room_members{room="dm:alice:bob"}` with message and delivery
/// counts. By default no room name reaches a label; the traffic is summed in
/// `room="_other"`.
#[tokio::test]
async fn an_anonymous_metrics_scrape_does_not_reveal_private_room_names() {
    let node = TestNode::with(|o| o.room_metrics_rooms = Some(vec!["general".into(), "team-*".into()])).await;
    let dm = format!("dm:alice:bob{}", common::rand_suffix());
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    alice.subscribe(&[dm.as_str(), "general", "team-x"]).await;
    bob.subscribe(&[dm.as_str()]).await;
    for i in 0..3 {
        assert!(alice.publish(&dm, json!(i)).await.get("ok").is_some());
    }
    assert!(alice.publish("team-x", json!("hi")).await.get("ok").is_some());
    // Still served on the client port (the operator contract), with no
    // credentials, but without the private room's name.
    let (status, text) = common::http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    assert!(!text.contains("dm:"), "{text}");
    assert!(!text.contains("alice"), "{text}");
    let series = |name: &str, room: &str| -> Option<u64> {
        let prefix = format!("{name}{{room=\"{room}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
    };
    // Operator-listed rooms are shown by name; the dm is in _other.
    assert_eq!(series("gateway_room_messages_total", "team-x"), Some(1));
    assert_eq!(series("gateway_room_members", "general"), Some(1));
    assert_eq!(series("gateway_room_members", "_other"), Some(2));
    assert_eq!(series("gateway_room_messages_total", "_other"), Some(3));
    assert_eq!(series("gateway_room_deliveries_total", "_other"), Some(6));
}
