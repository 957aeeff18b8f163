//! Chaos run: 3 NATS servers (JetStream, R3 streams, `sync_interval:
//! always`) and 3 gateway processes, each in its own network namespace;
//! a few hundred clients that resume with `since`; publishers with keys
//! and retries. For a while, at seeded random intervals: kill -9 and restart
//! a NATS server or a gateway, SIGSTOP/SIGCONT one, take a link down
//! (partition a NATS server from its peers, a gateway from NATS), throttle
//! a link with `tc tbf`, slow a gateway's NATS links with delay and stalls
//! through a proxy, cut them. Then everything heals and the checker
//! compares the streams with what publishers were told and what every
//! client received (see `check.rs`); it prints the counts.
//!
//! The test command runs it short (`CHAOS_SECS`, default 40 s of faults);
//! `scripts/chaos.sh` runs it long. `CHAOS_SEED` reproduces the schedule
//! of faults, rooms, clients and publishes (not the machine's timing).
//! Needs root (network namespaces) and `ip`/`tc` (iproute2).

mod check;
mod clients;
mod lagging;
mod net;
mod procs;
mod proxy;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use proto::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use clients::{PubRecord, Shared, SubRecord};
use net::Net;
use procs::{Proc, wait_ok};
use proxy::{Faults, Knobs};

/// The tests of this binary build network namespaces and links named after
/// the process: one at a time.
static NETWORKS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Run {
    net: Net,
    nats: Vec<Proc>,
    gateways: Vec<Proc>,
    knobs: Vec<Knobs>,
    began: Instant,
    crashes: Vec<String>,
    faults: std::collections::BTreeMap<&'static str, u32>,
}

impl Run {
    fn log(&self, what: &str) {
        eprintln!("chaos t={:6.1}s {what}", self.began.elapsed().as_secs_f64());
    }

    async fn nats_healthy(&self, i: usize, limit: Duration) -> bool {
        wait_ok(&format!("{}:8222", self.net.nats_ip(i)), "/healthz", limit).await
    }

    /// Finds processes that exited on their own (a crash) and restarts them.
    fn reap(&mut self) {
        for p in self.nats.iter_mut().chain(self.gateways.iter_mut()) {
            if let Some(status) = p.exited() {
                let msg = format!("{} exited on its own ({status}); log:\n{}", p.name, p.log_tail(30));
                eprintln!("chaos: {msg}");
                self.crashes.push(msg);
                p.kill();
                p.start();
            }
        }
    }

    /// One fault, held for its duration, then healed.
    async fn fault(&mut self, rng: &mut StdRng) {
        let held = Duration::from_millis(rng.random_range(1_000..5_000));
        let (n, g) = (self.nats.len(), self.gateways.len());
        let kind = rng.random_range(0..8);
        let i = rng.random_range(0..n);
        let j = rng.random_range(0..g);
        let name: &'static str = match kind {
            0 => {
                self.log(&format!("kill -9 nats n{i}, restart after {held:?}"));
                self.nats[i].kill();
                sleep(held).await;
                self.nats[i].start();
                if !self.nats_healthy(i, Duration::from_secs(30)).await {
                    self.log(&format!("nats n{i} not healthy 30 s after restart"));
                }
                "kill -9 nats"
            }
            1 => {
                let down = held / 2;
                self.log(&format!("kill -9 gateway gw{j}, restart after {down:?}"));
                self.gateways[j].kill();
                sleep(down).await;
                self.gateways[j].start();
                "kill -9 gateway"
            }
            2 => {
                let (p, label) = if rng.random_bool(0.5) {
                    (&mut self.nats[i], "SIGSTOP nats")
                } else {
                    (&mut self.gateways[j], "SIGSTOP gateway")
                };
                let pname = p.name.clone();
                p.signal(true);
                self.log(&format!("SIGSTOP {pname} for {held:?}"));
                sleep(held).await;
                let p = if label == "SIGSTOP nats" {
                    &mut self.nats[i]
                } else {
                    &mut self.gateways[j]
                };
                p.signal(false);
                label
            }
            3 => {
                self.log(&format!("partition nats n{i} (link down) for {held:?}"));
                self.net.link(&format!("n{i}"), false);
                sleep(held).await;
                self.net.link(&format!("n{i}"), true);
                "partition nats"
            }
            4 => {
                self.log(&format!("partition gateway gw{j} from NATS (link down) for {held:?}"));
                self.net.link(&format!("g{j}"), false);
                sleep(held).await;
                self.net.link(&format!("g{j}"), true);
                "partition gateway"
            }
            5 => {
                self.log(&format!("tc tbf 256kbit into nats n{i} for {held:?}"));
                self.net.throttle(&format!("n{i}"), Some("256kbit"));
                sleep(held).await;
                self.net.throttle(&format!("n{i}"), None);
                "throttle nats"
            }
            6 => {
                let f = Faults {
                    delay_ms: rng.random_range(20..200),
                    jitter_ms: rng.random_range(0..100),
                    loss_per_mille: rng.random_range(0..50),
                };
                self.log(&format!("gw{j} to NATS: {f:?} for {held:?}"));
                self.knobs[j].set(f);
                sleep(held).await;
                self.knobs[j].set(Faults::default());
                "delay+loss gateway-NATS"
            }
            _ => {
                self.log(&format!("gw{j} NATS connections cut"));
                self.knobs[j].reset();
                "cut gateway-NATS"
            }
        };
        *self.faults.entry(name).or_default() += 1;
        self.reap();
    }

    /// Undoes every fault that could still be in effect.
    async fn heal(&mut self) {
        for i in 0..self.nats.len() {
            self.net.link(&format!("n{i}"), true);
            self.net.throttle(&format!("n{i}"), None);
        }
        for j in 0..self.gateways.len() {
            self.net.link(&format!("g{j}"), true);
            self.knobs[j].set(Faults::default());
        }
        for p in self.nats.iter_mut().chain(self.gateways.iter_mut()) {
            p.signal(false);
            if !p.is_running() {
                p.start();
            }
        }
        self.reap();
        for i in 0..self.nats.len() {
            assert!(
                self.nats_healthy(i, Duration::from_secs(60)).await,
                "nats n{i} not healthy after healing:\n{}",
                self.nats[i].log_tail(30)
            );
        }
        for j in 0..self.gateways.len() {
            let addr = format!("{}:8080", self.net.gateway_ip(j));
            assert!(
                wait_ok(&addr, "/readyz", Duration::from_secs(60)).await,
                "gateway gw{j} not ready after healing:\n{}",
                self.gateways[j].log_tail(30)
            );
        }
    }
}

