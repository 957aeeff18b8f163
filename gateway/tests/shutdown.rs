//! After `shutdown()` returns, no task of the node is left running: the
//! connections, the flushers, the broker's tasks (cluster mode against a real
//! 3-node nats-server cluster: room subscribers, settle checks, the sweeper,
//! the connection watcher, the linger pool, the NATS client's own tasks) and
//! the watchers (JWKS refresher, TLS watcher, rate-limit sweep).
//!
//! How: each node runs in a runtime of its own, built for the test, so every
//! task alive in it belongs to the node. Tokio's runtime metrics count the
//! tasks alive (`num_alive_tasks`): zero before the node starts, some while
//! it serves, and zero again after `shutdown()` returned and the node was
//! dropped. The node's own trackers must be empty as soon as `shutdown()`
//! returns; the NATS client's tasks (spawned by async-nats, not by us) end
//! once the drained connection is closed, a moment later, so that count is
//! polled for at most a second.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nats::Cluster;
use common::{Client, TestNode, within};
use serde_json::json;
use tokio::runtime::{Handle, Runtime};

fn dedicated_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn alive() -> usize {
    Handle::current().metrics().num_alive_tasks()
}

/// A JWKS URL on a port nobody listens on: the refresher runs (and fails
/// fast) without a server of ours adding tasks to the runtime.
fn dead_jwks_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}/certs")
}

/// A JWKS endpoint on plain threads (no task in the node's runtime) that
/// keeps connections open, so the refresher's HTTP client pools one.
fn jwks_url() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let body = r#"{"keys":[]}"#;
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    format!("http://{addr}/certs")
}

/// Shuts `node` down and checks that nothing of it is left running.
async fn shutdown_leaves_no_task(node: TestNode) {
    let handle: Arc<gateway::Node> = node.running.node.clone();
    let report = within(node.shutdown()).await;
    assert!(report.clean, "drain not clean: {report:?}");
    assert_eq!(handle.tasks_alive(), 0, "the node's trackers are not empty");
    drop(handle);
    let deadline = Instant::now() + Duration::from_secs(1);
    while alive() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(alive(), 0, "tasks still alive after shutdown");
}

#[test]
fn after_shutdown_no_task_of_a_cluster_node_is_left_running() {
    let cluster = dedicated_runtime().block_on(Cluster::start(3));
    let urls = cluster.urls();
    dedicated_runtime().block_on(async move {
        assert_eq!(alive(), 0);
        let node = TestNode::with(|o| {
            o.nats = Some(urls);
            o.nats_replicas = Some(3);
            o.nats_partitions = Some(2);
            o.node_id = Some("shutdown".into());
            // Rooms left stay in the linger pool until the end.
            o.room_linger_ms = Some(60_000);
            o.ephemeral_prefixes = Some(vec!["typing:".into()]);
            o.jwks = Some(dead_jwks_url());
            o.jwks_refetch_min_secs = Some(1);
        })
        .await;
        let mut a = node.client("alice").await;
        let mut b = node.client("bob").await;
        b.subscribe(&["r1", "typing:r1"]).await;
        let r = a.publish("r1", json!("hello")).await;
        assert!(r["ok"]["offset"].as_u64().is_some(), "{r}");
        assert_eq!(b.next_push().await["data"], "hello");
        a.publish("typing:r1", json!("...")).await;
        assert_eq!(b.next_push().await["data"], "...");
        // A member that leaves: its room goes to the linger pool.
        let mut c: Client = node.client("carol").await;
        c.subscribe(&["r2"]).await;
        drop(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tracked = node.running.node.tasks_alive();
        // 2 conns + flushers + watcher, sweeper, linger pool, 3 room
        // subscribers, settle checks, JWKS refresher, rate-limit sweep.
        assert!(tracked >= 10, "only {tracked} tasks tracked");
        assert!(alive() > tracked, "the runtime runs the node's tasks and NATS's");
        shutdown_leaves_no_task(node).await;
        drop((a, b));
    });
}

#[test]
fn after_shutdown_no_task_of_a_tls_node_is_left_running() {
    gateway::transport::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    dedicated_runtime().block_on(async move {
        assert_eq!(alive(), 0);
        let node = TestNode::with(|o| {
            o.tls_cert = Some(cert);
            o.tls_key = Some(key);
            o.tls_reload_ms = Some(50);
            o.jwks = Some(jwks_url());
            o.jwks_refetch_min_secs = Some(1);
        })
        .await;
        // A task of the embedding program (main's SIGHUP handler) that would
        // never end on its own.
        node.running.node.spawn_service(std::future::pending());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(node.running.node.tasks_alive() >= 4);
        shutdown_leaves_no_task(node).await;
    });
}
