//! The server API (`--api-listen`, `--api-key`, docs/server-api.md) on one
//! node: its own port, keys, limits, and every method in embedded mode.
//! Cluster-wide behaviour is in `api_cluster.rs`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::api::{KEY, KEY2, call, now};
use common::{Client, Ended, TestNode};
use serde_json::json;

async fn api_node(tune: impl FnOnce(&mut gateway::config::Opts)) -> (TestNode, SocketAddr) {
    let node = TestNode::with(|o| {
        o.api_listen = Some("127.0.0.1:0".parse().unwrap());
        o.api_key = Some(vec![KEY.into(), KEY2.into()]);
        tune(o);
    })
    .await;
    let api = node.running.api_addr.expect("the API listens");
    (node, api)
}

/// An API publish is a publish: members get it with the answered offset,
/// `from` is what the caller says ("server" when it says nothing), and a
/// retried key is stored once per API key.
#[tokio::test]
async fn publish_and_broadcast_reach_members_and_keys_are_scoped_to_the_api_key() {
    let (node, api) = api_node(|_| {}).await;
    let mut c = node.client("alice").await;
    c.subscribe(&["general", "random"]).await;
    let (status, r) = call(api, "publish", Some(KEY), r#"{"room":"general","data":{"text":"hi"}}"#).await;
    assert_eq!(status, 200, "{r}");
    let offset = r["ok"]["offset"].as_u64().unwrap();
    let m = c.next_push().await;
    assert_eq!(
        (m["offset"].as_u64(), &m["from"], &m["data"]["text"]),
        (Some(offset), &json!("server"), &json!("hi"))
    );

    let body = r#"{"room":"general","data":1,"from":"bot","key":"k-1"}"#;
    let first = call(api, "publish", Some(KEY), body).await.1["ok"]["offset"].clone();
    let retry = call(api, "publish", Some(KEY), body).await.1["ok"]["offset"].clone();
    assert_eq!(first, retry, "a retry with the same key answers the same offset");
    let m = c.next_push().await;
    assert_eq!((&m["from"], &m["offset"]), (&json!("bot"), &first));
    // The other key's "k-1" is another message.
    let other = call(api, "publish", Some(KEY2), body).await.1["ok"]["offset"].clone();
    assert_ne!(other, first);
    assert_eq!(c.next_push().await["offset"], other);
    // A client may not send a key in the API's space.
    let r = c
        .request(json!({"op":"publish","room":"general","data":1,"key":"\u{0}api:x:k-1"}))
        .await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");

    let (status, r) = call(
        api,
        "broadcast",
        Some(KEY),
        r#"{"rooms":["general","random","bad room"],"data":2}"#,
    )
    .await;
    assert_eq!(
        (status, &r["error"]["code"]),
        (400, &json!("bad_request")),
        "one bad name refuses the call: {r}"
    );
    let (status, r) = call(
        api,
        "broadcast",
        Some(KEY),
        r#"{"rooms":["general","random"],"data":2}"#,
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let rooms = r["ok"]["rooms"].as_array().unwrap();
    assert_eq!(rooms.len(), 2);
    let mut got: Vec<String> = Vec::new();
    for _ in 0..2 {
        let m = c.next_push().await;
        assert_eq!(m["data"], 2);
        got.push(m["room"].as_str().unwrap().to_string());
    }
    got.sort();
    assert_eq!(got, ["general", "random"]);

    // history, room, info
    let (_, h) = call(api, "history", Some(KEY), r#"{"room":"general","limit":2}"#).await;
    let msgs = h["ok"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{h}");
    assert_eq!(msgs[1]["data"], 2);
    assert_eq!(h["ok"]["more"], true);
    let (_, r) = call(api, "room", Some(KEY), r#"{"room":"general"}"#).await;
    assert_eq!(r["ok"]["count"], 1, "{r}");
    let (_, r) = call(api, "info", Some(KEY), "{}").await;
    assert_eq!(r["ok"]["connections"], 1, "{r}");
    assert_eq!(r["ok"]["nodes"][0]["node"], "test-node", "{r}");
    // Errors carry the client protocol's codes.
    let (status, r) = call(api, "publish", Some(KEY), r#"{"room":"a b","data":1}"#).await;
    assert_eq!((status, &r["error"]["code"]), (400, &json!("bad_request")));
    let (status, r) = call(api, "nope", Some(KEY), "{}").await;
    assert_eq!((status, &r["error"]["code"]), (400, &json!("bad_request")));
}

/// The API port is not the client port, in either direction.
#[tokio::test]
async fn the_api_port_refuses_upgrades_and_the_client_port_refuses_api_calls() {
    let (node, api) = api_node(|_| {}).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{api}/ws")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("upgrade on the API port: {:?}", other.map(|_| ())),
    }
    let (status, r) = call(
        node.running.addr,
        "publish",
        Some(KEY),
        r#"{"room":"general","data":1}"#,
    )
    .await;
    assert_eq!((status, &r["error"]["code"]), (404, &json!("bad_request")), "{r}");
    // And the client port still serves clients.
    node.assert_serving().await;
}

/// `--api-key`: a missing or wrong key is `unauthorized` (401); every
/// configured key works (rotation).
#[tokio::test]
async fn api_key_wrong_or_missing_is_refused_and_both_keys_work() {
    let (_node, api) = api_node(|_| {}).await;
    for key in [None, Some("wrong-key-0123456789-abcdef"), Some(&KEY[..KEY.len() - 1])] {
        let (status, r) = call(api, "info", key, "{}").await;
        assert_eq!(
            (status, &r["error"]["code"]),
            (401, &json!("unauthorized")),
            "{key:?}: {r}"
        );
    }
    for key in [KEY, KEY2] {
        assert_eq!(call(api, "info", Some(key), "{}").await.0, 200);
    }
}

/// `--api-max-body-bytes`: a bigger body is `too_large` (413).
#[tokio::test]
async fn api_max_body_bytes_refuses_a_bigger_body() {
    let (_node, api) = api_node(|o| o.api_max_body_bytes = Some(100)).await;
    let big = format!(r#"{{"room":"general","data":"{}"}}"#, "x".repeat(200));
    let (status, r) = call(api, "publish", Some(KEY), &big).await;
    assert_eq!((status, &r["error"]["code"]), (413, &json!("too_large")), "{r}");
    assert_eq!(call(api, "publish", Some(KEY), r#"{"room":"g","data":1}"#).await.0, 200);
}

/// `--api-requests-per-sec`: past the burst (2x), `rate_limited` (429) with
/// `retry_after_ms`; wrong keys spend it too.
#[tokio::test]
async fn api_requests_per_sec_limits_the_api() {
    let (_node, api) = api_node(|o| o.api_requests_per_sec = Some(1)).await;
    assert_eq!(
        call(api, "info", Some("wrong-key-0123456789-abcdef"), "{}").await.0,
        401
    );
    assert_eq!(call(api, "info", Some(KEY), "{}").await.0, 200);
    let (status, r) = call(api, "info", Some(KEY), "{}").await;
    assert_eq!((status, &r["error"]["code"]), (429, &json!("rate_limited")), "{r}");
    assert!(r["error"]["retry_after_ms"].as_u64().unwrap() > 0);
}

/// Embedded mode: `disconnect`, `unsubscribe` and `revoke` act on this
/// node's connections (revocations in memory: the answer says so).
#[tokio::test]
async fn disconnect_unsubscribe_and_revoke_in_embedded_mode() {
    let (node, api) = api_node(|_| {}).await;
    let mut a = node.client("alice").await;
    // Bob's connection holds a token issued after the coming revocation.
    let later = common::sign(&json!({"sub":"bob","iat":now() + 30,"exp":now() + 600}));
    let mut b = Client::open(&node.url()).await;
    assert!(b.connect(&later).await.get("ok").is_some());
    a.subscribe(&["general"]).await;
    let (status, _) = call(api, "unsubscribe", Some(KEY), r#"{"user":"alice","room":"general"}"#).await;
    assert_eq!(status, 200);
    let p = a.next_push().await;
    assert_eq!(
        (&p["op"], &p["room"], &p["error"]["code"]),
        (&json!("unsubscribed"), &json!("general"), &json!("forbidden"))
    );
    let (status, r) = call(api, "disconnect", Some(KEY), r#"{"user":"alice","code":4003}"#).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(a.closed().await, Ended::Close(4003));
    let (status, _) = call(api, "disconnect", Some(KEY), r#"{"user":"alice","code":3000}"#).await;
    assert_eq!(status, 400);

    let old = common::sign(&json!({"sub":"bob","iat":now() - 10,"exp":now() + 600}));
    let mut b2 = Client::open(&node.url()).await;
    assert!(b2.connect(&old).await.get("ok").is_some());
    let (_, r) = call(api, "revoke", Some(KEY), r#"{"user":"bob"}"#).await;
    assert_eq!(r["ok"]["durable"], false, "{r}");
    // The live connection with an older token is closed, the newer one stays.
    assert_eq!(b2.closed().await, Ended::Close(4001));
    let r = b.request(json!({"op":"ping"})).await;
    assert!(r.get("ok").is_some(), "{r}");
    let mut again = Client::open(&node.url()).await;
    let r = again.connect(&old).await;
    assert_eq!(r["error"]["code"], "unauthorized", "{r}");
    let fresh = common::sign(&json!({"sub":"bob","iat":now() + 1,"exp":now() + 600}));
    let mut ok = Client::open(&node.url()).await;
    assert!(ok.connect(&fresh).await.get("ok").is_some());
}

/// The binary: a refused key is logged with the peer and the method, never
/// the key itself; `--api-listen` without `--api-key` does not start.
#[test]
fn a_refused_key_is_logged_without_the_key() {
    let bin = env!("CARGO_BIN_EXE_gateway");
    let out = Command::new(bin)
        .args(["--jwt-secret", common::SECRET, "--api-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --api-key"));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--jwt-secret",
            common::SECRET,
        ])
        .args(["--api-listen", &api.to_string(), "--api-key", KEY])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wrong = "wrong-secret-key-987654321";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(api).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        call(api, "revoke", Some(wrong), r#"{"user":"alice"}"#).await.0
    });
    assert_eq!(status, 401);
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
            if lines.last().unwrap().contains("refused") {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let refused: Vec<&String> = lines.iter().filter(|l| l.contains("API request refused")).collect();
    assert_eq!(refused.len(), 1, "{lines:#?}");
    assert!(
        refused[0].contains("revoke") && refused[0].contains("127.0.0.1"),
        "{}",
        refused[0]
    );
    assert!(
        lines.iter().all(|l| !l.contains(wrong) && !l.contains(KEY)),
        "{lines:#?}"
    );
}