/// Every message of every room stream, read straight from JetStream.
async fn read_streams(urls: &str, partitions: u32) -> check::Truth {
    let addrs: Vec<async_nats::ServerAddr> = urls.split(',').map(|u| u.parse().expect("NATS URL")).collect();
    let client = async_nats::connect(addrs).await.expect("checker connects to NATS");
    let js = async_nats::jetstream::new(client);
    let mut truth = check::Truth::new();
    for p in 0..partitions {
        let name = format!("GW_ROOMS_{p}");
        let Ok(stream) = js.get_stream(&name).await else {
            continue;
        };
        let info = stream.get_info().await.expect("stream info");
        if info.state.messages == 0 {
            continue;
        }
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let mut msgs = consumer.messages().await.expect("messages");
        let mut got = 0u64;
        while got < info.state.messages {
            let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                .await
                .expect("stream read stalled")
                .expect("stream ended")
                .expect("stream message");
            got += 1;
            let seq = m.info().expect("jetstream message").stream_sequence;
            let room = m.subject.as_str().rsplit('.').next().unwrap().to_string();
            let env = proto::bus::Envelope::decode(m.payload.as_ref()).expect("envelope");
            let v: serde_json::Value = serde_json::from_slice(&env.data).expect("data is JSON");
            truth
                .entry(room)
                .or_default()
                .insert(seq, v["k"].as_str().unwrap_or("").to_string());
        }
    }
    truth
}

