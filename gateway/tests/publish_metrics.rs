//! The publish counters (`gateway_published_messages_total`,
//! `gateway_deduplicated_messages_total`, `gateway_deliveries_total`,
//! `gateway_publish_seconds`) count a client's publishes and the server
//! API's alike. Alone in its binary: the Prometheus recorder is process-wide,
//! and this test reads absolute counts.

mod common;

use common::TestNode;
use common::api::{KEY, call};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_api_publishes_count_alike_and_retries_count_as_deduplicated() {
    let node = TestNode::with(|o| {
        o.api_listen = Some("127.0.0.1:0".parse().unwrap());
        o.api_key = Some(vec![KEY.into()]);
    })
    .await;
    let api = node.running.api_addr.expect("the API listens");
    let mut c = node.client("alice").await;
    c.subscribe(&["general"]).await;

    // A client: one plain publish, one keyed publish and its retry.
    assert!(c.publish("general", json!(1)).await["ok"].is_object());
    for _ in 0..2 {
        let r = c
            .request(json!({"op":"publish","room":"general","data":2,"key":"c-1"}))
            .await;
        assert!(r["ok"].is_object(), "{r}");
    }
    // The API: the same three, and a refused publish that counts nowhere.
    assert_eq!(
        call(api, "publish", Some(KEY), r#"{"room":"general","data":3}"#)
            .await
            .0,
        200
    );
    for _ in 0..2 {
        let body = r#"{"room":"general","data":4,"key":"a-1"}"#;
        assert_eq!(call(api, "publish", Some(KEY), body).await.0, 200);
    }
    assert_eq!(
        call(api, "publish", Some(KEY), r#"{"room":"a b","data":5}"#).await.0,
        400
    );
    for _ in 0..4 {
        c.next_push().await;
    }

    let (status, text) = common::http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    let got = [
        "gateway_published_messages_total",
        "gateway_deduplicated_messages_total",
        "gateway_deliveries_total",
        "gateway_publish_seconds_count",
    ]
    .map(|n| common::metric(&text, n));
    assert_eq!(
        got,
        [4.0, 2.0, 4.0, 6.0],
        "4 stored (2 from each side), 2 retries, 4 deliveries to the one member, 6 timed:\n{text}"
    );
}
