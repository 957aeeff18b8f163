//! The node tier of the tiered fan-out (`--tree-threshold`, `--tree-degree`):
//! a room above the threshold is split into member shards that run on all
//! worker threads; every member still gets every message once, in order.
//! Real nodes on 127.0.0.1:0, real WebSocket clients.

mod common;

use std::time::Duration;

use common::{TestNode, http_get, within};
use serde_json::json;

/// A counter or gauge from `/metrics` (0 when absent).
async fn metric(node: &TestNode, name: &str) -> f64 {
    let (status, body) = http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `members` clients in `room`, `publishers` publishing `per_publisher`
/// messages each at once; returns (per-member offsets received, shards
/// while split, deliveries made by shards).
async fn fan_out(
    node: &TestNode,
    members: usize,
    publishers: usize,
    per_publisher: usize,
) -> (Vec<Vec<u64>>, f64, f64) {
    let room = format!("big-{}", common::rand_suffix());
    let mut subs = Vec::new();
    for i in 0..members {
        let mut c = node.client(&format!("m{i}")).await;
        c.subscribe(&[&room]).await;
        subs.push(c);
    }
    let mut pubs = Vec::new();
    for p in 0..publishers {
        let node_url = node.url();
        let token = node.token(&format!("p{p}"));
        let room = room.clone();
        pubs.push(tokio::spawn(async move {
            let mut c = common::Client::open(&node_url).await;
            c.connect(&token).await;
            for i in 0..per_publisher {
                let r = c.publish(&room, json!({"p": p, "i": i})).await;
                assert!(r["ok"]["offset"].as_u64().is_some(), "{r}");
            }
        }));
    }
    for p in pubs {
        within(p).await.unwrap();
    }
    let shards = metric(node, "gateway_tree_shards").await;
    let total = publishers * per_publisher;
    let mut got = Vec::new();
    for c in &mut subs {
        let mut offsets = Vec::new();
        while offsets.len() < total {
            let m = c.next_push().await;
            assert_eq!(m["room"], room.as_str(), "{m}");
            offsets.push(m["offset"].as_u64().unwrap());
        }
        // Nothing more (no duplicate on its way).
        assert!(c.push_within(Duration::from_millis(100)).await.is_none());
        got.push(offsets);
    }
    (got, shards, metric(node, "gateway_tree_deliveries_total").await)
}

/// A node that splits rooms above `threshold` members with `degree`.
async fn split_node(threshold: usize, degree: usize) -> TestNode {
    TestNode::with(|o| {
        o.tree_threshold = Some(threshold);
        o.tree_degree = Some(degree);
        o.no_rate_limits = Some(true);
    })
    .await
}

fn assert_all_in_order(got: &[Vec<u64>], total: usize) {
    let want: Vec<u64> = (1..=total as u64).collect();
    for (i, offsets) in got.iter().enumerate() {
        assert_eq!(offsets, &want, "member {i}: every message once, in offset order");
    }
}

/// `--tree-threshold` / `--tree-degree`: above the threshold the room is
/// split into shards of at most ceil(threshold / degree) members, and the
/// shards deliver; below it (the default 10,000 here) nothing is split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_threshold_and_degree_split_a_big_room_into_bounded_shards() {
    let (members, publishers, each) = (24, 3, 20);
    // The metrics registry is the process's: the inline node goes first.
    // The default threshold (10,000): the room fans out inline.
    let inline = TestNode::with(|o| o.no_rate_limits = Some(true)).await;
    let (got, shards, by_shards) = fan_out(&inline, members, publishers, each).await;
    assert_all_in_order(&got, publishers * each);
    assert_eq!((shards, by_shards), (0.0, 0.0));
    // Shards of at most ceil(8 / 4) = 2 members: 12 shards.
    let split = split_node(8, 4).await;
    let (got, shards, by_shards) = fan_out(&split, members, publishers, each).await;
    assert_all_in_order(&got, publishers * each);
    assert_eq!(shards, 12.0);
    assert_eq!(by_shards, (members * publishers * each) as f64);

    // A higher degree makes smaller shards: ceil(8 / 8) = 1 member each.
    let finer = split_node(8, 8).await;
    let (got, shards, _) = fan_out(&finer, members, publishers, each).await;
    assert_all_in_order(&got, publishers * each);
    assert_eq!(shards, 24.0);

    for n in [split, finer, inline] {
        n.shutdown().await;
    }
}

/// Members that join a split room while messages are on their way get
/// exactly what follows their join (with `since`, the catch-up before it);
/// leavers get nothing more; the room merges back when it shrinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_of_a_split_room_keep_every_member_exact() {
    let node = split_node(4, 2).await;
    let room = format!("churn-{}", common::rand_suffix());
    let mut members = Vec::new();
    for i in 0..10 {
        let mut c = node.client(&format!("m{i}")).await;
        c.subscribe(&[&room]).await;
        members.push(c);
    }
    let mut publisher = node.client("pub").await;
    for i in 0..20 {
        publisher.publish(&room, json!(i)).await;
    }
    // A late joiner resumes from offset 10: 11..=20 as catch-up, then live.
    let mut late = node.client("late").await;
    let r = late
        .request(json!({"op":"subscribe","rooms":[{"room": room, "since": 10}]}))
        .await;
    assert!(r.get("ok").is_some(), "{r}");
    // Half the members leave.
    for c in members.iter_mut().skip(5) {
        let r = c.request(json!({"op":"unsubscribe","rooms":[room]})).await;
        assert!(r.get("ok").is_some(), "{r}");
    }
    for i in 20..30 {
        publisher.publish(&room, json!(i)).await;
    }
    for (i, c) in members.iter_mut().enumerate() {
        let want = if i < 5 { 30 } else { 20 };
        let mut offsets = Vec::new();
        while let Some(m) = c.push_within(Duration::from_millis(300)).await {
            offsets.push(m["offset"].as_u64().unwrap());
        }
        assert_eq!(offsets, (1..=want).collect::<Vec<_>>(), "member {i}");
    }
    let mut offsets = Vec::new();
    while let Some(m) = late.push_within(Duration::from_millis(300)).await {
        offsets.push(m["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, (11..=30).collect::<Vec<_>>(), "late joiner");
    // 6 members left (not below 4 / 2): still split. Down to the late
    // joiner alone, the room merges back once nothing is in flight.
    for c in members.iter_mut().take(5) {
        c.request(json!({"op":"unsubscribe","rooms":[room]})).await;
    }
    within(async {
        loop {
            publisher.publish(&room, json!("x")).await;
            if metric(&node, "gateway_tree_shards").await == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    node.shutdown().await;
}
