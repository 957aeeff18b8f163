//! Subscribers that resume with `since` and publishers that retry with
//! keys, each recording what it saw for the checker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A `recovered:false` answer: the client resumed at `since` and the server
/// could not supply every message up to `offset`.
#[derive(Debug, Clone)]
pub struct NotRecovered {
    pub room: String,
    pub since: u64,
    pub offset: u64,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct SubRecord {
    pub rooms: Vec<String>,
    /// Offset of the first successful subscription of each room: every
    /// message after it is owed to this client.
    pub start: HashMap<String, u64>,
    /// `(offset, key)` of every `message` push, per room, in arrival order.
    pub delivered: HashMap<String, Vec<(u64, String)>>,
    /// Highest offset seen per room (what `since` resumes from).
    pub cursor: HashMap<String, u64>,
    pub not_recovered: Vec<NotRecovered>,
    /// `(offset, key)` loaded with `history` after a `recovered:false`, as
    /// a client does, per room.
    pub filled: HashMap<String, Vec<(u64, String)>>,
    /// Gaps still being reloaded: (room, since, offset, next `before`);
    /// carried over to the next session when a connection ends mid-way.
    pub fills: Vec<(String, u64, u64, u64)>,
    pub sessions: u64,
    /// Subscribe entries refused (e.g. `unavailable`), retried.
    pub sub_errors: u64,
    /// Pushes the protocol does not expect here (`unsubscribed`, unknown room).
    pub anomalies: Vec<String>,
}

/// Everything a run shares with its tasks.
pub struct Shared {
    pub urls: Vec<String>,
    /// Subscribers end when this turns true.
    pub stop: watch::Receiver<bool>,
    /// Publishers end (after their current key) when this turns true.
    pub stop_publishing: watch::Receiver<bool>,
    /// The faults are over: sleepers stay connected from now on.
    pub calm: watch::Receiver<bool>,
    /// Subscribers that go away on purpose for a while (tests `recovered:false`).
    pub sleepers: usize,
}

fn token(sub: &str) -> String {
    gateway::auth::mint_hs256(
        super::procs::SECRET.as_bytes(),
        sub,
        vec!["*".into()],
        vec!["*".into()],
        Some(7200),
    )
    .unwrap()
}

async fn open(url: &str, sub: &str) -> Option<Ws> {
    let (mut ws, _) = timeout(Duration::from_secs(3), tokio_tungstenite::connect_async(url))
        .await
        .ok()?
        .ok()?;
    let cmd = json!({"id": 1, "op": "connect", "token": token(sub)});
    ws.send(Message::text(cmd.to_string())).await.ok()?;
    loop {
        let f = timeout(Duration::from_secs(5), ws.next()).await.ok()??.ok()?;
        if let Message::Text(t) = f {
            let v: Value = serde_json::from_str(&t).ok()?;
            if v["id"] == 1 {
                return v.get("ok").is_some().then_some(ws);
            }
        }
    }
}

/// A subscriber: stays subscribed to `rooms` for the whole run, through
/// every reconnect, resuming each room from the last offset it saw.
pub async fn subscriber(i: usize, rooms: Vec<String>, shared: Arc<Shared>, rec: Arc<Mutex<SubRecord>>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    rec.lock().unwrap().rooms = rooms.clone();
    let sub = format!("s{i}");
    let mut g = i % shared.urls.len();
    let mut stop = shared.stop.clone();
    let mut calm = shared.calm.clone();
    while !*stop.borrow() {
        let sleeper = i < shared.sleepers && !*calm.borrow();
        let session_len = sleeper.then(|| Duration::from_millis(rng.random_range(5_000..15_000)));
        if let Some(ws) = open(&shared.urls[g], &sub).await {
            rec.lock().unwrap().sessions += 1;
            session(ws, &rooms, &rec, &mut stop, session_len).await;
        }
        if *stop.borrow() {
            return;
        }
        let pause = if sleeper {
            rng.random_range(20_000..40_000)
        } else {
            rng.random_range(100..1_000)
        };
        tokio::select! {
            _ = sleep(Duration::from_millis(pause)) => {}
            _ = stop.changed() => {}
            _ = calm.changed() => {}
        }
        g = rng.random_range(0..shared.urls.len());
    }
}

fn subscribe_cmd(id: u32, rooms: &[String], rec: &SubRecord) -> Value {
    let entries: Vec<Value> = rooms
        .iter()
        .map(|r| match rec.cursor.get(r) {
            Some(c) => json!({"room": r, "since": c}),
            None => json!({"room": r}),
        })
        .collect();
    json!({"id": id, "op": "subscribe", "rooms": entries})
}

fn history_cmd(id: u32, room: &str, before: u64) -> String {
    json!({"id": id, "op": "history", "room": room, "before": before, "limit": 200}).to_string()
}

/// One connection: subscribe, then read until it fails, stalls for 8 s, the
/// run stops, or `len` (sleepers) is up.
async fn session(
    mut ws: Ws,
    rooms: &[String],
    rec: &Mutex<SubRecord>,
    stop: &mut watch::Receiver<bool>,
    len: Option<Duration>,
) {
    let end = len.map(|l| Instant::now() + l);
    let mut next_id = 2u32;
    // id -> (rooms, their `since`) of subscribes awaiting a reply.
    let mut pending: HashMap<u32, Vec<(String, Option<u64>)>> = HashMap::new();
    // id -> the gap a `history` request fills: (room, since, offset).
    let mut history: HashMap<u32, (String, u64, u64)> = HashMap::new();
    let mut to_send: Vec<String> = Vec::new();
    {
        let r = rec.lock().unwrap();
        for (room, since, upto, before) in &r.fills {
            to_send.push(history_cmd(next_id, room, *before));
            history.insert(next_id, (room.clone(), *since, *upto));
            next_id += 1;
        }
    }
    let mut retry: Vec<String> = rooms.to_vec();
    let mut retry_at = Instant::now();
    let mut ping = tokio::time::interval(Duration::from_secs(2));
    let mut last_frame = Instant::now();
    loop {
        if !retry.is_empty() && Instant::now() >= retry_at {
            let cmd = {
                let r = rec.lock().unwrap();
                let c = subscribe_cmd(next_id, &retry, &r);
                pending.insert(
                    next_id,
                    retry.iter().map(|x| (x.clone(), r.cursor.get(x).copied())).collect(),
                );
                c
            };
            next_id += 1;
            retry.clear();
            if ws.send(Message::text(cmd.to_string())).await.is_err() {
                return;
            }
        }
        for cmd in to_send.drain(..) {
            if ws.send(Message::text(cmd)).await.is_err() {
                return;
            }
        }
        if end.is_some_and(|e| Instant::now() >= e) || last_frame.elapsed() > Duration::from_secs(8) {
            return;
        }
        let frame = tokio::select! {
            f = ws.next() => f,
            _ = ping.tick() => {
                if ws.send(Message::text(r#"{"op":"ping"}"#)).await.is_err() { return; }
                continue;
            }
            _ = stop.changed() => return,
        };
        let Some(Ok(frame)) = frame else { return };
        last_frame = Instant::now();
        let text = match frame {
            Message::Text(t) => t,
            Message::Close(_) => return,
            _ => continue,
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            rec.lock().unwrap().anomalies.push(format!("not JSON: {text}"));
            continue;
        };
        let mut r = rec.lock().unwrap();
        if let Some(id) = v["id"].as_u64() {
            if let Some((room, since, upto)) = history.remove(&(id as u32)) {
                // A page of the gap, oldest first; ask for the page before it
                // until the gap is covered.
                let msgs = v["ok"]["messages"].as_array().cloned().unwrap_or_default();
                let fill = r.filled.entry(room.clone()).or_default();
                for m in &msgs {
                    let o = m["offset"].as_u64().unwrap_or(0);
                    if o > since && o <= upto {
                        fill.push((o, m["data"]["k"].as_str().unwrap_or("").to_string()));
                    }
                }
                let oldest = msgs.first().and_then(|m| m["offset"].as_u64()).unwrap_or(0);
                let at = r.fills.iter().position(|f| f.0 == room && f.1 == since && f.2 == upto);
                if v.get("error").is_some() {
                    // Retried with the next session (e.g. unavailable).
                    continue;
                }
                if v["ok"]["more"] == true && oldest > since + 1 {
                    to_send.push(history_cmd(next_id, &room, oldest));
                    if let Some(i) = at {
                        r.fills[i].3 = oldest;
                    }
                    history.insert(next_id, (room, since, upto));
                    next_id += 1;
                } else if let Some(i) = at {
                    r.fills.remove(i);
                }
                continue;
            }
            let Some(asked) = pending.remove(&(id as u32)) else {
                continue;
            };
            let Some(results) = v["ok"]["rooms"].as_array() else {
                // The whole command failed (e.g. unavailable): ask again.
                r.sub_errors += 1;
                retry.extend(asked.into_iter().map(|(room, _)| room));
                retry_at = Instant::now() + Duration::from_millis(500);
                continue;
            };
            for (res, (room, since)) in results.iter().zip(asked) {
                if res.get("error").is_some() {
                    r.sub_errors += 1;
                    retry.push(room);
                    retry_at = Instant::now() + Duration::from_millis(500);
                    continue;
                }
                let offset = res["offset"].as_u64().unwrap_or(0);
                if !r.start.contains_key(&room) {
                    r.start.insert(room.clone(), offset);
                    let c = r.cursor.entry(room.clone()).or_insert(0);
                    *c = (*c).max(offset);
                } else if res["recovered"] == false {
                    r.not_recovered.push(NotRecovered {
                        room: room.clone(),
                        since: since.unwrap_or(0),
                        offset,
                    });
                    // Reload what is still stored of the gap, as a client does.
                    to_send.push(history_cmd(next_id, &room, offset + 1));
                    r.fills.push((room.clone(), since.unwrap_or(0), offset, offset + 1));
                    history.insert(next_id, (room.clone(), since.unwrap_or(0), offset));
                    next_id += 1;
                    let c = r.cursor.entry(room).or_insert(0);
                    *c = (*c).max(offset);
                }
            }
            continue;
        }
        match v["op"].as_str() {
            Some("message") => {
                let room = v["room"].as_str().unwrap_or("").to_string();
                let offset = v["offset"].as_u64().unwrap_or(0);
                let key = v["data"]["k"].as_str().unwrap_or("").to_string();
                if !r.rooms.contains(&room) {
                    r.anomalies.push(format!("message for a room not subscribed: {v}"));
                    continue;
                }
                r.delivered.entry(room.clone()).or_default().push((offset, key));
                let c = r.cursor.entry(room).or_insert(0);
                *c = (*c).max(offset);
            }
            Some("pong") => {}
            _ => r.anomalies.push(format!("unexpected push: {v}")),
        }
    }
}

/// What the publishers saw.
#[derive(Debug, Default)]
pub struct PubRecord {
    /// key -> (room, offset) of every acknowledged publish.
    pub acks: HashMap<String, (String, u64)>,
    /// A key acknowledged again with another offset: (key, first, second).
    pub conflicts: Vec<(String, u64, u64)>,
    pub attempts: u64,
    /// Attempts after an error, a timeout or a lost connection.
    pub retries: u64,
    /// Publishes of an already acknowledged key (deliberate retries).
    pub resends: u64,
    /// Keys never acknowledged within the retry bound.
    pub gave_up: Vec<String>,
    pub errors: HashMap<String, u64>,
}

/// A publisher: `rate` keyed publishes per second to random rooms, each
/// retried (any gateway) until acknowledged; 5% are sent again after their
/// acknowledgement, which must answer the same offset.
pub async fn publisher(
    p: usize,
    rooms: Vec<String>,
    rate: f64,
    shared: Arc<Shared>,
    rec: Arc<Mutex<PubRecord>>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let sub = format!("pub{p}");
    let mut g = p % shared.urls.len();
    let mut ws: Option<Ws> = None;
    let mut next_id = 2u32;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut n = 0u64;
    while !*shared.stop_publishing.borrow() {
        let key = format!("p{p}-{n}");
        n += 1;
        let room = rooms[rng.random_range(0..rooms.len())].clone();
        let sends = if rng.random_range(0..100) < 5 { 2 } else { 1 };
        for s in 0..sends {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut first = true;
            let acked = loop {
                if Instant::now() > deadline {
                    break None;
                }
                {
                    let mut r = rec.lock().unwrap();
                    r.attempts += 1;
                    if !first {
                        r.retries += 1;
                    }
                    if s > 0 && first {
                        r.resends += 1;
                    }
                }
                first = false;
                if ws.is_none() {
                    ws = open(&shared.urls[g], &sub).await;
                    if ws.is_none() {
                        g = rng.random_range(0..shared.urls.len());
                        sleep(Duration::from_millis(rng.random_range(100..500))).await;
                        continue;
                    }
                }
                let id = next_id;
                next_id += 1;
                let cmd = json!({"id": id, "op": "publish", "room": room, "key": key, "data": {"k": key}});
                match request(ws.as_mut().unwrap(), id, &cmd).await {
                    Some(v) if v["ok"]["offset"].is_u64() => break v["ok"]["offset"].as_u64(),
                    Some(v) => {
                        let code = v["error"]["code"].as_str().unwrap_or("?").to_string();
                        *rec.lock().unwrap().errors.entry(code).or_default() += 1;
                        let wait = v["error"]["retry_after_ms"]
                            .as_u64()
                            .unwrap_or(rng.random_range(200..600));
                        sleep(Duration::from_millis(wait)).await;
                    }
                    None => {
                        *rec.lock().unwrap().errors.entry("no reply".into()).or_default() += 1;
                        ws = None;
                        g = rng.random_range(0..shared.urls.len());
                    }
                }
            };
            let mut r = rec.lock().unwrap();
            match acked {
                Some(offset) => match r.acks.get(&key) {
                    Some((_, first)) if *first != offset => {
                        let first = *first;
                        r.conflicts.push((key.clone(), first, offset));
                    }
                    Some(_) => {}
                    None => {
                        r.acks.insert(key.clone(), (room.clone(), offset));
                    }
                },
                None => r.gave_up.push(key.clone()),
            }
        }
        sleep(interval.mul_f64(rng.random_range(0.5..1.5))).await;
    }
}

/// Sends `cmd` and waits (8 s) for the reply with `id`; `None` if the
/// connection failed or stalled.
async fn request(ws: &mut Ws, id: u32, cmd: &Value) -> Option<Value> {
    ws.send(Message::text(cmd.to_string())).await.ok()?;
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let f = timeout(deadline.saturating_duration_since(Instant::now()), ws.next())
            .await
            .ok()??
            .ok()?;
        match f {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).ok()?;
                if v["id"] == id {
                    return Some(v);
                }
            }
            Message::Close(_) => return None,
            _ => {}
        }
    }
}
