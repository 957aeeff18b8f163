//! Building blocks shared by the scenarios: target arguments, the subscriber
//! and publisher tasks, and the phase runner that steps load and judges it.
//!
//! Concurrency: everything runs on one thread (current-thread runtime plus a
//! `LocalSet`): one task per connection, shared state in `Rc`/`Cell`/`RefCell`
//! with no borrow held across an `.await`. One thread is the point: the load
//! generator is pinned to one core and its own CPU use is reported next to the
//! server's, so a saturated client is flagged rather than mistaken for the
//! server's limit.

pub mod fanout;
pub mod idle;
pub mod rooms;
pub mod scale;
pub mod soak;
pub mod storm;
pub mod wire;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::time::{MissedTickBehavior, sleep};

use crate::clock::{PayloadTemplate, Schedule, Stamp, now_ns};
use crate::conn::{Conn, ConnError, Endpoint, Incoming, OpenOpts, ReplyKind, Target, reply_kind, source_addr};
use crate::procfs::{self, CpuMeter, ProcSample};
use crate::progress::Progress;
use crate::stats::{Hist, Latency, Recorder, SubscriberBook};
use crate::tokens::Signer;

/// How to reach the system under test.
#[derive(clap::Args, Clone, Debug)]
pub struct TargetArgs {
    /// Protocol of the target.
    #[arg(long, value_enum, default_value = "gw.v1.json")]
    pub target: Target,
    /// WebSocket URL: ws://127.0.0.1:PORT/ws (gateway) or ws://127.0.0.1:PORT (nats-server).
    #[arg(long)]
    pub url: String,
    /// HS256 secret for gateway connection tokens.
    #[arg(
        long,
        env = "LOADTEST_JWT_SECRET",
        default_value = "loadtest-secret-0123456789abcdef0"
    )]
    pub jwt_secret: String,
    /// Pid of the server process, to read its CPU time and memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Spread connections over source addresses 127.0.0.1..=127.0.0.N (0: one per 4,000
    /// connections). Needed past ~28K connections (one ephemeral port range per address), and
    /// well before that it keeps the kernel's ephemeral-port search in connect() cheap: with
    /// 19K connections from one address it cost the client ~0.3 ms per connect.
    #[arg(long, default_value_t = 0)]
    pub source_ips: usize,
    /// Connections being opened at the same time while ramping up.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Give up on one connection attempt after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout_secs: f64,
    /// Offer WebSocket compression (permessage-deflate) and inflate what comes compressed; a
    /// server that declines it fails the connection.
    #[arg(long)]
    pub deflate: bool,
}

/// Resolved target: endpoint, token signer, server pid.
pub struct Env {
    pub ep: Endpoint,
    pub signer: Signer,
    pub server_pid: Option<u32>,
    pub source_ips: usize,
    pub connect_timeout: Duration,
    pub gate: Semaphore,
}

impl Env {
    pub fn new(args: &TargetArgs, total_conns: usize) -> Result<Rc<Env>> {
        let source_ips = if args.source_ips == 0 {
            total_conns.div_ceil(4_000).clamp(1, 254)
        } else {
            args.source_ips
        };
        Ok(Rc::new(Env {
            ep: Endpoint {
                deflate: args.deflate,
                ..Endpoint::parse(args.target, &args.url)?
            },
            signer: Signer::hs256(&args.jwt_secret),
            server_pid: args.server_pid,
            source_ips,
            connect_timeout: Duration::from_secs_f64(args.connect_timeout_secs),
            gate: Semaphore::new(args.connect_concurrency.max(1)),
        }))
    }

    pub fn target(&self) -> Target {
        self.ep.target
    }

    pub fn opts(&self, index: usize, user: &str, read_buf: usize) -> Result<OpenOpts> {
        let token = match self.ep.target {
            Target::GwJson | Target::GwProto => Some(self.signer.sign(user)?),
            Target::NatsWs => None,
        };
        Ok(OpenOpts {
            source: source_addr(index, self.source_ips),
            token,
            read_buf,
            timeout: self.connect_timeout,
            raw: false,
        })
    }

    pub fn server(&self) -> Option<ProcSample> {
        self.server_pid.and_then(|p| procfs::sample(&p.to_string()).ok())
    }

    pub fn server_meter(&self) -> Option<CpuMeter> {
        self.server_pid.and_then(|p| CpuMeter::start(&p.to_string()).ok())
    }
}

