//! The server API in cluster mode: a real 3-node NATS cluster with
//! JetStream, two or three gateways, real clients. What one gateway's API
//! does reaches every gateway.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::api::{KEY, call, now};
use common::nats::Cluster;
use common::{Client, Ended, TestNode, within};
use serde_json::{Value, json};

async fn gateway(cluster: &Cluster, name: &str) -> (TestNode, SocketAddr) {
    let urls = cluster.urls();
    let name = name.to_string();
    let node = TestNode::with(move |o| {
        o.nats = Some(urls);
        o.nats_replicas = Some(3);
        o.node_id = Some(name);
        o.nats_partitions = Some(2);
        o.no_rate_limits = Some(true);
        o.api_listen = Some("127.0.0.1:0".parse().unwrap());
        o.api_key = Some(vec![KEY.into()]);
    })
    .await;
    let api = node.running.api_addr.unwrap();
    (node, api)
}

/// Publishes once to `room` through the API, retried with one key while a
/// fresh cluster answers `unavailable` (its streams still electing leaders;
/// bounded), so the test's own publishes meet a working stream. Call it
/// before anyone subscribes: nobody sees the message.
async fn warm(api: SocketAddr, room: &str) {
    let body = format!(r#"{{"room":"{room}","data":"warm-up","key":"warm-up"}}"#);
    for _ in 0..50 {
        if call(api, "publish", Some(KEY), &body).await.1["ok"]["offset"].is_u64() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no publish to {room} succeeded in 10 s");
}

async fn read_messages(c: &mut Client, n: usize) -> Vec<(u64, Value, Value)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = c.next_push().await;
        assert_eq!(m["op"], "message", "{m}");
        out.push((m["offset"].as_u64().unwrap(), m["from"].clone(), m["data"].clone()));
    }
    out
}

