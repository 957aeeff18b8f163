//! A rolling restart loses nothing and causes no reconnect storm: 3 gateway
//! processes (the real binary) behind one 3-node NATS JetStream cluster,
//! 300 clients in 6 rooms that resume with `since` when closed with 1012,
//! one publisher per room sending keyed publishes steadily (retried with the
//! same key until acknowledged). Each gateway in turn is taken out of the
//! client's list (as a load balancer would), sent SIGTERM (drain: 1012s
//! spread over 2 s) and replaced by a fresh process.
//!
//! Checked: every acknowledged message reaches every member exactly once and
//! in offset order across the moves; every member's messages are exactly the
//! room's acknowledged offsets after it joined; successful (re)connects per
//! second never exceed the admission budget of the gateways that take them.
//! Prints the counts.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::nats::Cluster;
use common::process::GatewayProcess;
use futures_util::{SinkExt, StreamExt};
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

const ROOMS: usize = 6;
const MEMBERS_PER_ROOM: usize = 50;
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// Per gateway: `--connects-per-sec` and `--connects-burst`.
const CONNECTS_PER_SEC: u32 = 100;
const DRAIN_SPREAD_MS: u64 = 2_000;

/// A gateway of the cluster, named `name`.
fn start_gateway(nats: &str, name: &str) -> GatewayProcess {
    let budget = CONNECTS_PER_SEC.to_string();
    let spread = DRAIN_SPREAD_MS.to_string();
    GatewayProcess::start(&[
        "--log",
        "info",
        "--jwt-secret",
        common::SECRET,
        "--node-id",
        name,
        "--nats",
        nats,
        "--nats-replicas",
        "3",
        "--nats-partitions",
        "4",
        "--drain-spread-ms",
        &spread,
        "--drain-timeout-ms",
        "6000",
        "--connects-per-sec",
        &budget,
        "--connects-burst",
        &budget,
        "--publish-per-sec",
        "100",
        "--user-publish-per-sec",
        "1000",
        "--room-publish-per-sec",
        "1000",
    ])
}

#[derive(Default)]
struct Stats {
    connects: Mutex<Vec<Instant>>,
    closes_1012: AtomicU64,
    refused: AtomicU64,
    not_recovered: AtomicU64,
}

type Live = Arc<RwLock<Vec<String>>>;

fn pick(live: &Live) -> String {
    let l = live.read();
    l[rand::random_range(0..l.len())].clone()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens and authenticates a connection to a live gateway, retrying refusals
/// after `Retry-After` with jitter (as a client should).
async fn open(live: &Live, sub: &str, stats: &Stats) -> Ws {
    let token = common::token(sub, &["*"], &["*"]);
    loop {
        match tokio_tungstenite::connect_async(pick(live)).await {
            Ok((mut ws, _)) => {
                ws.send(Message::text(
                    json!({"id": 1, "op": "connect", "token": token}).to_string(),
                ))
                .await
                .ok();
                if let Some(r) = reply(&mut ws, 1).await
                    && r.get("ok").is_some()
                {
                    stats.connects.lock().push(Instant::now());
                    return ws;
                }
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                let after = common::refused(&resp).retry_after.unwrap_or(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(after * rand::random_range(0.5..1.5))).await;
                continue;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(50..150))).await;
    }
}

/// The reply with `id`, skipping pushes; `None` if the connection ends.
async fn reply(ws: &mut Ws, id: u64) -> Option<Value> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).ok()?;
            if v["id"].as_u64() == Some(id) {
                return Some(v);
            }
        } else if let Message::Close(_) = m {
            return None;
        }
    }
}