/// Acknowledged messages the consumer read did not return, asked of each
/// room stream's leader by sequence (`STREAM.MSG.GET`, answered by the
/// leader): the checker's ordered consumer may sit on a replica still
/// catching up after a partition, and its read then lacks what the leader
/// holds. Adds what a leader holds to `truth` (a message counts only under
/// its own room and key); returns how many it added. Lost is what no
/// leader holds.
async fn confirm_with_leaders(urls: &str, partitions: u32, truth: &mut check::Truth, pubs: &[PubRecord]) -> usize {
    let addrs: Vec<async_nats::ServerAddr> = urls.split(',').map(|u| u.parse().expect("NATS URL")).collect();
    let client = async_nats::connect(addrs).await.expect("checker connects to NATS");
    let js = async_nats::jetstream::new(client);
    let mut streams = Vec::new();
    for p in 0..partitions {
        if let Ok(s) = js.get_stream(format!("GW_ROOMS_{p}")).await {
            streams.push(s);
        }
    }
    let mut added = 0;
    for p in pubs {
        for (key, (room, offset)) in &p.acks {
            if truth.get(room).is_some_and(|m| m.contains_key(offset)) {
                continue;
            }
            for stream in &streams {
                let Ok(m) = stream.get_raw_message(*offset).await else {
                    continue;
                };
                if m.subject.as_str().rsplit('.').next() != Some(room.as_str()) {
                    continue;
                }
                let Ok(env) = proto::bus::Envelope::decode(m.payload.as_ref()) else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_slice(&env.data).unwrap_or_default();
                if v["k"].as_str() == Some(key.as_str()) {
                    truth.entry(room.clone()).or_default().insert(*offset, key.clone());
                    added += 1;
                    break;
                }
            }
        }
    }
    added
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kills_stops_partitions_and_slow_links() {
    let _one_network_at_a_time = NETWORKS.lock().await;
    let seed: u64 = env("CHAOS_SEED", rand::random::<u32>() as u64);
    let secs: u64 = env("CHAOS_SECS", 40);
    let n_clients: usize = env("CHAOS_CLIENTS", 200);
    let n_pubs: usize = env("CHAOS_PUBLISHERS", 6);
    let rate: f64 = env("CHAOS_RATE", 8.0);
    let n_rooms: usize = env("CHAOS_ROOMS", 24);
    let history: usize = env("CHAOS_HISTORY", 30);
    eprintln!(
        "chaos: seed {seed}, {secs} s of faults, {n_clients} clients, {n_pubs} publishers at {rate}/s, \
         {n_rooms} rooms, history {history} (reproduce: CHAOS_SEED={seed} CHAOS_SECS={secs} scripts/chaos.sh)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let net = Net::create(3, 3);
    let knobs: Vec<Knobs> = (0..3).map(|_| Knobs::new()).collect();
    let mut ports = Vec::new();
    for (j, k) in knobs.iter().enumerate() {
        let mut row = Vec::new();
        for i in 0..3 {
            row.push(
                proxy::start(
                    &net.root_ip(),
                    format!("{}:4222", net.nats_ip(i)),
                    k.clone(),
                    seed ^ (j * 3 + i) as u64,
                )
                .await,
            );
        }
        ports.push(row);
    }
    let mut run = Run {
        nats: procs::nats(&net, dir.path()),
        gateways: procs::gateways(&net, dir.path(), &ports, history),
        net,
        knobs,
        began: Instant::now(),
        crashes: Vec::new(),
        faults: Default::default(),
    };
    for p in &mut run.nats {
        p.start();
    }
    for i in 0..3 {
        assert!(
            run.nats_healthy(i, Duration::from_secs(60)).await,
            "nats n{i} did not start:\n{}",
            run.nats[i].log_tail(30)
        );
    }
    for p in &mut run.gateways {
        p.start();
    }
    for j in 0..3 {
        let addr = format!("{}:8080", run.net.gateway_ip(j));
        assert!(
            wait_ok(&addr, "/readyz", Duration::from_secs(60)).await,
            "gateway gw{j} did not start:\n{}",
            run.gateways[j].log_tail(30)
        );
    }
    run.log("cluster up");

    let rooms: Vec<String> = (0..n_rooms).map(|r| format!("chaos-{r}")).collect();
    let (stop_tx, stop) = watch::channel(false);
    let (stop_pub_tx, stop_publishing) = watch::channel(false);
    let (calm_tx, calm) = watch::channel(false);
    let shared = Arc::new(Shared {
        urls: (0..3)
            .map(|j| format!("ws://{}:8080/ws", run.net.gateway_ip(j)))
            .collect(),
        stop,
        stop_publishing,
        calm,
        sleepers: (n_clients / 40).max(1),
    });
    let mut tasks = Vec::new();
    let subs: Vec<Arc<Mutex<SubRecord>>> = (0..n_clients).map(|_| Arc::default()).collect();
    for (i, rec) in subs.iter().enumerate() {
        let mine: Vec<String> = rand::seq::index::sample(&mut rng, n_rooms, 3.min(n_rooms))
            .into_iter()
            .map(|r| rooms[r].clone())
            .collect();
        tasks.push(tokio::spawn(clients::subscriber(
            i,
            mine,
            shared.clone(),
            rec.clone(),
            rng.random(),
        )));
    }
    // Let the subscriptions settle before anything is published.
    let settle = Instant::now() + Duration::from_secs(30);
    while Instant::now() < settle && subs.iter().any(|s| s.lock().unwrap().start.len() < 3.min(n_rooms)) {
        sleep(Duration::from_millis(200)).await;
    }
    run.log("subscribers up");
    let pubs: Vec<Arc<Mutex<PubRecord>>> = (0..n_pubs).map(|_| Arc::default()).collect();
    let mut pub_tasks = Vec::new();
    for (p, rec) in pubs.iter().enumerate() {
        pub_tasks.push(tokio::spawn(clients::publisher(
            p,
            rooms.clone(),
            rate,
            shared.clone(),
            rec.clone(),
            rng.random(),
        )));
    }

    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        sleep(Duration::from_millis(rng.random_range(300..2_500))).await;
        run.fault(&mut rng).await;
    }
    run.log("faults over; healing");
    run.heal().await;
    calm_tx.send_replace(true);
    // Publishers finish their current key (each retried at most 60 s).
    stop_pub_tx.send_replace(true);
    for t in pub_tasks {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .expect("publishers end")
            .unwrap();
    }
    run.log("publishers done; waiting for every client to catch up");
    let urls: String = (0..3)
        .map(|i| format!("nats://{}:4222", run.net.nats_ip(i)))
        .collect::<Vec<_>>()
        .join(",");
    let truth = read_streams(&urls, 4).await;
    let latest = |room: &str| truth.get(room).and_then(|m| m.keys().last().copied()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let behind = subs
            .iter()
            .filter(|s| {
                let s = s.lock().unwrap();
                !s.fills.is_empty()
                    || s.rooms
                        .iter()
                        .any(|r| s.cursor.get(r).copied().unwrap_or(0) < latest(r))
            })
            .count();
        if behind == 0 || Instant::now() > deadline {
            run.log(&format!("{behind} clients behind the streams"));
            break;
        }
        sleep(Duration::from_millis(500)).await;
    }
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }
    run.reap();

    let pubs: Vec<PubRecord> = pubs.iter().map(|p| std::mem::take(&mut *p.lock().unwrap())).collect();
    let subs: Vec<SubRecord> = subs.iter().map(|s| std::mem::take(&mut *s.lock().unwrap())).collect();
    let mut truth = truth;
    let mut rep = check::check(&truth, &pubs, &subs);
    let mut read_late = 0;
    if !rep.lost.is_empty() {
        // Asked of the leaders before they count as lost.
        read_late = confirm_with_leaders(&urls, 4, &mut truth, &pubs).await;
        rep = check::check(&truth, &pubs, &subs);
    }
    let stored: usize = truth.values().map(|m| m.len()).sum();
    let sum = |f: fn(&PubRecord) -> u64| pubs.iter().map(f).sum::<u64>();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    for p in &pubs {
        for (k, v) in &p.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let sessions: u64 = subs.iter().map(|s| s.sessions).sum();
    let sub_errors: u64 = subs.iter().map(|s| s.sub_errors).sum();
    eprintln!(
        "chaos: seed {seed}; faults {:?}; crashes {}",
        run.faults,
        run.crashes.len()
    );
    eprintln!(
        "chaos: publishes: {} attempts, {} retries, {} deliberate resends, {} keys acknowledged, {} gave up; errors {errors:?}",
        sum(|p| p.attempts),
        sum(|p| p.retries),
        sum(|p| p.resends),
        rep.acked,
        pubs.iter().map(|p| p.gave_up.len()).sum::<usize>()
    );
    eprintln!(
        "chaos: streams hold {stored} messages ({read_late} missed by the consumer's read and found at the stream leader); acknowledged and expired by retention {}; lost {}; key acknowledged with two offsets {}; key stored twice {}; content mismatches {}",
        rep.acked_expired,
        rep.lost.len(),
        rep.ack_conflicts.len(),
        rep.stored_twice.len(),
        rep.mismatched.len()
    );
    eprintln!(
        "chaos: clients: {} client-rooms, {sessions} sessions ({} reconnects), {sub_errors} subscribe entries retried, {} deliveries checked; duplicates {}, out of order {}, missing {}, never stored {}",
        rep.client_rooms,
        sessions.saturating_sub(subs.len() as u64),
        rep.deliveries,
        rep.duplicates.len(),
        rep.out_of_order.len(),
        rep.missing_total,
        rep.phantoms.len()
    );
    eprintln!(
        "chaos: recovered:false {} ({} unexplained), {} messages reloaded with history after them, {} excused (left the stream); anomalies {}",
        rep.not_recovered,
        rep.unexplained.len(),
        rep.filled,
        rep.excused,
        rep.anomalies.len()
    );
    let show = |what: &str, v: &[String]| {
        for x in v.iter().take(10) {
            eprintln!("chaos: {what}: {x}");
        }
    };
    show("LOST", &rep.lost);
    show("ACK CONFLICT", &rep.ack_conflicts);
    show("STORED TWICE", &rep.stored_twice);
    show("MISMATCH", &rep.mismatched);
    show("DUPLICATE", &rep.duplicates);
    show("OUT OF ORDER", &rep.out_of_order);
    show("MISSING", &rep.missing);
    show("NEVER STORED", &rep.phantoms);
    show("UNEXPLAINED recovered:false", &rep.unexplained);
    show("ANOMALY", &rep.anomalies);
    show("CRASH", &run.crashes);
    if rep.violations() + run.crashes.len() > 0 {
        // The servers' logs and stores, for a look after the run.
        eprintln!("chaos: logs and stores kept in {}", dir.keep().display());
    }
    assert!(rep.acked > 0, "nothing was acknowledged");
    assert_eq!(
        rep.violations() + run.crashes.len(),
        0,
        "chaos run with seed {seed} found violations (above)"
    );
}
