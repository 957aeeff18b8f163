//! The persist-worker example (`examples/persist_worker.rs`) against a real
//! 3-node JetStream cluster: it sees every acknowledged message exactly once
//! in its database, across a SIGKILL and restart of its own, even though the
//! room streams keep only 5 messages per room.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::nats::Cluster;
use common::{TestNode, within};
use serde_json::{Value, json};

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(cluster: &Cluster, out: &std::path::Path) -> Worker {
    Worker(
        Command::new(env!("CARGO_BIN_EXE_persist-worker"))
            .args(["--nats", &cluster.urls(), "--out", out.to_str().unwrap()])
            .args([
                "--partitions",
                "2",
                "--replicas",
                "3",
                "--durable",
                "db-writer",
                "--ack-wait-secs",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("persist-worker starts"),
    )
}

/// The complete rows written so far (the worker may be writing the last).
fn rows(out: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a bad row {l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_persist_worker_stores_every_acknowledged_message_once_across_its_restart() {
    let cluster = Cluster::start(3).await;
    let urls = cluster.urls();
    let node = TestNode::with(move |o| {
        o.nats = Some(urls);
        o.nats_replicas = Some(3);
        o.nats_partitions = Some(2);
        o.history_size = Some(5);
        o.no_rate_limits = Some(true);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("messages.jsonl");
    let mut w = worker(&cluster, &out);
    // The archive exists (and sources the room streams) before the load.
    let mut c = node.client("writer").await;
    // A fresh cluster may answer the first publish `unavailable` while its
    // streams elect leaders: retried with one key, as a client would
    // (bounded), so a try that was stored but not answered is not stored twice.
    let warm_up = json!({"op":"publish","room":"room-0","data":"warm-up","key":"warm-up"});
    let mut r = c.request(warm_up.clone()).await;
    for _ in 0..50 {
        if r["ok"]["offset"].is_u64() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        r = c.request(warm_up.clone()).await;
    }
    let mut expected = BTreeSet::new();
    expected.insert(("room-0".to_string(), r["ok"]["offset"].as_u64().unwrap()));
    within(async {
        while rows(&out).is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let publish = async |c: &mut common::Client, n: usize, expected: &mut BTreeSet<(String, u64)>| {
        for i in 0..n {
            let room = format!("room-{}", i % 3);
            let r = c.publish(&room, json!({"n": i})).await;
            expected.insert((room, r["ok"]["offset"].as_u64().unwrap_or_else(|| panic!("{r}"))));
        }
    };
    publish(&mut c, 150, &mut expected).await;
    // Killed mid-stream (a write may be done and its ack not sent).
    let _ = w.0.kill();
    let _ = w.0.wait();
    publish(&mut c, 150, &mut expected).await;
    // The room streams now hold 5 messages per room; the archive holds the rest.
    drop(w);
    let _w = worker(&cluster, &out);
    let mut got = Vec::new();
    for _ in 0..100 {
        got = rows(&out);
        if got.len() >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys: Vec<(String, u64)> = got
        .iter()
        .map(|r| (r["room"].as_str().unwrap().to_string(), r["offset"].as_u64().unwrap()))
        .collect();
    let distinct: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(keys.len(), distinct.len(), "no message written twice");
    let missing: Vec<_> = expected.difference(&distinct).collect();
    let extra: Vec<_> = distinct.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    assert!(got.iter().all(|r| r["from"] == "writer"));
    // Nothing more arrives (no duplicates after the last ack).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(rows(&out).len(), expected.len());
    let h = c.request(json!({"op":"history","room":"room-1","limit":50})).await;
    assert_eq!(
        h["ok"]["messages"].as_array().unwrap().len(),
        5,
        "the room stream itself kept 5"
    );
}