/// A member: subscribes (with `since` after the first time), records every
/// message's offset, and moves on 1012 until it has seen `done`'s offset.
async fn member(
    live: Live,
    room: String,
    sub: String,
    stats: Arc<Stats>,
    joined: Arc<AtomicU64>,
    mut done: watch::Receiver<Option<HashMap<String, u64>>>,
) -> Vec<u64> {
    let mut got = Vec::new();
    let mut last: Option<u64> = None;
    loop {
        let mut ws = open(&live, &sub, &stats).await;
        let mut entry = json!({"room": room});
        if let Some(l) = last {
            entry["since"] = json!(l);
        }
        ws.send(Message::text(
            json!({"id": 2, "op": "subscribe", "rooms": [entry]}).to_string(),
        ))
        .await
        .ok();
        // Pushes that arrive before the reply are kept in order.
        let mut early = Vec::new();
        let r = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["id"].as_u64() == Some(2) {
                        break Some(v);
                    } else if v.get("id").is_none() {
                        early.push(v);
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                _ => {}
            }
        };
        let Some(r) = r else { continue };
        let e = &r["ok"]["rooms"][0];
        assert!(e.get("error").is_none(), "{r}");
        if e["recovered"] == false {
            stats.not_recovered.fetch_add(1, Ordering::Relaxed);
        }
        if last.is_none() {
            let at = e["offset"].as_u64().unwrap();
            last = Some(at);
            joined.store(at, Ordering::Relaxed);
        }
        let on_push = |v: &Value, got: &mut Vec<u64>, last: &mut Option<u64>| {
            if v["room"] == room.as_str()
                && let Some(o) = v["offset"].as_u64()
            {
                got.push(o);
                *last = Some(o);
            }
        };
        for v in &early {
            on_push(v, &mut got, &mut last);
        }
        loop {
            let finished = done.borrow().as_ref().map(|d| d[&room]);
            if let Some(f) = finished
                && last.unwrap_or(0) >= f
            {
                let _ = ws.close(None).await;
                return got;
            }
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        on_push(&v, &mut got, &mut last);
                    }
                    Some(Ok(Message::Close(f))) => {
                        if f.is_some_and(|f| u16::from(f.code) == 1012) {
                            stats.closes_1012.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    None | Some(Err(_)) => break,
                    _ => {}
                },
                _ = done.changed() => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..200))).await;
    }
}

