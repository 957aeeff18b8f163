//! Ephemeral rooms in cluster mode count in the node's delivery total, as
//! they do in the per-room series: the two add up. Its own test binary: the
//! metrics are process-wide, so no other test may deliver meanwhile.

mod common;

use common::TestNode;
use common::nats::Cluster;
use serde_json::json;

/// The value of the series `name` (summed over its labels) in `text`.
fn series_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_deliveries_count_in_the_node_total_over_nats() {
    let cluster = Cluster::start(1).await;
    let urls = cluster.urls();
    let node = TestNode::with(move |o| {
        o.nats = Some(urls);
        o.nats_replicas = Some(1);
        o.no_rate_limits = Some(true);
        o.ephemeral_prefixes = Some(vec!["typing:".into()]);
    })
    .await;
    let mut a = node.client("a").await;
    let mut b = node.client("b").await;
    a.subscribe(&["typing:r"]).await;
    b.subscribe(&["typing:r"]).await;
    for i in 0..5 {
        let r = b.publish("typing:r", json!(i)).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    for c in [&mut a, &mut b] {
        for _ in 0..5 {
            assert_eq!(c.next_push().await["op"], "message");
        }
    }
    let (status, text) = common::http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    let total = series_sum(&text, "gateway_deliveries_total");
    let by_room = series_sum(&text, "gateway_room_deliveries_total");
    assert_eq!(by_room, 10.0, "5 messages to 2 members: {text}");
    assert_eq!(total, by_room, "the node's total is the sum of its rooms");
}
