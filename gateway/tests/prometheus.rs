//! A real Prometheus scraping a real gateway (cluster mode, a 3-node NATS
//! JetStream cluster): a known scenario, read back through Prometheus's HTTP
//! API with exact counts; then every query of the Grafana dashboard
//! (`helm/gateway/files/dashboard.json`) is run against the same Prometheus
//! and must parse and return data.
//!
//! Needs `prometheus` (Debian's package; `scripts/ensure-prometheus.sh`, run
//! by `scripts/test.sh`, installs it) and `nats-server`. Fails without them.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::nats::Cluster;
use common::prometheus::{Prometheus, sample};
use common::{Ended, TestNode, http_get, within};
use serde_json::{Value, json};

/// Rooms of the scenario: (name, members, messages).
const ROOMS: [(&str, usize, usize); 5] = [
    ("hot-a", 6, 10),
    ("hot-b", 4, 10),
    ("warm-1", 3, 4),
    ("warm-2", 2, 3),
    ("cold", 1, 2),
];

/// Publishes, retrying (same key, so stored once) while the room's stream
/// settles after the cluster started; returns the offset.
async fn publish(c: &mut common::Client, room: &str, data: Value) -> u64 {
    let key = format!("k-{}", common::rand_suffix());
    for _ in 0..100 {
        let r = c
            .request(json!({"op": "publish", "room": room, "data": data, "key": key}))
            .await;
        match r["ok"]["offset"].as_u64() {
            Some(o) => return o,
            None if r["error"]["code"] == "unavailable" => tokio::time::sleep(Duration::from_millis(200)).await,
            None => panic!("{r}"),
        }
    }
    panic!("publish to {room} stayed unavailable");
}