/// A publisher: keyed publishes every [`PUBLISH_EVERY`], each retried with
/// its key (on another gateway if need be) until acknowledged; returns the
/// acknowledged offsets.
async fn publisher(live: Live, room: String, stats: Arc<Stats>, stop: watch::Receiver<bool>) -> BTreeSet<u64> {
    let sub = format!("pub-{room}");
    let mut acked = BTreeSet::new();
    let mut ws = open(&live, &sub, &stats).await;
    let mut n = 0u64;
    let mut id = 10u64;
    while !*stop.borrow() {
        let key = format!("{room}-{n}");
        loop {
            id += 1;
            let cmd = json!({"id": id, "op": "publish", "room": room, "data": n, "key": key});
            if ws.send(Message::text(cmd.to_string())).await.is_ok()
                && let Some(r) = reply(&mut ws, id).await
            {
                if let Some(o) = r["ok"]["offset"].as_u64() {
                    acked.insert(o);
                    break;
                }
                assert_eq!(r["error"]["code"], "unavailable", "{r}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            ws = open(&live, &sub, &stats).await;
        }
        n += 1;
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_gateways_loses_nothing_and_stays_within_the_admission_budget() {
    let cluster = Cluster::start(3).await;
    let nats = cluster.urls();
    let mut gateways: Vec<GatewayProcess> = (0..3).map(|i| start_gateway(&nats, &format!("gw-{i}"))).collect();
    let live: Live = Arc::new(RwLock::new(gateways.iter().map(GatewayProcess::ws_url).collect()));
    let stats = Arc::new(Stats::default());
    let (done_tx, done_rx) = watch::channel(None);
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("roll-{r}")).collect();

    let mut members = Vec::new();
    for room in &rooms {
        for m in 0..MEMBERS_PER_ROOM {
            let joined = Arc::new(AtomicU64::new(u64::MAX));
            let task = tokio::spawn(member(
                live.clone(),
                room.clone(),
                format!("{room}-m{m}"),
                stats.clone(),
                joined.clone(),
                done_rx.clone(),
            ));
            members.push((room.clone(), joined, task));
        }
    }
    // Everyone joined before the first publish.
    let t0 = Instant::now();
    while members.iter().any(|(_, j, _)| j.load(Ordering::Relaxed) == u64::MAX) {
        assert!(t0.elapsed() < Duration::from_secs(60), "members did not join");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let initial_connects = stats.connects.lock().len();
    let (stop_tx, stop_rx) = watch::channel(false);
    let publishers: Vec<_> = rooms
        .iter()
        .map(|r| {
            (
                r.clone(),
                tokio::spawn(publisher(live.clone(), r.clone(), stats.clone(), stop_rx.clone())),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Drain and replace each gateway in turn.
    let restart_started = Instant::now();
    for (i, gateway) in gateways.iter_mut().enumerate() {
        let url = gateway.ws_url();
        live.write().retain(|u| *u != url);
        gateway.signal("TERM");
        let t = Instant::now();
        let status = gateway
            .exited(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("gw-{i} did not finish its drain"));
        assert!(status.success(), "gw-{i} exited {status}");
        println!("gw-{i} drained in {:.1} s", t.elapsed().as_secs_f64());
        *gateway = start_gateway(&nats, &format!("gw-{i}b"));
        live.write().push(gateway.ws_url());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let restart_secs = restart_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send(true).unwrap();
    let mut acked: HashMap<String, BTreeSet<u64>> = HashMap::new();
    for (room, p) in publishers {
        acked.insert(
            room,
            tokio::time::timeout(Duration::from_secs(30), p).await.unwrap().unwrap(),
        );
    }
    let last: HashMap<String, u64> = acked.iter().map(|(r, a)| (r.clone(), *a.last().unwrap())).collect();
    done_tx.send(Some(last)).unwrap();

    let mut delivered = 0usize;
    let mut failures = Vec::new();
    for (room, joined, task) in members {
        let got = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("member caught up")
            .unwrap();
        let joined = joined.load(Ordering::Relaxed);
        let want: Vec<u64> = acked[&room].iter().copied().filter(|o| *o > joined).collect();
        delivered += got.len();
        if got != want {
            let missing = want.iter().filter(|o| !got.contains(o)).count();
            let dup_or_order = got.windows(2).filter(|w| w[0] >= w[1]).count();
            failures.push(format!(
                "{room}: {missing} missing, {dup_or_order} duplicate/out of order"
            ));
        }
    }
    // Reconnects per second: successful connects after the initial joins,
    // in 1-second windows, against the budget of the two gateways that take
    // a draining gateway's clients.
    let connects = stats.connects.lock().clone();
    let moves = &connects[initial_connects..];
    let max_per_sec = moves
        .iter()
        .map(|t| {
            moves
                .iter()
                .filter(|u| **u >= *t && u.duration_since(*t) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let budget = 2 * CONNECTS_PER_SEC as usize;
    let published: usize = acked.values().map(BTreeSet::len).sum();
    println!(
        "rolling restart of 3 gateways in {restart_secs:.1} s: {} members, {published} messages acknowledged, \
         {delivered} deliveries checked, {} closes 1012, {} reconnects (max {max_per_sec}/s, budget {budget}/s), \
         {} refused, {} subscribes not recovered, {} members with loss/duplicates",
        ROOMS * MEMBERS_PER_ROOM,
        stats.closes_1012.load(Ordering::Relaxed),
        moves.len(),
        stats.refused.load(Ordering::Relaxed),
        stats.not_recovered.load(Ordering::Relaxed),
        failures.len(),
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(stats.not_recovered.load(Ordering::Relaxed), 0);
    assert!(
        stats.closes_1012.load(Ordering::Relaxed) >= (ROOMS * MEMBERS_PER_ROOM) as u64,
        "every member moved at least once"
    );
    assert!(max_per_sec <= budget, "{max_per_sec} reconnects/s > {budget}");
}
