//! `gateway_tasks_alive`: the runtime's live tasks in `/metrics`, which a
//! soak watches for leaks (`loadtest/soak.sh`).

mod common;

use std::time::Duration;

use common::TestNode;

async fn tasks(node: &TestNode) -> f64 {
    let (status, text) = common::http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE gateway_tasks_alive gauge\n"), "{text}");
    assert!(
        text.contains("# HELP gateway_tasks_alive Tasks alive in the node's async runtime.\n"),
        "{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("gateway_tasks_alive ")?.trim().parse().ok())
        .expect("gateway_tasks_alive in /metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_alive_follows_connections_and_returns_when_they_close() {
    let node = TestNode::start().await;
    let before = tasks(&node).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = node.client(&format!("u{i}")).await;
        c.subscribe(&["lobby"]).await;
        clients.push(c);
    }
    let during = tasks(&node).await;
    assert!(during >= before + 20.0, "before {before}, with 20 connections {during}");
    drop(clients);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = tasks(&node).await;
        if now <= before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tasks stayed at {now} (before {before})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
