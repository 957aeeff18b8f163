//! Presence (`presence` op, server API `room`): cluster-wide counts and user
//! lists over a real 3-node NATS cluster, with in-process gateways and one
//! gateway process that is killed with SIGKILL.

mod common;

use std::time::{Duration, Instant};

use common::api::{KEY, call};
use common::nats::Cluster;
use common::process::GatewayProcess;
use common::{Client, TestNode, within};
use serde_json::{Value, json};

async fn gateway(cluster: &Cluster, name: &str, tune: impl FnOnce(&mut gateway::config::Opts)) -> TestNode {
    let urls = cluster.urls();
    let name = name.to_string();
    TestNode::with(move |o| {
        o.nats = Some(urls);
        o.nats_replicas = Some(3);
        o.node_id = Some(name);
        o.nats_partitions = Some(2);
        o.no_rate_limits = Some(true);
        o.presence_interval_ms = Some(200);
        tune(o);
    })
    .await
}

/// A gateway process of the cluster (killed on drop: SIGKILL, no goodbye).
fn spawn_gateway(cluster: &Cluster, name: &str) -> GatewayProcess {
    let urls = cluster.urls();
    GatewayProcess::start(&[
        "--jwt-secret",
        common::SECRET,
        "--nats",
        &urls,
        "--nats-replicas",
        "3",
        "--nats-partitions",
        "2",
        "--node-id",
        name,
        "--presence-interval-ms",
        "200",
        "--no-rate-limits",
    ])
}

async fn member(url: &str, user: &str, room: &str) -> Client {
    let mut c = Client::open(url).await;
    assert!(
        c.connect(&common::token(user, &["*"], &["*"]))
            .await
            .get("ok")
            .is_some()
    );
    let r = c.subscribe(&[room]).await;
    assert!(r["ok"]["rooms"][0]["offset"].is_u64(), "{r}");
    c
}

async fn presence(c: &mut Client, room: &str) -> Value {
    let r = c.request(json!({"op":"presence","room":room})).await;
    r["ok"].clone()
}

