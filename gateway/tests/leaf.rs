//! The regional tier: gateways behind NATS leaf nodes, JetStream in the hub
//! cluster's domain (`--nats-js-domain`). Real processes: a 3-node hub
//! cluster with JetStream, two leaf nodes (two regions), two gateways on
//! each leaf (in-process nodes), real WebSocket clients.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::nats::{Cluster, Leaf};
use common::{Client, TestNode, within};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const DOMAIN: &str = "hub";

async fn gateway(leaf: &Leaf, name: &str) -> TestNode {
    let url = leaf.server.url();
    let name = name.to_string();
    TestNode::with(move |o| {
        o.nats = Some(url);
        o.nats_js_domain = Some(DOMAIN.into());
        o.nats_replicas = Some(3);
        o.nats_partitions = Some(2);
        o.node_id = Some(name);
        o.room_linger_ms = Some(300);
        o.no_rate_limits = Some(true);
        o.nats_ignore_discovered = Some(true);
    })
    .await
}

/// A room member that resumes with `since` when its connection ends.
struct Member {
    url: String,
    token: String,
    room: String,
    client: Client,
    offsets: Vec<u64>,
    resumes: usize,
}

impl Member {
    async fn join(node: &TestNode, sub: &str, room: &str) -> Self {
        let mut client = node.client(sub).await;
        client.subscribe(&[room]).await;
        Self {
            url: node.url(),
            token: node.token(sub),
            room: room.to_string(),
            client,
            offsets: Vec::new(),
            resumes: 0,
        }
    }

    /// Reads pushes until it holds `want` (every acknowledged offset).
    async fn read_until(&mut self, want: &BTreeSet<u64>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !want.iter().all(|o| self.offsets.contains(o)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "missing {:?}",
                want.iter().filter(|o| !self.offsets.contains(o)).collect::<Vec<_>>()
            );
            match tokio::time::timeout(Duration::from_secs(2), self.client.ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let m: Value = serde_json::from_str(&t).unwrap();
                    if m["op"] == "message" {
                        self.offsets.push(m["offset"].as_u64().unwrap());
                    }
                }
                Ok(Some(Ok(_))) => {}
                // Closed (1012, 4009 or dropped): resume with `since`.
                Ok(_) => self.resume().await,
            }
        }
    }

    async fn resume(&mut self) {
        self.resumes += 1;
        let since = self.offsets.last().copied().unwrap_or(0);
        loop {
            let mut c = Client::open(&self.url).await;
            c.connect(&self.token).await;
            let r = c
                .request(json!({"op":"subscribe","rooms":[{"room": self.room, "since": since}]}))
                .await;
            if r.get("ok").is_some() {
                self.client = c;
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every offset once, in order, exactly `want`.
    fn check(&self, name: &str, want: &BTreeSet<u64>) {
        let got: Vec<u64> = self.offsets.clone();
        let want: Vec<u64> = want.iter().copied().collect();
        assert_eq!(got, want, "{name}: every acknowledged message once, in order");
    }
}

/// Publishes `n` messages; returns the acknowledged offsets (a publish that
/// is refused, e.g. while its leaf node is down, is not acknowledged).
async fn publish(c: &mut Client, room: &str, n: usize, tag: &str) -> Vec<u64> {
    let mut acked = Vec::new();
    for i in 0..n {
        let r = c.publish(room, json!({"from": tag, "i": i})).await;
        if let Some(o) = r["ok"]["offset"].as_u64() {
            acked.push(o);
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaf_nodes_carry_one_copy_per_message_and_lose_nothing_acknowledged() {
    let hub = Cluster::start_hub(3, DOMAIN).await;
    let leaf_a = Leaf::start("leaf-a", &hub).await;
    let mut leaf_b = Leaf::start("leaf-b", &hub).await;
    let gws = [
        gateway(&leaf_a, "a1").await,
        gateway(&leaf_a, "a2").await,
        gateway(&leaf_b, "b1").await,
        gateway(&leaf_b, "b2").await,
    ];
    let room = format!("region-{}", common::rand_suffix());
    let mut members = Vec::new();
    for (g, node) in gws.iter().enumerate() {
        for m in 0..2 {
            members.push(Member::join(node, &format!("m{g}{m}"), &room).await);
        }
    }
    let mut pub_a = gws[0].client("pub-a").await;
    let mut pub_b = gws[3].client("pub-b").await;
    // The first publish creates the stream through the hub's domain.
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    within(async {
        while acked.is_empty() {
            acked.extend(publish(&mut pub_a, &room, 1, "warm-up").await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // Publishes from gateways behind both leaf nodes, at the same time.
    let (a, b) = tokio::join!(publish(&mut pub_a, &room, 20, "a"), publish(&mut pub_b, &room, 20, "b"));
    assert_eq!((a.len(), b.len()), (20, 20), "every publish acknowledged");
    acked.extend(a);
    acked.extend(b);
    for m in &mut members {
        m.read_until(&acked).await;
    }

    // One copy per message over a leaf link, whatever is behind it: leaf B
    // has two subscribed gateways, and receives each region-A message once.
    let (in_before, _) = leaf_b.link_msgs().await;
    let burst = publish(&mut pub_a, &room, 50, "count").await;
    assert_eq!(burst.len(), 50);
    acked.extend(burst);
    for m in &mut members {
        m.read_until(&acked).await;
    }
    let (in_after, _) = leaf_b.link_msgs().await;
    let copies = in_after - in_before;
    eprintln!("leaf-b link: {copies} messages in for 50 published in region A (2 gateways behind it)");
    assert!(
        (50..60).contains(&copies),
        "one copy per message over the leaf link (two per message would be {}): {copies}",
        100
    );

    // Leaf B dies: region A keeps publishing (acknowledged), region B's
    // publishes are refused; then leaf B comes back and its members catch up.
    leaf_b.stop();
    let during_a = publish(&mut pub_a, &room, 10, "during-a").await;
    assert_eq!(during_a.len(), 10, "region A is unaffected");
    acked.extend(during_a);
    acked.extend(publish(&mut pub_b, &room, 3, "during-b").await);
    leaf_b.start_again().await;
    let after = within(async {
        loop {
            let got = publish(&mut pub_b, &room, 5, "after").await;
            if !got.is_empty() {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    acked.extend(after);
    for (i, m) in members.iter_mut().enumerate() {
        m.read_until(&acked).await;
        m.check(&format!("member {i}"), &acked);
        eprintln!("member {i}: {} messages, {} resumes", m.offsets.len(), m.resumes);
    }
    for g in gws {
        g.shutdown().await;
    }
}
