//! Cluster mode against a real 3-node nats-server cluster with JetStream (R3):
//! delivery across gateways, one copy per gateway, NATS faults, gateway
//! restarts, and refusing lossy streams.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::nats::Cluster;
use common::{Client, Ended, TestNode, within};
use serde_json::{Value, json};

async fn gateway(cluster: &Cluster, name: &str, urls: Option<String>) -> TestNode {
    gateway_with(cluster, name, urls, 1000).await
}

async fn gateway_with(cluster: &Cluster, name: &str, urls: Option<String>, history: usize) -> TestNode {
    let urls = urls.unwrap_or_else(|| cluster.urls());
    let replicas = cluster.servers.len().min(3);
    let name = name.to_string();
    TestNode::with(move |o| {
        o.nats = Some(urls);
        o.nats_replicas = Some(replicas);
        o.node_id = Some(name);
        o.room_linger_ms = Some(300);
        o.nats_partitions = Some(4);
        o.history_size = Some(history);
        // These tests are about the bus; rate limits have their own tests.
        o.no_rate_limits = Some(true);
        o.ephemeral_prefixes = Some(vec!["typing:".into()]);
    })
    .await
}

/// Reads `n` message pushes and returns (offset, data) pairs.
async fn read_messages(c: &mut Client, n: usize) -> Vec<(u64, Value)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = c.next_push().await;
        assert_eq!(m["op"], "message", "{m}");
        out.push((m["offset"].as_u64().unwrap(), m["data"].clone()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_published_on_one_gateway_reaches_members_on_all_three_once_in_order() {
    let cluster = Cluster::start(3).await;
    let a = gateway(&cluster, "gw-a", None).await;
    let b = gateway(&cluster, "gw-b", None).await;
    let c = gateway(&cluster, "gw-c", None).await;
    let mut members = Vec::new();
    for (i, node) in [&a, &b, &c].into_iter().enumerate() {
        for j in 0..2 {
            let mut m = node.client(&format!("m{i}{j}")).await;
            m.subscribe(&["lobby"]).await;
            members.push(m);
        }
    }
    let mut publisher = a.client("publisher").await;
    let mut offsets = Vec::new();
    for i in 0..100 {
        let r = publisher.publish("lobby", json!(i)).await;
        offsets.push(r["ok"]["offset"].as_u64().unwrap_or_else(|| panic!("{r}")));
    }
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    for m in &mut members {
        let got = read_messages(m, 100).await;
        let got_offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(got_offsets, offsets, "every message once, in offset order");
        assert_eq!(got[7].1, json!(7));
        assert!(
            m.push_within(Duration::from_millis(300)).await.is_none(),
            "nothing twice"
        );
    }
    // History comes from any node.
    let mut h = c.client("historian").await;
    let r = h.request(json!({"op":"history","room":"lobby","limit":10})).await;
    let hist: Vec<u64> = r["ok"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(hist, offsets[90..].to_vec());
    assert_eq!(r["ok"]["more"], true);
}

fn gateway_conns<'a>(conns: &'a [Value], names: &[&str]) -> Vec<&'a Value> {
    conns
        .iter()
        .filter(|c| names.iter().any(|n| c["name"].as_str() == Some(n)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_carries_one_copy_per_gateway_not_per_member() {
    const MEMBERS: usize = 1000;
    const MESSAGES: u64 = 50;
    let cluster = Cluster::start(3).await;
    let a = gateway(&cluster, "gw-one", None).await;
    let b = gateway(&cluster, "gw-two", None).await;
    let mut members = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        let node = if i % 2 == 0 { &a } else { &b };
        let mut m = node.client(&format!("u{i}")).await;
        m.subscribe(&["big"]).await;
        members.push(m);
    }
    let mut publisher = a.client("speaker").await;
    // Warm up (first publish may create consumers etc.), then measure.
    publisher.publish("big", json!("warm")).await;
    for m in &mut members {
        m.next_push().await;
    }
    let names = ["gw-one", "gw-two"];
    let before = cluster.connections().await;
    let out_before: u64 = gateway_conns(&before, &names)
        .iter()
        .map(|c| c["out_msgs"].as_u64().unwrap())
        .sum();
    for i in 0..MESSAGES {
        publisher.publish("big", json!(i)).await;
    }
    for m in &mut members {
        let got = read_messages(m, MESSAGES as usize).await;
        assert_eq!(got.last().unwrap().1, json!(MESSAGES - 1));
    }
    let after = cluster.connections().await;
    let conns = gateway_conns(&after, &names);
    let out_after: u64 = conns.iter().map(|c| c["out_msgs"].as_u64().unwrap()).sum();
    let per_message = (out_after - out_before) as f64 / MESSAGES as f64;
    // Two gateways receive each message once (plus the publish acknowledgement
    // to the publishing gateway): about 3 NATS deliveries, not 1,000.
    assert!(
        (2.0..=4.0).contains(&per_message),
        "{per_message} NATS deliveries per message"
    );
    // Subscriptions grow with rooms per gateway, not with users.
    for c in &conns {
        let room_subs = c["subscriptions_list"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|s| s.as_str().is_some_and(|s| s.starts_with("gw.room.")))
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(room_subs, 1, "one subscription for one room: {c}");
        let wildcard = c["subscriptions_list"]
            .as_array()
            .map(|l| {
                l.iter()
                    .any(|s| s.as_str().is_some_and(|s| s.contains('>') || s.contains("room.*")))
            })
            .unwrap_or(false);
        assert!(!wildcard, "no wildcard room subscription: {c}");
    }
    println!("NATS deliveries per published message (2 gateways, {MEMBERS} members): {per_message:.2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_nats_server_loses_no_acknowledged_message() {
    const PUBLISHERS: usize = 10;
    const EACH: usize = 500;
    let mut cluster = Cluster::start(3).await;
    // Rooms keep 10,000 messages: a node that falls behind during the
    // failover can always read what it missed.
    let a = gateway_with(&cluster, "gw-k1", None, 10_000).await;
    let b = gateway_with(&cluster, "gw-k2", None, 10_000).await;
    let mut members = Vec::new();
    for (i, node) in [&a, &b, &a, &b].into_iter().enumerate() {
        let mut m = node.client(&format!("watcher{i}")).await;
        m.subscribe(&["durable"]).await;
        members.push(m);
    }
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let mut c = if p % 2 == 0 {
            a.client(&format!("p{p}")).await
        } else {
            b.client(&format!("p{p}")).await
        };
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = 0;
            for i in 0..EACH {
                let r = c.publish("durable", json!(format!("{p}-{i}"))).await;
                match r["ok"]["offset"].as_u64() {
                    Some(o) => acked.push((o, format!("{p}-{i}"))),
                    None => {
                        assert_eq!(r["error"]["code"], "unavailable", "{r}");
                        refused += 1;
                    }
                }
            }
            (acked, refused)
        }));
    }
    // Kill a server while the publishers are busy.
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.servers[1].kill();
    let mut acked = HashMap::new();
    let mut refused = 0;
    for t in tasks {
        let (a, r) = tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .expect("publishers finish")
            .unwrap();
        refused += r;
        for (o, d) in a {
            assert!(acked.insert(o, d).is_none(), "two acks with one offset");
        }
    }
    assert!(!acked.is_empty());
    let max_acked = *acked.keys().max().unwrap();
    for m in &mut members {
        let mut seen: Vec<(u64, String)> = Vec::new();
        // Read until every acknowledged offset has arrived.
        while seen.last().is_none_or(|(o, _)| *o < max_acked) {
            let push = tokio::time::timeout(Duration::from_secs(30), m.next_push())
                .await
                .expect("messages keep arriving");
            seen.push((
                push["offset"].as_u64().unwrap(),
                push["data"].as_str().unwrap().to_string(),
            ));
        }
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "in order, none twice");
        let by_offset: HashMap<u64, &String> = seen.iter().map(|(o, d)| (*o, d)).collect();
        for (o, d) in &acked {
            assert_eq!(
                by_offset.get(o).copied(),
                Some(d),
                "acknowledged offset {o} delivered with its data"
            );
        }
    }
    println!(
        "acknowledged {} publishes, {} answered unavailable during the failover",
        acked.len(),
        refused
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_stopped_gateway_resume_on_another_with_since() {
    let cluster = Cluster::start(3).await;
    let a = gateway(&cluster, "gw-r1", None).await;
    let b = gateway(&cluster, "gw-r2", None).await;
    let mut writer = b.client("writer").await;
    let mut reader = a.client("reader").await;
    reader.subscribe(&["resume"]).await;
    for i in 0..5 {
        writer.publish("resume", json!(i)).await;
    }
    let seen = read_messages(&mut reader, 5).await;
    let last_seen = seen.last().unwrap().0;
    let report = tokio::spawn(a.shutdown());
    assert_eq!(reader.closed().await, Ended::Close(1012));
    assert!(within(report).await.unwrap().clean);
    let mut missed = Vec::new();
    for i in 5..12 {
        missed.push(
            writer.publish("resume", json!(i)).await["ok"]["offset"]
                .as_u64()
                .unwrap(),
        );
    }
    let mut reader = b.client("reader").await;
    let r = reader
        .request(json!({"op":"subscribe","rooms":[{"room":"resume","since":last_seen}]}))
        .await;
    assert_eq!(r["ok"]["rooms"][0]["recovered"], true, "{r}");
    let live = writer.publish("resume", json!("live")).await["ok"]["offset"]
        .as_u64()
        .unwrap();
    let got: Vec<u64> = read_messages(&mut reader, missed.len() + 1)
        .await
        .iter()
        .map(|(o, _)| *o)
        .collect();
    missed.push(live);
    assert_eq!(got, missed, "exactly the missed messages, then live");
    assert!(reader.push_within(Duration::from_millis(300)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_nats_is_down_publishes_are_refused_and_missed_messages_arrive_after() {
    let mut cluster = Cluster::start(3).await;
    // Gateway A knows only server 1 (and ignores the servers the cluster
    // announces); B knows the others.
    let a_url = cluster.servers[0].url();
    let a = TestNode::with(move |o| {
        o.nats = Some(a_url);
        o.nats_replicas = Some(3);
        o.node_id = Some("gw-d1".into());
        o.nats_partitions = Some(4);
        o.no_rate_limits = Some(true);
        o.nats_ignore_discovered = Some(true);
    })
    .await;
    let b_urls = format!("{},{}", cluster.servers[1].url(), cluster.servers[2].url());
    let b = gateway(&cluster, "gw-d2", Some(b_urls)).await;
    let mut on_a = a.client("on-a").await;
    on_a.subscribe(&["outage"]).await;
    let mut on_b = b.client("on-b").await;
    on_b.publish("outage", json!("before")).await;
    assert_eq!(on_a.next_push().await["data"], "before");

    cluster.servers[0].kill();
    // A notices: not ready, publishes refused, its clients stay connected.
    let readyz = a.http("/readyz");
    let mut code = None;
    for _ in 0..100 {
        code = common::try_http_get(&readyz).await.map(|(c, _)| c);
        if code == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code, Some(503), "not ready while NATS is down");
    let r = on_a.publish("outage", json!("lost?")).await;
    assert_eq!(r["error"]["code"], "unavailable", "never a false ok: {r}");
    let mut during = Vec::new();
    for i in 0..20 {
        // B's streams may be electing a new leader: retry until stored.
        let mut offset = None;
        for _ in 0..100 {
            let r = on_b.publish("outage", json!(i)).await;
            if let Some(o) = r["ok"]["offset"].as_u64() {
                offset = Some(o);
                break;
            }
            assert_eq!(r["error"]["code"], "unavailable", "{r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        during.push(offset.expect("B stores messages while server 1 is down"));
    }
    cluster.restart(0).await;
    let got: Vec<u64> = read_messages(&mut on_a, during.len())
        .await
        .iter()
        .map(|(o, _)| *o)
        .collect();
    assert_eq!(got, during, "missed messages arrive after the reconnect, in order");
    let r = on_a.publish("outage", json!("after")).await;
    assert!(r["ok"]["offset"].as_u64().is_some(), "{r}");
    assert_eq!(on_a.next_push().await["data"], "after");
    assert!(on_a.push_within(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn a_stream_with_limits_that_drop_messages_is_refused_at_start() {
    let cluster = Cluster::start(1).await;
    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "GW_ROOMS_0".into(),
        subjects: vec!["gw.store.0.*".into()],
        max_messages: 10_000,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut opts = common::test_opts();
    opts.nats = Some(cluster.urls());
    opts.nats_partitions = Some(1);
    let cfg = gateway::Config::resolve(opts).unwrap();
    let err = match gateway::Node::new(cfg).await {
        Ok(_) => panic!("a lossy stream must be refused"),
        Err(e) => e,
    };
    let text = format!("{:#}", anyhow::Error::from(err));
    assert!(text.contains("max_msgs"), "{text}");
    assert!(text.contains("GW_ROOMS_0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ephemeral_rooms_fan_out_across_gateways_without_storage() {
    let cluster = Cluster::start(3).await;
    let a = gateway(&cluster, "gw-e1", None).await;
    let b = gateway(&cluster, "gw-e2", None).await;
    let mut on_a = a.client("ea").await;
    let mut on_b = b.client("eb").await;
    on_a.subscribe(&["typing:general"]).await;
    on_b.subscribe(&["typing:general"]).await;
    // Core NATS delivers at most once, and B's subscription reaches the
    // other NATS servers a moment after B made it: a typing indicator sent in
    // that moment is not delivered to B. Such rooms are for exactly that kind
    // of message, so send until both have one.
    let mut seen = [false, false];
    for _ in 0..50 {
        let r = on_a.publish("typing:general", json!({"typing":true})).await;
        assert_eq!(r["ok"]["offset"], 0, "not stored: {r}");
        for (i, c) in [&mut on_a, &mut on_b].into_iter().enumerate() {
            if let Some(m) = c.push_within(Duration::from_millis(100)).await {
                assert_eq!(
                    (m["room"].as_str(), m["offset"].as_u64()),
                    (Some("typing:general"), Some(0))
                );
                assert_eq!(m["data"]["typing"], true);
                seen[i] = true;
            }
        }
        if seen == [true, true] {
            break;
        }
    }
    assert_eq!(seen, [true, true], "both gateways deliver the ephemeral message");
    let h = on_b.request(json!({"op":"history","room":"typing:general"})).await;
    assert_eq!(h["ok"]["messages"], json!([]));
    let r = on_b
        .request(json!({"op":"subscribe","rooms":[{"room":"typing:general","since":5}]}))
        .await;
    assert_eq!(r["ok"]["rooms"][0]["recovered"], false);
    // Nothing reached JetStream.
    let client = async_nats::connect(cluster.servers[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut total = 0;
    for p in 0..4 {
        if let Ok(mut s) = js.get_stream(format!("GW_ROOMS_{p}")).await {
            total += s.info().await.unwrap().state.messages;
        }
    }
    assert_eq!(total, 0);
}

/// Figures for docs/cluster.md (not a test of timing: run it by hand).
/// `cargo test --release -p gateway --test cluster -- --ignored --nocapture publish_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn publish_throughput_durable_vs_ephemeral() {
    const PUBLISHERS: usize = 50;
    const EACH: usize = 200;
    for sync_always in [true, false] {
        let cluster = Cluster::start_with(3, sync_always).await;
        let node = gateway(&cluster, &format!("gw-tp-{sync_always}"), None).await;
        for room in ["durable-room", "typing:room"] {
            let mut clients = Vec::new();
            for i in 0..PUBLISHERS {
                clients.push(node.client(&format!("p{i}")).await);
            }
            let started = std::time::Instant::now();
            let tasks: Vec<_> = clients
                .into_iter()
                .map(|mut c| {
                    tokio::spawn(async move {
                        for i in 0..EACH {
                            let r = c.publish(room, json!(i)).await;
                            assert!(r["ok"]["offset"].is_u64(), "{r}");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "sync_interval={} room={room}: {:.0} acknowledged publishes/s ({} publishers)",
                if sync_always { "always" } else { "default" },
                (PUBLISHERS * EACH) as f64 / secs,
                PUBLISHERS
            );
        }
    }
}

/// The report's silent loss, from the other side: a node that was cut off
/// while more messages than a room keeps were published cannot deliver them
/// all. It must say so (4009, then `recovered:false` on resubscribe), never
/// skip them silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_fell_behind_the_stream_history_resets_its_members() {
    const HISTORY: usize = 5;
    let mut cluster = Cluster::start(3).await;
    let a_url = cluster.servers[0].url();
    let a = TestNode::with(move |o| {
        o.nats = Some(a_url);
        o.nats_replicas = Some(3);
        o.node_id = Some("gw-h1".into());
        o.nats_partitions = Some(4);
        o.no_rate_limits = Some(true);
        o.nats_ignore_discovered = Some(true);
        o.history_size = Some(HISTORY);
    })
    .await;
    let b_urls = format!("{},{}", cluster.servers[1].url(), cluster.servers[2].url());
    let b = gateway_with(&cluster, "gw-h2", Some(b_urls), HISTORY).await;
    let mut on_a = a.client("behind").await;
    on_a.subscribe(&["short"]).await;
    let mut on_b = b.client("writer").await;
    let first = on_b.publish("short", json!("seen")).await["ok"]["offset"]
        .as_u64()
        .unwrap();
    assert_eq!(on_a.next_push().await["offset"], first);

    cluster.servers[0].kill();
    // While A is cut off, far more than the room keeps is published.
    let mut last = 0;
    for i in 0..(HISTORY * 4) {
        for _ in 0..100 {
            let r = on_b.publish("short", json!(i)).await;
            if let Some(o) = r["ok"]["offset"].as_u64() {
                last = o;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster.restart(0).await;
    // A cannot deliver what the stream dropped: its member is told to resume.
    assert_eq!(on_a.closed().await, Ended::Close(4009));
    let mut again = a.client("behind").await;
    let r = again
        .request(json!({"op":"subscribe","rooms":[{"room":"short","since":first}]}))
        .await;
    assert_eq!(r["ok"]["rooms"][0]["recovered"], false, "{r}");
    assert_eq!(r["ok"]["rooms"][0]["offset"], last);
    // Live messages flow again.
    let live = on_b.publish("short", json!("live")).await["ok"]["offset"]
        .as_u64()
        .unwrap();
    assert_eq!(again.next_push().await["offset"], live);
}