/// Must show: an API publish reaches members on every gateway exactly
/// once, in order with client publishes; a retried API publish with the
/// same key is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_publishes_reach_every_gateway_once_in_order_with_client_publishes() {
    let cluster = Cluster::start(3).await;
    let (a, api_a) = gateway(&cluster, "gw-a").await;
    let (b, api_b) = gateway(&cluster, "gw-b").await;
    warm(api_a, "lobby").await;
    let mut members = Vec::new();
    for (i, node) in [&a, &b].into_iter().enumerate() {
        let mut m = node.client(&format!("member{i}")).await;
        m.subscribe(&["lobby"]).await;
        members.push(m);
    }
    let mut pa = a.client("alice").await;
    let mut pb = b.client("bob").await;
    let mut sent = Vec::new();
    for i in 0..40u64 {
        // Every publish carries a key, so one answered `unavailable` (a
        // fresh cluster's stream still settling) is retried safely.
        let mut r = Value::Null;
        for _ in 0..25 {
            r = match i % 4 {
                0 => {
                    pa.request(json!({"op":"publish","room":"lobby","data":i,"key":format!("a{i}")}))
                        .await
                }
                1 => {
                    call(
                        api_a,
                        "publish",
                        Some(KEY),
                        &format!(r#"{{"room":"lobby","data":{i},"from":"bot","key":"b{i}"}}"#),
                    )
                    .await
                    .1
                }
                2 => {
                    pb.request(json!({"op":"publish","room":"lobby","data":i,"key":format!("c{i}")}))
                        .await
                }
                _ => {
                    call(
                        api_b,
                        "publish",
                        Some(KEY),
                        &format!(r#"{{"room":"lobby","data":{i},"key":"k{i}"}}"#),
                    )
                    .await
                    .1
                }
            };
            if r["error"]["code"] != "unavailable" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let offset = r["ok"]["offset"].as_u64();
        sent.push((offset.unwrap_or_else(|| panic!("publish {i} failed: {r}")), json!(i)));
    }
    // The retried keyed publishes: same offsets, nothing new stored or sent.
    for i in (3..40u64).step_by(4) {
        let (_, r) = call(
            api_a,
            "publish",
            Some(KEY),
            &format!(r#"{{"room":"lobby","data":{i},"key":"k{i}"}}"#),
        )
        .await;
        assert_eq!(
            r["ok"]["offset"].as_u64(),
            Some(sent[i as usize].0),
            "retry of k{i} via the other gateway: {r}"
        );
    }
    assert!(sent.windows(2).all(|w| w[0].0 < w[1].0));
    for m in &mut members {
        let got = read_messages(m, 40).await;
        let got: Vec<(u64, Value)> = got.into_iter().map(|(o, _, d)| (o, d)).collect();
        assert_eq!(got, sent, "every message once, in offset order");
        assert!(
            m.push_within(Duration::from_millis(300)).await.is_none(),
            "nothing twice"
        );
    }
    let (_, h) = call(api_b, "history", Some(KEY), r#"{"room":"lobby","limit":100}"#).await;
    // The warm-up message aside.
    let messages: Vec<&Value> = h["ok"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["data"] != "warm-up")
        .collect();
    let stored: Vec<u64> = messages.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(
        stored,
        sent.iter().map(|s| s.0).collect::<Vec<_>>(),
        "each keyed publish stored once"
    );
    let froms: Vec<&Value> = messages.iter().map(|m| &m["from"]).take(4).collect();
    assert_eq!(froms, [&json!("alice"), &json!("bot"), &json!("bob"), &json!("server")]);

    // room and info see both gateways.
    // `room` is the presence view: eventually consistent (summaries every
    // --presence-interval-ms, 1 s by default).
    let r = within(async {
        loop {
            let (_, r) = call(api_a, "room", Some(KEY), r#"{"room":"lobby"}"#).await;
            if r["ok"]["count"] == 2 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(r["ok"]["users"], json!(["member0", "member1"]), "{r}");
    let (_, r) = call(api_b, "info", Some(KEY), "{}").await;
    let nodes: Vec<&str> = r["ok"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["gw-a", "gw-b"], "{r}");
    assert_eq!(r["ok"]["connections"], 4, "{r}");
}

/// Must show: `disconnect` through gateway A's API closes the user's
/// connections on A and B with the requested code; `unsubscribe` ends the
/// user's subscription on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_and_unsubscribe_through_one_gateway_act_on_every_gateway() {
    let cluster = Cluster::start(3).await;
    let (a, api_a) = gateway(&cluster, "gw-a").await;
    let (b, _api_b) = gateway(&cluster, "gw-b").await;
    warm(api_a, "news").await;
    let mut on_a = a.client("carol").await;
    let mut on_b = b.client("carol").await;
    let mut other = b.client("dave").await;
    for c in [&mut on_a, &mut on_b, &mut other] {
        c.subscribe(&["news"]).await;
    }
    let (status, r) = call(api_a, "unsubscribe", Some(KEY), r#"{"user":"carol","room":"news"}"#).await;
    assert_eq!(status, 200, "{r}");
    for c in [&mut on_a, &mut on_b] {
        let p = c.next_push().await;
        assert_eq!((&p["op"], &p["room"]), (&json!("unsubscribed"), &json!("news")), "{p}");
    }
    // The others still get the room; carol does not.
    let (_, r) = call(api_a, "publish", Some(KEY), r#"{"room":"news","data":"x"}"#).await;
    assert!(r["ok"]["offset"].is_u64());
    assert_eq!(other.next_push().await["data"], "x");
    assert!(on_b.push_within(Duration::from_millis(300)).await.is_none());

    let (status, r) = call(
        api_a,
        "disconnect",
        Some(KEY),
        r#"{"user":"carol","code":4003,"reconnect":false}"#,
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(on_a.closed().await, Ended::Close(4003));
    assert_eq!(on_b.closed().await, Ended::Close(4003));
    // Only carol.
    let r = other.request(json!({"op":"history","room":"news","limit":1})).await;
    assert!(r.get("ok").is_some(), "{r}");
}

/// Must show: `revoke` refuses the user's old tokens on every gateway, also
/// after a gateway restart, closes live connections holding one with 4001,
/// while a token issued after the revocation works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_refuses_old_tokens_everywhere_and_survives_a_gateway_restart() {
    let cluster = Cluster::start(3).await;
    let (a, api_a) = gateway(&cluster, "gw-a").await;
    let (b, _) = gateway(&cluster, "gw-b").await;
    let old = common::sign(&json!({"sub":"eve","iat":now() - 60,"exp":now() + 600,"rooms":{"sub":["*"],"pub":["*"]}}));
    let mut live_a = Client::open(&a.url()).await;
    assert!(live_a.connect(&old).await.get("ok").is_some());
    let mut live_b = Client::open(&b.url()).await;
    assert!(live_b.connect(&old).await.get("ok").is_some());

    // Idempotent, so retried while a fresh cluster's bucket is not yet
    // writable (`unavailable`, bounded).
    let body = format!(r#"{{"user":"eve","before":{}}}"#, now() - 1);
    let (mut status, mut r) = call(api_a, "revoke", Some(KEY), &body).await;
    for _ in 0..25 {
        if r["error"]["code"] != "unavailable" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        (status, r) = call(api_a, "revoke", Some(KEY), &body).await;
    }
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["ok"]["durable"], true);
    assert_eq!(live_a.closed().await, Ended::Close(4001));
    assert_eq!(
        live_b.closed().await,
        Ended::Close(4001),
        "closed on the other gateway through the bucket's watch"
    );

    let refused = |url: String, token: String| async move {
        let mut c = Client::open(&url).await;
        let r = c.connect(&token).await;
        r["error"]["code"] == "unauthorized"
    };
    assert!(refused(a.url(), old.clone()).await);
    assert!(refused(b.url(), old.clone()).await);
    let fresh = common::sign(&json!({"sub":"eve","iat":now(),"exp":now() + 600,"rooms":{"sub":["*"],"pub":["*"]}}));
    assert!(
        !refused(b.url(), fresh.clone()).await,
        "a token issued after the revocation works"
    );

    // A restarted gateway loads the bucket before it serves.
    b.shutdown().await;
    let (b2, _) = gateway(&cluster, "gw-b").await;
    assert!(refused(b2.url(), old.clone()).await, "still revoked after the restart");
    assert!(!refused(b2.url(), fresh).await);
    // refresh to an old token is refused too.
    let mut c = b2.client("eve").await;
    let r = within(c.request(json!({"op":"refresh","token":old}))).await;
    assert_eq!(r["error"]["code"], "unauthorized", "{r}");
}