/// Polls `presence` on `c` until `check` holds; returns the answer and how
/// long it took.
async fn until(c: &mut Client, room: &str, check: impl Fn(&Value) -> bool) -> (Value, Duration) {
    let started = Instant::now();
    within(async {
        loop {
            let p = presence(c, room).await;
            if check(&p) {
                return (p, started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

fn users(p: &Value) -> Vec<&str> {
    p["users"]
        .as_array()
        .map(|u| u.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Must show: counts converge after joins, leaves and a killed gateway
/// (its members disappear within 3 summary intervals after its last one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_converges_after_joins_leaves_and_a_killed_gateway() {
    let cluster = Cluster::start(3).await;
    let a = gateway(&cluster, "gw-a", |_| {}).await;
    let b = gateway(&cluster, "gw-b", |o| {
        o.api_listen = Some("127.0.0.1:0".parse().unwrap());
        o.api_key = Some(vec![KEY.into()]);
    })
    .await;
    let c = spawn_gateway(&cluster, "gw-c");
    let _u1 = member(&a.url(), "u1", "lobby").await;
    let mut u2 = member(&a.url(), "u2", "lobby").await;
    let _u3 = member(&b.url(), "u3", "lobby").await;
    let _u4 = member(&c.ws_url(), "u4", "lobby").await;
    let _u5 = member(&c.ws_url(), "u5", "lobby").await;
    let _u5_again = member(&c.ws_url(), "u5", "lobby").await;
    let mut asker = a.client("asker").await;
    let (p, took) = until(&mut asker, "lobby", |p| p["count"] == 6).await;
    assert_eq!(users(&p), ["u1", "u2", "u3", "u4", "u5"], "{p}");
    assert!(p["age_ms"].is_u64());
    eprintln!("joins visible after {took:?}");
    // The same view through the server API of another gateway.
    let api = b.running.api_addr.unwrap();
    let (_, r) = call(api, "room", Some(KEY), r#"{"room":"lobby"}"#).await;
    let (_, r) = if r["ok"]["count"] == 6 {
        (200, r)
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
        call(api, "room", Some(KEY), r#"{"room":"lobby"}"#).await
    };
    assert_eq!(
        (r["ok"]["count"].clone(), r["ok"]["users"].as_array().map(Vec::len)),
        (json!(6), Some(5)),
        "{r}"
    );

    u2.request(json!({"op":"unsubscribe","rooms":["lobby"]})).await;
    let (p, _) = until(&mut asker, "lobby", |p| p["count"] == 5).await;
    assert_eq!(users(&p), ["u1", "u3", "u4", "u5"]);

    // A member that asked for presence pushes, on gateway B.
    let mut watcher = Client::open(&b.url()).await;
    watcher.connect(&common::token("watcher", &["*"], &["*"])).await;
    let r = watcher
        .request(json!({"op":"subscribe","rooms":[{"room":"lobby","presence":true}]}))
        .await;
    assert!(r["ok"]["rooms"][0]["offset"].is_u64(), "{r}");
    until(&mut asker, "lobby", |p| p["count"] == 6).await;
    // The watch's baseline (who is there) comes from the other gateways'
    // lists, gathered when the watch begins: let it arrive before the kill.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let killed = Instant::now();
    drop(c); // SIGKILL: no goodbye, its summaries just stop.
    let (p, _) = until(&mut asker, "lobby", |p| p["count"] == 3).await;
    assert_eq!(users(&p), ["u1", "u3", "watcher"]);
    let pushes = within(presence_pushes(&mut watcher, |_, l| l.len() >= 2)).await;
    let last = pushes.last().unwrap();
    assert_eq!(
        (&last["leave"], &last["count"]),
        (&json!(["u4", "u5"]), &json!(3)),
        "{pushes:?}"
    );
    eprintln!(
        "a killed gateway's members left the count {:?} after the kill (bound: 3 x 200 ms after its last summary)",
        killed.elapsed()
    );
    // A room the token does not grant is forbidden.
    let mut limited = Client::open(&a.url()).await;
    limited.connect(&common::token("limited", &["public-*"], &[])).await;
    let r = limited.request(json!({"op":"presence","room":"lobby"})).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
}

/// Must show: a 5,000-member room answers the count but no list (the
/// default bound is 1,000 members).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_5000_member_room_answers_the_count_without_the_list() {
    let cluster = Cluster::start(3).await;
    let a = gateway(&cluster, "gw-a", |_| {}).await;
    let b = gateway(&cluster, "gw-b", |_| {}).await;
    let mut members = Vec::with_capacity(5_000);
    for batch in 0..50 {
        let url = if batch % 2 == 0 { a.url() } else { b.url() };
        let joins = (0..100).map(|i| {
            let url = url.clone();
            async move { member(&url, &format!("user-{batch}-{i}"), "stadium").await }
        });
        members.extend(futures_util::future::join_all(joins).await);
    }
    let _small = member(&b.url(), "solo", "small").await;
    let mut asker = a.client("asker").await;
    let (p, _) = until(&mut asker, "stadium", |p| p["count"] == 5_000).await;
    assert!(p.get("users").is_none(), "no list for 5,000 members: {p}");
    let (p, _) = until(&mut asker, "small", |p| p["count"] == 1).await;
    assert_eq!(users(&p), ["solo"]);
}

/// `--presence-list-max`: rooms over it have no list.
#[tokio::test]
async fn presence_list_max_bounds_the_rooms_that_have_a_list() {
    let node = TestNode::with(|o| o.presence_list_max = Some(2)).await;
    let _m: Vec<Client> = futures_util::future::join_all(["a", "b"].map(|u| member_on(&node, u))).await;
    let mut asker = node.client("asker").await;
    let p = presence(&mut asker, "r").await;
    assert_eq!((p["count"].clone(), users(&p)), (json!(2), vec!["a", "b"]));
    let _c = member_on(&node, "c").await;
    let p = presence(&mut asker, "r").await;
    assert_eq!(p["count"], 3);
    assert!(p.get("users").is_none(), "{p}");
}

async fn member_on(node: &TestNode, user: &str) -> Client {
    member(&node.url(), user, "r").await
}

/// `--presence-interval-ms`: a gateway's joins reach the others with its
/// next summary; with an hour-long interval they do not come within a second
/// (the start-up summary aside), with the 200 ms one they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_interval_ms_sets_when_other_gateways_see_a_join() {
    let cluster = Cluster::start(3).await;
    let a = gateway(&cluster, "gw-a", |o| o.presence_interval_ms = Some(3_600_000)).await;
    let b = gateway(&cluster, "gw-b", |o| o.presence_interval_ms = Some(3_600_000)).await;
    let mut asker = a.client("asker").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _m = member(&b.url(), "m", "quiet").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(presence(&mut asker, "quiet").await["count"], 0);
    let c = gateway(&cluster, "gw-c", |_| {}).await;
    let _n = member(&c.url(), "n", "quiet").await;
    let (p, _) = until(&mut asker, "quiet", |p| p["count"] == 1).await;
    assert_eq!(users(&p), ["n"]);
}

/// Reads `presence` pushes of `room` until `done` holds for the joins and
/// leaves seen so far; returns the pushes.
async fn presence_pushes(c: &mut Client, done: impl Fn(&[String], &[String]) -> bool) -> Vec<Value> {
    let (mut joins, mut leaves, mut pushes) = (Vec::new(), Vec::new(), Vec::new());
    while !done(&joins, &leaves) {
        let p = c.next_push().await;
        if p["op"] != "presence" {
            continue;
        }
        let names = |k: &str| -> Vec<String> {
            p[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        joins.extend(names("join"));
        leaves.extend(names("leave"));
        pushes.push(p);
    }
    pushes
}

/// Must show: join/leave pushes are coalesced under a burst of 1,000 joins
/// (at most one push per interval), each user reported once; a reconnect
/// storm within an interval is no push; `--presence-interval-ms` sets the
/// interval of the pushes in embedded mode too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_and_leave_pushes_are_coalesced_under_a_burst_of_1000_joins() {
    let node = TestNode::with(|o| {
        o.presence_interval_ms = Some(500);
        o.presence_list_max = Some(2_000);
        o.no_rate_limits = Some(true);
    })
    .await;
    let mut watcher = node.client("watcher").await;
    let r = watcher
        .request(json!({"op":"subscribe","rooms":[{"room":"party","presence":true}]}))
        .await;
    assert!(r["ok"]["rooms"][0]["offset"].is_u64(), "{r}");
    let started = Instant::now();
    let mut members = Vec::with_capacity(1_000);
    for batch in 0..10 {
        let joins = (0..100).map(|i| {
            let url = node.url();
            async move { member(&url, &format!("guest-{batch:02}-{i:02}"), "party").await }
        });
        members.extend(futures_util::future::join_all(joins).await);
    }
    let pushes = within(presence_pushes(&mut watcher, |j, _| j.len() >= 1_000)).await;
    let elapsed = started.elapsed();
    let mut joined: Vec<String> = pushes
        .iter()
        .flat_map(|p| {
            p["join"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
        })
        .collect();
    let n = joined.len();
    joined.sort();
    joined.dedup();
    assert_eq!((n, joined.len()), (1_000, 1_000), "each guest joined once");
    let intervals = elapsed.as_millis() / 500 + 2;
    assert!(
        pushes.len() as u128 <= intervals,
        "{} pushes in {elapsed:?}: at most one per 500 ms interval",
        pushes.len()
    );
    assert!(pushes.iter().all(|p| p["leave"].as_array().unwrap().is_empty()));
    eprintln!("1,000 joins in {elapsed:?} came as {} pushes", pushes.len());
    // 100 guests go: their leaves come coalesced too.
    let p = presence(&mut watcher, "party").await;
    assert_eq!((p["count"].clone(), users(&p).len()), (json!(1_001), 1_001));
    members.truncate(900);
    let pushes = within(presence_pushes(&mut watcher, |_, l| l.len() >= 100)).await;
    assert!(pushes.len() <= 3, "100 leaves in {} pushes", pushes.len());
    // A reconnect storm within an interval: no push at all.
    let storm: Vec<String> = (0..100).map(|i| format!("guest-00-{i:02}")).collect();
    members.drain(..100);
    // (guest-00-* are the first 100 members: each leaves and joins again.)
    let again = futures_util::future::join_all(storm.iter().map(|u| {
        let url = node.url();
        async move { member(&url, u, "party").await }
    }))
    .await;
    let quiet = watcher.push_within(Duration::from_millis(1_200)).await;
    assert!(
        quiet
            .as_ref()
            .is_none_or(|p| p["join"].as_array().unwrap().len() + p["leave"].as_array().unwrap().len() < 200),
        "a storm of 100 reconnects is not 200 events: {quiet:?}"
    );
    drop(again);
}

/// User lists travel only where they are needed: summaries carry counts
/// (users null) for rooms nobody watches, and a query gathers such a room's
/// list from the gateways holding members; a room watched on another
/// gateway gets this gateway's list in its summaries. (Before, every
/// changed room's whole list went into every summary: a login storm into
/// rooms of 200 sent tens of MB/s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn summaries_carry_lists_only_for_watched_rooms_and_queries_gather_the_rest() {
    let cluster = Cluster::start(3).await;
    let a = gateway(&cluster, "gw-a", |_| {}).await;
    let b = gateway(&cluster, "gw-b", |_| {}).await;
    let nats = async_nats::connect(cluster.servers[0].url()).await.unwrap();
    let mut summaries = nats.subscribe("gw.presence.gw-a").await.unwrap();
    nats.flush().await.unwrap();
    // A watcher on gateway B for "watched"; nobody watches "quiet".
    let mut watcher = b.client("watcher").await;
    let r = watcher
        .request(json!({"op":"subscribe","rooms":[{"room":"watched","presence":true}]}))
        .await;
    assert!(r["ok"].is_object(), "{r}");
    let url = a.url();
    let mut _members = Vec::new();
    for u in ["u1", "u2", "u3"] {
        _members.push(member(&url, u, "quiet").await);
        _members.push(member(&url, u, "watched").await);
    }
    // Read gateway A's summaries until both rooms were reported with 3.
    let (mut quiet, mut watched) = (None, None);
    within(async {
        while quiet.is_none() || watched.is_none() {
            use futures_util::StreamExt as _;
            let msg = summaries.next().await.unwrap();
            let s: Value = serde_json::from_slice(&msg.payload).unwrap();
            for e in s["rooms"].as_array().unwrap() {
                match (e[0].as_str(), e[1].as_u64()) {
                    (Some("quiet"), Some(3)) => quiet = Some(e[2].clone()),
                    (Some("watched"), Some(3)) if e[2].is_array() => watched = Some(e[2].clone()),
                    _ => {}
                }
            }
        }
    })
    .await;
    assert_eq!(quiet.unwrap(), Value::Null, "no list for a room nobody watches");
    assert_eq!(watched.unwrap(), json!(["u1", "u2", "u3"]));
    // The watcher on B gets A's joins as pushes.
    let pushes = within(presence_pushes(&mut watcher, |joins, _| {
        ["u1", "u2", "u3"].iter().all(|u| joins.iter().any(|j| j == u))
    }))
    .await;
    assert!(pushes.iter().all(|p| p["room"] == "watched"), "{pushes:?}");
    // B still answers the quiet room's list, gathered from A.
    let mut asker = b.client("asker").await;
    let (p, _) = until(&mut asker, "quiet", |p| p["count"] == 3).await;
    assert_eq!(users(&p), ["u1", "u2", "u3"], "{p}");
}

/// The gather's error path: a gateway whose count is in the view but that
/// does not answer the list request (here SIGSTOPped) leaves the answer
/// with the count and without `users`, after at most the gather's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_that_does_not_answer_the_list_request_leaves_the_answer_without_users() {
    let cluster = Cluster::start(3).await;
    // A 1 s interval on A: B stays in A's view for 3 s after its last summary.
    let a = gateway(&cluster, "gw-a", |o| o.presence_interval_ms = Some(1_000)).await;
    let b = spawn_gateway(&cluster, "gw-b");
    let _m = member(&b.ws_url(), "m", "quiet").await;
    let mut asker = a.client("asker").await;
    let (p, _) = until(&mut asker, "quiet", |p| p["count"] == 1).await;
    assert_eq!(users(&p), ["m"], "gathered from B while it answers");
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &b.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let p = presence(&mut asker, "quiet").await;
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &b.pid().to_string()])
        .status();
    assert_eq!(p["count"], 1, "{p}");
    assert!(p.get("users").is_none(), "no list without B's answer: {p}");
}