/// Counters for a group of subscriber connections.
#[derive(Default)]
pub struct Fleet {
    /// Opened and authenticated.
    pub connected: Cell<usize>,
    /// Subscribed and reading.
    pub live: Cell<usize>,
    /// Attempts that failed, by kind.
    pub failures: RefCell<BTreeMap<String, u64>>,
    /// Live connections that ended, by kind.
    pub disconnects: RefCell<BTreeMap<String, u64>>,
    pub refused_rooms: Cell<u64>,
}

impl Fleet {
    fn count(map: &RefCell<BTreeMap<String, u64>>, e: &ConnError) {
        *map.borrow_mut().entry(e.kind()).or_default() += 1;
    }

    pub fn failed(&self) -> u64 {
        self.failures.borrow().values().sum()
    }

    pub fn disconnected(&self) -> u64 {
        self.disconnects.borrow().values().sum()
    }
}

/// What one subscriber does.
pub struct SubPlan {
    pub index: usize,
    pub rooms: Vec<String>,
    /// Wait for the signal, then this offset, before subscribing.
    pub go: Option<(watch::Receiver<bool>, Duration)>,
    /// Where to record the subscribe round trip, in microseconds.
    pub sub_time: Option<Rc<RefCell<Hist>>>,
    /// Reconnect (and resubscribe) after a disconnect.
    pub reconnect: bool,
    pub read_buf: usize,
    /// Unmeasured: read only when this generation counter moves (between
    /// messages), counted for loss and duplicates but not for latency.
    pub lazy: Option<watch::Receiver<u64>>,
}