/// The value of a metric line on the gateway's own `/metrics`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_reads_exact_counts_hot_rooms_other_histograms_and_one_slow_close() {
    let cluster = Cluster::start(3).await;
    let urls = cluster.urls();
    let node = TestNode::with(move |o| {
        o.nats = Some(urls);
        o.nats_replicas = Some(3);
        o.nats_partitions = Some(4);
        o.node_id = Some("gw-prom".into());
        // Named: the hot rooms and the slow one; warm-*, cold go to _other.
        o.room_metrics_top = Some(3);
        o.room_metrics_rooms = Some(vec!["hot-*".into(), "slow".into()]);
        // Publishes unlimited (the slow consumer needs a flood); `history`
        // limited to a burst of 10 at 1/s: the rate-limited client.
        o.publish_per_sec = Some(0);
        o.user_publish_per_sec = Some(0);
        o.room_publish_per_sec = Some(0);
        o.client_bytes_per_sec = Some(0);
        o.history_per_sec = Some(1);
        o.history_burst = Some(10);
        o.outbox_max_bytes = Some(256 << 10);
        o.max_frame_bytes = Some(64 << 10);
        o.write_timeout_ms = Some(60_000);
    })
    .await;
    let prom = Prometheus::start(&[node.running.addr.to_string()]).await;
    // Scraping starts a few seconds after Prometheus is ready (its target
    // discovery sends updates every 5 s): wait for the first scrape, so
    // rates see the scenario from before it began.
    prom.wait_for("count(up == 1)", 1.0)
        .await
        .expect("the gateway is scraped");

    // 1. Members, then messages; every member reads exactly its room's messages.
    let mut members = Vec::new();
    for (room, n, _) in ROOMS {
        for i in 0..n {
            let mut c = node.client(&format!("{room}-m{i}")).await;
            let r = c.subscribe(&[room]).await;
            assert!(r.get("ok").is_some(), "{r}");
            members.push((room, c));
        }
    }
    let mut publisher = node.client("publisher").await;
    for (room, _, messages) in ROOMS {
        for i in 0..messages {
            publish(&mut publisher, room, json!(i)).await;
        }
    }
    for (room, c) in &mut members {
        let want = ROOMS.iter().find(|r| r.0 == *room).unwrap().2;
        let mut offsets = Vec::new();
        for _ in 0..want {
            let m = within(c.next_push()).await;
            assert_eq!(m["room"], *room, "{m}");
            offsets.push(m["offset"].as_u64().unwrap());
        }
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{room}: {offsets:?}");
        assert!(
            c.push_within(Duration::from_millis(50)).await.is_none(),
            "{room}: one too many"
        );
    }

    // 2. One slow consumer: a member of `slow` that never reads, beside one
    // that reads everything; large messages until the node closes it.
    let mut slow = node.client("slow-consumer").await;
    slow.subscribe(&["slow"]).await;
    let mut reader = node.client("slow-reader").await;
    reader.subscribe(&["slow"]).await;
    let reading = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let m = reader.next_push().await;
            if m["data"] == "end" {
                return (n, reader);
            }
            n += 1;
        }
    });
    let big = "b".repeat(30_000);
    let mut flood = 0u64;
    let metrics_url = node.http("/metrics");
    loop {
        publish(&mut publisher, "slow", json!(big)).await;
        flood += 1;
        if flood.is_multiple_of(10)
            && metric(&http_get(&metrics_url).await.1, "gateway_slow_closes_total ") == Some(1.0)
        {
            break;
        }
        assert!(flood < 3_000, "the slow consumer was never closed");
    }
    publish(&mut publisher, "slow", json!("end")).await;
    assert_eq!(slow.closed().await, Ended::Close(4009));
    let (read, _reader) = within(reading).await.unwrap();
    assert_eq!(read, flood, "the reading member got every message");

    // 3. One rate-limited client: 12 `history` requests at once against a
    // burst of 10: 10 pages (from the node's cache), 2 `rate_limited`.
    let mut historian = node.client("historian").await;
    for id in 1..=12u32 {
        historian
            .send_json(&json!({"op": "history", "room": "hot-a", "limit": 50, "id": id}))
            .await;
    }
    let (mut pages, mut limited) = (0, 0);
    for id in 1..=12u32 {
        let r = historian.reply(id).await;
        if let Some(m) = r["ok"]["messages"].as_array() {
            assert_eq!(m.len(), 10, "{r}");
            pages += 1;
        } else {
            assert_eq!(r["error"]["code"], "rate_limited", "{r}");
            limited += 1;
        }
    }
    assert_eq!((pages, limited), (10, 2));

    // 4. Read back through Prometheus, once it scraped the end state.
    let fine: usize = ROOMS.iter().map(|r| r.2).sum();
    let messages = fine as f64 + flood as f64 + 1.0;
    for (expr, want) in [
        ("gateway_published_messages_total", messages),
        ("gateway_slow_closes_total", 1.0),
        ("gateway_rate_limited_total{limit=\"history\"}", 2.0),
        ("sum(gateway_history_pages_total)", 10.0),
    ] {
        if let Err(last) = prom.wait_for(expr, want).await {
            panic!("{expr}: want {want}, Prometheus has {last:?}");
        }
    }
    let by_room = |name: &'static str| {
        let prom = &prom;
        async move {
            prom.query(name)
                .await
                .iter()
                .map(|s| (s["metric"]["room"].as_str().unwrap().to_string(), sample(s)))
                .collect::<BTreeMap<_, _>>()
        }
    };
    let deliveries = by_room("gateway_room_deliveries_total").await;
    let room_messages = by_room("gateway_room_messages_total").await;
    let room_members = by_room("gateway_room_members").await;
    println!("deliveries by room: {deliveries:?}");
    println!("messages by room: {room_messages:?}");
    println!("members by room: {room_members:?}");
    let names: Vec<&str> = deliveries.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["_other", "hot-a", "hot-b", "slow"],
        "the hot rooms by name, the rest in _other"
    );
    assert_eq!(deliveries["hot-a"], 60.0);
    assert_eq!(deliveries["hot-b"], 40.0);
    // warm-1 3x4 + warm-2 2x3 + cold 1x2 (+ the historian, publisher: no rooms).
    assert_eq!(deliveries["_other"], 20.0);
    assert_eq!(room_messages["_other"], 9.0);
    assert_eq!(room_members["_other"], 6.0);
    assert_eq!(room_members["hot-a"], 6.0);
    // The reader got every message; the slow member some, until its close.
    assert!(deliveries["slow"] >= messages - fine as f64, "{deliveries:?}");
    assert_eq!(room_messages["slow"], flood as f64 + 1.0);
    // Sums add up: the rooms' series are the node's totals.
    let total = prom.value("gateway_deliveries_total").await.unwrap();
    assert_eq!(deliveries.values().sum::<f64>(), total);
    assert_eq!(room_messages.values().sum::<f64>(), messages);

    // The fan-out histograms: one observation per message on this node.
    for h in ["gateway_fanout_seconds", "gateway_publish_delivery_seconds"] {
        let count = prom.value(&format!("{h}_count")).await;
        assert_eq!(count, Some(messages), "{h}_count");
        let inf = prom.value(&format!("{h}_bucket{{le=\"+Inf\"}}")).await;
        assert_eq!(inf, Some(messages), "{h} +Inf bucket");
        let buckets = prom.query(&format!("{h}_bucket")).await;
        assert!(buckets.len() > 10, "{h}: {} buckets", buckets.len());
        let p99 = prom
            .value(&format!("histogram_quantile(0.99, {h}_bucket)"))
            .await
            .unwrap();
        assert!(p99.is_finite() && p99 > 0.0, "{h} p99 {p99}");
        println!("{h}: count {messages}, p99 {p99} s");
    }
    // Closes: exactly one 4009, by reason and by code.
    assert_eq!(prom.value("gateway_closes_total{reason=\"slow\"}").await, Some(1.0));
    assert_eq!(prom.value("gateway_disconnects_total{code=\"4009\"}").await, Some(1.0));
    // History pages: all 10 from the cache (the room went live empty here).
    let cache = prom.value("gateway_history_pages_total{source=\"cache\"}").await;
    let stream = prom.value("gateway_history_pages_total{source=\"stream\"}").await;
    println!("history pages: cache {cache:?}, stream {stream:?}");
    assert_eq!((cache, stream), (Some(10.0), Some(0.0)));
    // NATS and JetStream.
    assert_eq!(prom.value("gateway_nats_connected").await, Some(1.0));
    assert_eq!(prom.value("gateway_nats_reconnects_total").await, Some(0.0));
    let acked = prom.value("gateway_jetstream_publish_seconds_count").await.unwrap();
    let dedup = prom.value("gateway_deduplicated_messages_total").await.unwrap_or(0.0);
    assert_eq!(acked, messages + dedup);
    assert_eq!(
        prom.value("gateway_conns_limit").await,
        Some(node.running.node.cfg.max_connections as f64)
    );

    // 5. Every dashboard query parses and returns data in this scenario
    // (rates need two samples after the first scrape: wait for three).
    prom.wait_for("count_over_time(up[1m]) >= bool 3", 1.0)
        .await
        .expect("three scrapes");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/gateway/files/dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    let mut empty = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let concrete = expr.replace("$__rate_interval", "1m").replace("$job", "gateway");
            assert!(!concrete.contains('$'), "unknown variable in {expr}");
            // `query` panics with Prometheus's error when it does not parse.
            if prom.query(&concrete).await.is_empty() {
                empty.push(format!("{}: {expr}", panel["title"]));
            }
            checked += 1;
        }
    }
    println!("dashboard: {checked} queries checked");

    assert!(empty.is_empty(), "dashboard queries without data: {empty:#?}");
    assert!(checked >= 19, "{checked}");
}