/// One subscriber connection's whole life; aborted by the scenario at the end.
pub async fn subscriber(env: Rc<Env>, fleet: Rc<Fleet>, rec: Rc<RefCell<Recorder>>, mut plan: SubPlan) {
    let mut book = SubscriberBook::default();
    let user = format!("sub-{}", plan.index);
    loop {
        let permit = env.gate.acquire().await.expect("semaphore never closed");
        let opened = match env.opts(plan.index, &user, plan.read_buf) {
            Ok(opts) => Conn::open(&env.ep, &opts).await,
            Err(e) => Err(ConnError::Protocol(e)),
        };
        drop(permit);
        let mut conn = match opened {
            Ok(c) => c,
            Err(e) => {
                Fleet::count(&fleet.failures, &e);
                if !plan.reconnect {
                    return;
                }
                sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        fleet.connected.set(fleet.connected.get() + 1);
        if let Some((mut go, offset)) = plan.go.take() {
            let _ = go.wait_for(|v| *v).await;
            sleep(offset).await;
        }
        let t0 = Instant::now();
        let subscribed = conn.subscribe(&plan.rooms).await;
        let end = match subscribed {
            Ok(refused) => {
                if let Some(h) = &plan.sub_time {
                    h.borrow_mut().record_us(t0.elapsed().as_micros() as u64);
                }
                fleet.refused_rooms.set(fleet.refused_rooms.get() + refused as u64);
                fleet.live.set(fleet.live.get() + 1);
                let end = match &mut plan.lazy {
                    Some(turn) => lazy_read_loop(&mut conn, &mut book, &rec, turn).await,
                    None => read_loop(&mut conn, &mut book, &rec).await,
                };
                fleet.live.set(fleet.live.get() - 1);
                end
            }
            Err(e) => e,
        };
        fleet.connected.set(fleet.connected.get() - 1);
        Fleet::count(&fleet.disconnects, &end);
        if !plan.reconnect {
            return;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Parses everything buffered on `conn` into `book`; latency is recorded
/// only with a read time (`None`: counted for loss and duplicates only).
fn drain_payloads(
    conn: &mut Conn,
    book: &mut SubscriberBook,
    rec: &RefCell<Recorder>,
    now: Option<u64>,
) -> Result<(), ConnError> {
    let mut r = rec.borrow_mut();
    conn.drain(&mut |inc| {
        if let Incoming::Data(p) = inc {
            book.on_payload_as(&mut r, p, now);
        }
    })
}

/// The subscriber hot loop: one read, one clock read, parse everything read.
pub(crate) async fn read_loop(conn: &mut Conn, book: &mut SubscriberBook, rec: &RefCell<Recorder>) -> ConnError {
    loop {
        if let Err(e) = conn.fill().await {
            return e;
        }
        if let Err(e) = drain_payloads(conn, book, rec, Some(now_ns())) {
            return e;
        }
        if conn.wants_flush()
            && let Err(e) = conn.flush().await
        {
            return e;
        }
    }
}

/// An unmeasured subscriber's loop: waits for its turn, reads what the
/// kernel holds for it without waiting, counts it (no latency), and waits
/// again. Keeps its reads out of the measured subscribers' way.
async fn lazy_read_loop(
    conn: &mut Conn,
    book: &mut SubscriberBook,
    rec: &RefCell<Recorder>,
    turn: &mut watch::Receiver<u64>,
) -> ConnError {
    loop {
        if turn.changed().await.is_err() {
            return ConnError::Eof;
        }
        loop {
            match conn.try_fill() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return e,
            }
            if let Err(e) = drain_payloads(conn, book, rec, None) {
                return e;
            }
        }
        if conn.wants_flush()
            && let Err(e) = conn.flush().await
        {
            return e;
        }
    }
}

/// Gives the unmeasured subscribers their turn (see [`SubPlan::lazy`]): as
/// soon as the `measured` subscribers received one more message each (a
/// fan-out is over), or after `max_gap` without one.
pub async fn lazy_turns(rec: Rc<RefCell<Recorder>>, measured: u64, turns: watch::Sender<u64>, max_gap: Duration) {
    let mut last = rec.borrow().measured;
    let mut at = Instant::now();
    loop {
        sleep(Duration::from_millis(1)).await;
        let now = rec.borrow().measured;
        if now >= last + measured.max(1) || at.elapsed() >= max_gap {
            last = now;
            at = Instant::now();
            turns.send_modify(|g| *g += 1);
        }
    }
}

/// Shared control of the publishers: which phase, how fast, and what was sent.
pub struct PubControl {
    pub phase: Cell<u32>,
    pub running: Cell<bool>,
    /// Messages per second per publisher.
    pub rate: Cell<f64>,
    /// Messages sent, per phase.
    pub published: RefCell<Vec<u64>>,
    /// Deliveries those messages owe (sum of members of each message's room), per phase.
    pub expected: RefCell<Vec<u64>>,
    pub live: Cell<usize>,
    /// Number of publishers sharing the rooms.
    pub publishers: Cell<u64>,
    pub acks: Cell<u64>,
    pub nacks: RefCell<BTreeMap<String, u64>>,
    pub failures: RefCell<BTreeMap<String, u64>>,
    /// Rooms to publish to, round robin, and the members each has.
    pub rooms: Vec<String>,
    pub members: Vec<u64>,
    pub payload_size: usize,
}

impl PubControl {
    pub fn new(rooms: Vec<String>, members: Vec<u64>, payload_size: usize) -> Rc<Self> {
        Rc::new(Self {
            phase: Cell::new(0),
            running: Cell::new(false),
            rate: Cell::new(0.0),
            published: RefCell::default(),
            expected: RefCell::default(),
            live: Cell::new(0),
            publishers: Cell::new(1),
            acks: Cell::new(0),
            nacks: RefCell::default(),
            failures: RefCell::default(),
            rooms,
            members,
            payload_size,
        })
    }

    fn add(v: &RefCell<Vec<u64>>, phase: u32, n: u64) {
        let mut v = v.borrow_mut();
        let k = phase as usize;
        if k >= v.len() {
            v.resize(k + 1, 0);
        }
        v[k] += n;
    }

    pub fn get(v: &RefCell<Vec<u64>>, phase: u32) -> u64 {
        v.borrow().get(phase as usize).copied().unwrap_or(0)
    }
}

/// Most messages one publisher sends in one 1 ms tick (bounds a catch-up burst).
const MAX_BURST: u64 = 5_000;
/// Unwritten bytes above which a publisher stops adding messages: the server
/// is not reading, and the shortfall shows up as an achieved rate below target.
const MAX_QUEUED: usize = 8 << 20;

/// One publisher connection, paced by a 1 ms tick against the phase's schedule.
pub async fn publisher(env: Rc<Env>, ctl: Rc<PubControl>, index: u16, ep: Endpoint) -> Result<(), ConnError> {
    let user = format!("pub-{index}");
    let opts = env
        .opts(100_000 + usize::from(index), &user, 64 * 1024)
        .map_err(ConnError::Protocol)?;
    let mut conn = match Conn::open(&ep, &opts).await {
        Ok(c) => c,
        Err(e) => {
            *ctl.failures.borrow_mut().entry(e.kind()).or_default() += 1;
            return Err(e);
        }
    };
    ctl.live.set(ctl.live.get() + 1);
    let body = if env.target().is_gateway() {
        ctl.payload_size.saturating_sub(2)
    } else {
        ctl.payload_size
    };
    let mut tmpl = PayloadTemplate::new(body);
    // Publishers interleave over the rooms: publisher p takes rooms p, p+P, ...
    let n_pubs = ctl.publishers.get().max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let (mut cur_phase, mut start, mut sched, mut sent) = (u32::MAX, Instant::now(), Schedule::new(0, 1.0), 0u64);
    let mut seq: u64 = 0;
    let mut room_cursor = u64::from(index);
    let result = loop {
        tokio::select! {
            r = conn.pump() => {
                if let Err(e) = r { break Err(e); }
                let (mut acks, mut nacks) = (0u64, Vec::new());
                let target = env.target();
                let drained = conn.drain(&mut |inc| match inc {
                    Incoming::Data(b) => match reply_kind(target, b) {
                        ReplyKind::Ack => acks += 1,
                        ReplyKind::Refused(code) => nacks.push(code),
                        ReplyKind::Other => {}
                    },
                    Incoming::Error(t) => nacks.push(String::from_utf8_lossy(t).into_owned()),
                    _ => {}
                });
                ctl.acks.set(ctl.acks.get() + acks);
                for n in nacks {
                    *ctl.nacks.borrow_mut().entry(n).or_default() += 1;
                }
                if let Err(e) = drained { break Err(e); }
            }
            _ = tick.tick() => {
                if !ctl.running.get() {
                    cur_phase = u32::MAX;
                } else {
                    let phase = ctl.phase.get();
                    if phase != cur_phase {
                        (cur_phase, start, sent) = (phase, Instant::now(), 0);
                        sched = Schedule::new(now_ns(), ctl.rate.get());
                    }
                    let due = sched.due_by(start.elapsed().as_secs_f64());
                    let n = due.saturating_sub(sent).min(MAX_BURST);
                    if n > 0 && conn.queued() < MAX_QUEUED {
                        let mut owed = 0u64;
                        for _ in 0..n {
                            let sent_ns = sched.stamp_ns(sent);
                            let payload = tmpl.stamp(&Stamp { sent_ns, seq, phase, publisher: index });
                            let r = (room_cursor % ctl.rooms.len() as u64) as usize;
                            conn.queue_publish(&ctl.rooms[r], payload);
                            owed += ctl.members[r];
                            room_cursor += n_pubs;
                            seq += 1;
                            sent += 1;
                        }
                        PubControl::add(&ctl.published, phase, n);
                        PubControl::add(&ctl.expected, phase, owed);
                    }
                }
            }
        }
        if conn.wants_flush()
            && let Err(e) = conn.try_flush()
        {
            break Err(e);
        }
    };
    ctl.live.set(ctl.live.get() - 1);
    if let Err(e) = &result {
        *ctl.failures
            .borrow_mut()
            .entry(format!("publisher_{}", e.kind()))
            .or_default() += 1;
    }
    result
}

/// Starts `count` publishers on `ep` and waits until they are connected.
pub async fn spawn_publishers(env: &Rc<Env>, ctl: &Rc<PubControl>, count: u16, ep: &Endpoint) -> Result<()> {
    ctl.publishers.set(u64::from(count));
    for i in 0..count {
        tokio::task::spawn_local(publisher(env.clone(), ctl.clone(), i, ep.clone()));
    }
    let t0 = Instant::now();
    while ctl.live.get() < usize::from(count) {
        if !ctl.failures.borrow().is_empty() {
            anyhow::bail!("publishers failed to connect: {:?}", ctl.failures.borrow());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("publishers not connected after 30 s");
        }
        sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Waits until `fleet` has `want` live subscribers (or gives up), showing progress.
pub async fn wait_live(fleet: &Fleet, want: usize, label: &str, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    let mut bar = Progress::new(label, want as u64);
    loop {
        let live = fleet.live.get();
        bar.set(live as u64, &format!("failed {}", fleet.failed()));
        if live >= want {
            bar.finish();
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            bar.finish();
            anyhow::bail!(
                "{live}/{want} subscribers live after {:.0?}; failures {:?}, disconnects {:?}",
                limit,
                fleet.failures.borrow(),
                fleet.disconnects.borrow()
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Judgement bounds for a load step.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Bounds {
    /// p99 bound of the strict criterion, ms.
    pub strict_p99_ms: f64,
    /// p99 bound of the keep-up criterion, ms.
    pub keepup_p99_ms: f64,
    /// The achieved rate must reach this fraction of the target.
    pub min_rate_fraction: f64,
    /// Load-generator CPU (cores) above which the client counts as saturated.
    pub saturated_cpu: f64,
}

/// One load step, measured.
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    pub phase: u32,
    pub secs: f64,
    /// Requested deliveries per second.
    pub target_dps: f64,
    /// Deliveries per second the sent messages owe.
    pub offered_dps: f64,
    /// Unique deliveries per second received (counted after the drain).
    pub delivered_dps: f64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub future_stamps: u64,
    pub disconnects: u64,
    pub latency: Latency,
    /// Cores used by the load generator during the step.
    pub loadgen_cpu: f64,
    /// Cores used by the server during the step (when its pid is known).
    pub server_cpu: Option<f64>,
    pub server_rss_bytes: Option<u64>,
    pub client_saturated: bool,
    pub strict_ok: bool,
    pub keepup_ok: bool,
    pub note: String,
}

/// Runs one load step: `target_dps` deliveries per second for `secs`, then a
/// drain until every owed delivery arrived or `drain` passed.
#[allow(clippy::too_many_arguments)]
pub async fn run_step(
    env: &Env,
    ctl: &PubControl,
    fleet: &Fleet,
    rec: &RefCell<Recorder>,
    phase: u32,
    target_dps: f64,
    secs: f64,
    drain: Duration,
    bounds: &Bounds,
    publishers: u16,
) -> Result<StepResult> {
    let per_msg = ctl.members.iter().sum::<u64>() as f64 / ctl.members.len().max(1) as f64;
    let msgs = target_dps / per_msg.max(1.0);
    ctl.rate.set(msgs / f64::from(publishers.max(1)));
    ctl.phase.set(phase);
    let disc0 = fleet.disconnected();
    let me = CpuMeter::start("self")?;
    let server = env.server_meter();
    let t0 = Instant::now();
    ctl.running.set(true);
    let mut bar = Progress::new(
        format!("step {phase}: {target_dps:.0} deliveries/s"),
        (secs * 10.0) as u64,
    );
    while t0.elapsed().as_secs_f64() < secs {
        sleep(Duration::from_millis(100)).await;
        let got = rec.borrow().unique(phase);
        bar.set((t0.elapsed().as_secs_f64() * 10.0) as u64, &format!("delivered {got}"));
    }
    ctl.running.set(false);
    let elapsed = t0.elapsed().as_secs_f64();
    let (loadgen_cpu, _) = me.read()?;
    let server_read = server.as_ref().and_then(|m| m.read().ok());
    let expected = PubControl::get(&ctl.expected, phase);
    let t1 = Instant::now();
    while rec.borrow().unique(phase) < expected && t1.elapsed() < drain {
        sleep(Duration::from_millis(20)).await;
    }
    bar.finish();
    let published = PubControl::get(&ctl.published, phase);
    let mut r = rec.borrow_mut();
    let ph = r.phase(phase);
    let delivered = ph.unique;
    let latency = ph.latency.summary();
    let lost = expected.saturating_sub(delivered);
    let disconnects = fleet.disconnected() - disc0;
    let offered_dps = expected as f64 / elapsed;
    let rate_ok = offered_dps >= target_dps * bounds.min_rate_fraction;
    let clean = lost == 0 && ph.duplicates == 0 && disconnects == 0 && rate_ok && published > 0;
    let client_saturated = loadgen_cpu >= bounds.saturated_cpu;
    let strict_ok = clean && latency.p99_ms <= bounds.strict_p99_ms;
    let keepup_ok = clean && latency.p99_ms <= bounds.keepup_p99_ms;
    let mut notes = Vec::new();
    if !rate_ok {
        notes.push(format!(
            "publishers reached {:.0}% of the target rate",
            100.0 * offered_dps / target_dps
        ));
    }
    if lost > 0 {
        notes.push(format!("{lost} deliveries lost"));
    }
    if disconnects > 0 {
        notes.push(format!("{disconnects} disconnects {:?}", fleet.disconnects.borrow()));
    }
    if client_saturated {
        notes.push(format!(
            "LOAD GENERATOR SATURATED ({loadgen_cpu:.2} cores): not the server's limit"
        ));
    }
    Ok(StepResult {
        phase,
        secs: elapsed,
        target_dps,
        offered_dps,
        delivered_dps: delivered as f64 / elapsed,
        published,
        expected,
        delivered,
        lost,
        duplicates: ph.duplicates,
        future_stamps: ph.future_stamps,
        disconnects,
        latency,
        loadgen_cpu,
        server_cpu: server_read.map(|(c, _)| c),
        server_rss_bytes: server_read.map(|(_, s)| s.rss_bytes),
        client_saturated,
        strict_ok,
        keepup_ok,
        note: notes.join("; "),
    })
}

/// Waits until deliveries stop arriving (a backlog from an overloaded step
/// drained), at most `limit`.
pub async fn quiesce(rec: &RefCell<Recorder>, phase: u32, limit: Duration) {
    let t0 = Instant::now();
    let mut last = rec.borrow().unique(phase);
    while t0.elapsed() < limit {
        sleep(Duration::from_millis(500)).await;
        let now = rec.borrow().unique(phase);
        if now == last {
            return;
        }
        last = now;
    }
}
