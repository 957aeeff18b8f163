//! `scale`: one worker process of the report's scale run (`loadtest/scale.sh`
//! starts several: one process holds at most ~19,900 sockets here).
//!
//! The run's connections are numbered `0..total`; this worker opens
//! `first..first + count`. Connection `i` is
//! - a member of the big room `big` when `i % big_every == 0`,
//! - else a heavy user in `rooms_per_user` rooms of a pool (subscribed in
//!   one frame) when `i % heavy_every == 1`,
//! - else an idle user in a small room (`s<i / small_room>`).
//!
//! Each starts on a gateway picked by a hash of `i` from `--urls`. A client
//! whose connection ends (a drain closes with 1012) reconnects to a gateway
//! of `--failover-urls` and resubscribes every room with `since` = the last
//! offset it saw, as the protocol asks; the time from the close to the
//! resubscribe's reply is the "moved" histogram.
//!
//! Processes meet through files in `--dir`: each worker writes `conns-<n>`
//! once its connections other than the heavy users' are subscribed and
//! waits for `heavy` (the heavy users subscribe then, over
//! `--heavy-arrival-secs`, as in the `rooms` scenario); it writes
//! `ready-<worker>` once all are subscribed, then waits for
//! `go` (latency counts from then, on one big-room member in
//! `--measure-every`; `drain` starts a second period); the worker with `--publish-rate` publishes stamped messages into
//! the big room until `stop` appears and then writes `published`; every
//! worker then waits until its big-room members hold every published
//! message (at most `--settle-secs`) and reports. A member's messages are
//! checked by sequence number: exactly once each, none missing, whatever
//! gateway served them (live or catch-up).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::sleep;

use super::{Env, PubControl, TargetArgs};
use crate::clock::StampFinder;
use crate::conn::{Conn, ConnError, Endpoint, Incoming};
use crate::seq::{Seen, SeqTracker};
use crate::stats::{Hist, Latency};

#[derive(clap::Args, Clone, Debug)]
pub struct ScaleArgs {
    /// `--url` is where the publisher connects (a gateway that is not drained).
    #[command(flatten)]
    pub target: TargetArgs,
    /// Gateways' WebSocket URLs, comma-separated; a connection starts on one
    /// picked by a hash of its number.
    #[arg(long)]
    pub urls: String,
    /// Where a client goes when its connection ends, comma-separated
    /// (default: `--urls`).
    #[arg(long)]
    pub failover_urls: Option<String>,
    /// Connections in the whole run (all workers).
    #[arg(long)]
    pub total: usize,
    /// First connection number of this worker.
    #[arg(long)]
    pub first: usize,
    /// Connections of this worker.
    #[arg(long)]
    pub count: usize,
    /// This worker's number (names its `ready-<n>` file).
    #[arg(long, default_value_t = 0)]
    pub worker: usize,
    #[arg(long, default_value_t = 10)]
    pub big_every: usize,
    #[arg(long, default_value_t = 100)]
    pub heavy_every: usize,
    #[arg(long, default_value_t = 2_000)]
    pub rooms_per_user: usize,
    /// Rooms the heavy users' rooms are drawn from.
    #[arg(long, default_value_t = 10_000)]
    pub pool: usize,
    /// Members of each idle room.
    #[arg(long, default_value_t = 8)]
    pub small_room: usize,
    /// Messages per second this worker publishes into the big room (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub publish_rate: f64,
    /// Publisher connections sharing that rate (a connection's publishes are
    /// answered one after another, so one connection alone is bound by the
    /// JetStream round trip).
    #[arg(long, default_value_t = 10)]
    pub publishers: u16,
    /// Measure latency on one big-room member in K; the others read what
    /// they hold every `--lazy-turn-ms` (many messages per read) and count
    /// for loss only, so that the generator can take 10,000 members x 100
    /// messages/s (1: measure all).
    #[arg(long, default_value_t = 10)]
    pub measure_every: usize,
    #[arg(long, default_value_t = 100)]
    pub lazy_turn_ms: u64,
    /// The heavy users' first subscribes are spread over this many seconds,
    /// once the script opens the heavy phase (`heavy` file: every worker's
    /// other connections are subscribed).
    #[arg(long, default_value_t = 5.0)]
    pub heavy_arrival_secs: f64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Directory the workers and the script meet in.
    #[arg(long)]
    pub dir: PathBuf,
    /// Longest wait for the big-room members to hold every message after `stop`.
    #[arg(long, default_value_t = 30.0)]
    pub settle_secs: f64,
    /// Bound on the whole run; the worker gives up after it.
    #[arg(long, default_value_t = 1_800.0)]
    pub max_secs: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Big,
    Heavy,
    Idle,
}

/// Per gateway URL, as this worker saw it.
#[derive(Clone, Debug, Serialize)]
pub struct PerUrl {
    pub url: String,
    /// Connections subscribed there at `ready` and at the end.
    pub live_ready: usize,
    pub live_end: usize,
    /// Big-room messages received there between `go` and `drain` (the
    /// steady state), from `drain` to `settled` (clients moving), and from
    /// `settled` to the end of the check.
    pub delivered: u64,
    pub delivered_after_drain: u64,
    pub delivered_settled: u64,
    /// Publish-to-receive latency of those messages (catch-up included),
    /// in the same three periods.
    pub latency: Latency,
    pub latency_after_drain: Latency,
    pub latency_settled: Latency,
}

#[derive(Clone, Debug, Serialize)]
pub struct BigCheck {
    pub members: usize,
    /// Messages the publisher sent, and of those acknowledged.
    pub published: u64,
    pub acknowledged: u64,
    /// Members holding every published message.
    pub complete: usize,
    /// Published messages never received, summed over members (a member's
    /// distinct messages, counted by publisher and sequence number, short of
    /// the published count).
    pub missing: u64,
    pub duplicates: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleReport {
    pub scenario: &'static str,
    pub worker: usize,
    pub first: usize,
    pub count: usize,
    pub big: usize,
    pub heavy: usize,
    pub idle: usize,
    pub connect_secs: f64,
    /// From the heavy phase's start to every heavy user subscribed.
    pub heavy_secs: f64,
    pub failures: BTreeMap<String, u64>,
    pub disconnects: BTreeMap<String, u64>,
    pub per_url: Vec<PerUrl>,
    /// Heavy users' first subscribe (all their rooms in one frame), round trip.
    pub heavy_subscribe: Latency,
    /// Heavy users' resubscribe with `since` after a move, round trip.
    pub heavy_resume: Latency,
    /// Connection ends caused by the drain (1012, 1001, or any end after it
    /// began; a client that failed again counts again) and of those the
    /// resubscribes that followed (back on another gateway).
    pub moved: u64,
    pub moved_back: u64,
    /// Distinct clients with at least one such end, and of those the ones
    /// that were back (subscribed on another gateway) at least once.
    pub moved_clients: u64,
    pub moved_back_clients: u64,
    /// From the 1012 close to the resubscribe's reply.
    pub moved_time: Latency,
    /// Rooms answered `recovered:false` on a resubscribe.
    pub not_recovered: u64,
    /// Subscribe entries the gateway refused (any error), first subscribes
    /// and resubscribes together.
    pub refused_rooms: u64,
    pub check: BigCheck,
    pub publisher: Option<PublisherFigures>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PublisherFigures {
    pub published: u64,
    pub acks: u64,
    pub nacks: BTreeMap<String, u64>,
    pub failures: BTreeMap<String, u64>,
}

struct Shared {
    env: Rc<Env>,
    eps: Vec<Endpoint>,
    /// Connection number of `home[0]`.
    first: usize,
    home: Vec<usize>,
    failover: Vec<usize>,
    live: Vec<Cell<usize>>,
    /// Per URL and period: the steady state (0), after the drain began (1),
    /// after the script declared the move over (2).
    delivered: Vec<[Cell<u64>; 3]>,
    latency: Vec<[RefCell<Hist>; 3]>,
    counting: Cell<bool>,
    /// The period (files `drain`, `settled`).
    period: Cell<usize>,
    heavy_sub: RefCell<Hist>,
    heavy_resume: RefCell<Hist>,
    moved: Cell<u64>,
    moved_back: Cell<u64>,
    moved_clients: Cell<u64>,
    moved_back_clients: Cell<u64>,
    moved_time: RefCell<Hist>,
    not_recovered: Cell<u64>,
    refused_rooms: Cell<u64>,
    failures: RefCell<BTreeMap<String, u64>>,
    disconnects: RefCell<BTreeMap<String, u64>>,
    /// Opens the heavy users' first subscribe, spread over `heavy_arrival_secs`.
    heavy_go: watch::Receiver<bool>,
    heavy_arrival_secs: f64,
    /// Per big-room member of this worker, a tracker per publisher.
    big: RefCell<Vec<Vec<SeqTracker>>>,
}

fn spread(i: usize) -> usize {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_right(29) as usize
}

fn count(map: &RefCell<BTreeMap<String, u64>>, e: &ConnError) {
    *map.borrow_mut().entry(e.kind()).or_default() += 1;
}

/// The offset of a `message` push (`"offset":N`), if `frame` is one.
fn message_offset(frame: &[u8]) -> Option<u64> {
    if !frame.starts_with(br#"{"op":"message""#) {
        return None;
    }
    let at = memchr::memmem::find(frame, br#""offset":"#)? + 9;
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&frame[at..at + digits]).ok()?.parse().ok()
}

/// Reads once (waiting for data) and hands every message read to `on`.
async fn read_once(conn: &mut Conn, on: &mut impl FnMut(&[u8])) -> Result<(), ConnError> {
    conn.fill().await?;
    conn.drain(&mut |inc| {
        if let Incoming::Data(f) = inc {
            on(f);
        }
    })
}

/// Reads what the kernel already holds, without waiting, and hands every
/// message to `on`.
fn read_ready(conn: &mut Conn, on: &mut impl FnMut(&[u8])) -> Result<(), ConnError> {
    while conn.try_fill()? {
        conn.drain(&mut |inc| {
            if let Incoming::Data(f) = inc {
                on(f);
            }
        })?;
    }
    Ok(())
}

/// One client's whole life: connect, subscribe (with `since` after the
/// first time), read until the connection ends, move to a failover gateway.
/// Only big-room members move their `since` with what they read; the other
/// rooms get no messages in this scenario, so their reply's offset stays
/// the last one.
async fn client(
    sh: Rc<Shared>,
    i: usize,
    role: Role,
    rooms: Vec<String>,
    member: Option<usize>,
    mut lazy: Option<watch::Receiver<u64>>,
) {
    let measured = lazy.is_none();
    let user = format!("u{i}");
    let mut url = sh.home[i - sh.first];
    let mut since: Vec<Option<u64>> = vec![None; rooms.len()];
    let finder = StampFinder::default();
    let mut closed_at: Option<Instant> = None;
    // Whether this client was counted in `moved_clients` / `moved_back_clients`.
    let (mut was_moved, mut was_back) = (false, false);
    // Where this client goes after its gateway: a second hash of `i`, so the
    // clients of one gateway spread over every failover gateway.
    let mut attempt = spread(i ^ 0x5bd1_e995);
    let read_buf = if role == Role::Heavy { 64 * 1024 } else { 2048 };
    loop {
        let permit = sh.env.gate.acquire().await.expect("semaphore never closed");
        let opened = match sh.env.opts(i, &user, read_buf) {
            Ok(opts) => Conn::open(&sh.eps[url], &opts).await,
            Err(e) => Err(ConnError::Protocol(e)),
        };
        drop(permit);
        let mut conn = match opened {
            Ok(c) => c,
            Err(e) => {
                count(&sh.failures, &e);
                attempt += 1;
                url = sh.failover[attempt % sh.failover.len()];
                sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        let on_frame = |frame: &[u8], url: usize, since: &mut [Option<u64>]| {
            let Some(off) = message_offset(frame) else { return };
            if let Some(k) = member {
                since[0] = Some(since[0].map_or(off, |s| s.max(off)));
                if let Some(stamp) = finder.find(frame) {
                    let seen = {
                        let mut big = sh.big.borrow_mut();
                        let per_pub = &mut big[k];
                        let p = usize::from(stamp.publisher);
                        if p >= per_pub.len() {
                            per_pub.resize_with(p + 1, SeqTracker::default);
                        }
                        per_pub[p].observe(stamp.seq)
                    };
                    if seen == Seen::New && sh.counting.get() {
                        let at = sh.period.get();
                        let d = &sh.delivered[url][at];
                        d.set(d.get() + 1);
                        if measured && let Some(us) = stamp.latency_us(crate::clock::now_ns()) {
                            sh.latency[url][at].borrow_mut().record_us(us);
                        }
                    }
                }
            }
        };
        if role == Role::Heavy && !since.iter().any(Option::is_some) {
            // The first subscribe waits for the heavy phase, at this user's
            // arrival slot within it.
            let mut go = sh.heavy_go.clone();
            let _ = go.wait_for(|v| *v).await;
            sleep(Duration::from_secs_f64(
                sh.heavy_arrival_secs * (spread(i) % 10_000) as f64 / 10_000.0,
            ))
            .await;
        }
        let asked: Vec<(String, Option<u64>)> = rooms.iter().cloned().zip(since.iter().copied()).collect();
        let resumed = since.iter().any(Option::is_some);
        let t0 = Instant::now();
        let mut early: Vec<Vec<u8>> = Vec::new();
        let reply = conn.subscribe_since(&asked, &mut |f| early.push(f.to_vec())).await;
        let end = match reply {
            Ok(entries) => {
                let took = t0.elapsed().as_micros() as u64;
                let refused = rooms.len().saturating_sub(entries.iter().flatten().count());
                sh.refused_rooms.set(sh.refused_rooms.get() + refused as u64);
                for (k, e) in entries.iter().enumerate() {
                    if let Some((off, recovered)) = e {
                        if since[k].is_none() {
                            since[k] = Some(*off);
                        }
                        if *recovered == Some(false) {
                            sh.not_recovered.set(sh.not_recovered.get() + 1);
                        }
                    }
                }
                for f in &early {
                    on_frame(f, url, &mut since);
                }
                if role == Role::Heavy {
                    let h = if resumed { &sh.heavy_resume } else { &sh.heavy_sub };
                    h.borrow_mut().record_us(took);
                }
                if let Some(at) = closed_at.take() {
                    sh.moved_back.set(sh.moved_back.get() + 1);
                    if !std::mem::replace(&mut was_back, true) {
                        sh.moved_back_clients.set(sh.moved_back_clients.get() + 1);
                    }
                    sh.moved_time.borrow_mut().record_us(at.elapsed().as_micros() as u64);
                }
                sh.live[url].set(sh.live[url].get() + 1);
                let end = loop {
                    let read = match lazy.as_mut() {
                        None => read_once(&mut conn, &mut |f| on_frame(f, url, &mut since)).await,
                        Some(turn) => {
                            if turn.changed().await.is_err() {
                                break ConnError::Eof;
                            }
                            read_ready(&mut conn, &mut |f| on_frame(f, url, &mut since))
                        }
                    };
                    if let Err(e) = read {
                        break e;
                    }
                    if conn.wants_flush()
                        && let Err(e) = conn.flush().await
                    {
                        break e;
                    }
                };
                sh.live[url].set(sh.live[url].get() - 1);
                end
            }
            Err(e) => e,
        };
        // 1012: the drain closed it; 1001 or a dropped connection: the
        // drain's timeout did (any end once the drain began counts).
        if matches!(end, ConnError::Closed(1012 | 1001)) || sh.period.get() >= 1 {
            sh.moved.set(sh.moved.get() + 1);
            if !std::mem::replace(&mut was_moved, true) {
                sh.moved_clients.set(sh.moved_clients.get() + 1);
            }
            closed_at.get_or_insert_with(Instant::now);
        }
        count(&sh.disconnects, &end);
        attempt += 1;
        url = sh.failover[attempt % sh.failover.len()];
        // Jittered backoff, as the protocol asks after 1012.
        sleep(Duration::from_millis(50 + (spread(attempt) % 450) as u64)).await;
    }
}

async fn wait_file(path: &Path, limit: Instant) -> Result<()> {
    while !path.exists() {
        if Instant::now() > limit {
            bail!("gave up waiting for {}", path.display());
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub async fn run(args: &ScaleArgs) -> Result<ScaleReport> {
    let t_start = Instant::now();
    let limit = t_start + Duration::from_secs_f64(args.max_secs);
    let env = Env::new(&args.target, args.count)?;
    let split = |s: &str| {
        s.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let mut all = split(&args.urls);
    if all.is_empty() {
        bail!("--urls names no gateway");
    }
    let homes: Vec<usize> = (0..all.len()).collect();
    let mut failover = Vec::new();
    for u in split(args.failover_urls.as_deref().unwrap_or(&args.urls)) {
        let k = all.iter().position(|x| *x == u).unwrap_or_else(|| {
            all.push(u.clone());
            all.len() - 1
        });
        failover.push(k);
    }
    let eps = all
        .iter()
        .map(|u| {
            Ok(Endpoint {
                deflate: args.target.deflate,
                ..Endpoint::parse(args.target.target, u)?
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let n = all.len();
    let mut home = Vec::with_capacity(args.count);
    let heavy_total = args.total.div_ceil(args.heavy_every.max(1)).max(1);
    let pool = args.pool.max(1);
    let k = args.rooms_per_user.min(pool);
    let stride = (pool / heavy_total).max(1);
    let mut plans = Vec::with_capacity(args.count);
    let mut n_big = 0;
    for i in args.first..args.first + args.count {
        home.push(homes[spread(i) % homes.len()]);
        let (role, rooms, member) = if i % args.big_every.max(1) == 0 {
            n_big += 1;
            (Role::Big, vec!["big".to_string()], Some(n_big - 1))
        } else if i % args.heavy_every.max(1) == 1 {
            let u = i / args.heavy_every.max(1);
            let rooms = (0..k).map(|j| format!("r{}", (u * stride + j) % pool)).collect();
            (Role::Heavy, rooms, None)
        } else {
            (Role::Idle, vec![format!("s{}", i / args.small_room.max(1))], None)
        };
        plans.push((i, role, rooms, member));
    }
    let (heavy_go_tx, heavy_go) = watch::channel(false);
    let sh = Rc::new(Shared {
        heavy_go,
        heavy_arrival_secs: args.heavy_arrival_secs,
        env: env.clone(),
        eps,
        first: args.first,
        home,
        failover,
        live: (0..n).map(|_| Cell::new(0)).collect(),
        delivered: (0..n).map(|_| Default::default()).collect(),
        latency: (0..n).map(|_| Default::default()).collect(),
        counting: Cell::new(false),
        period: Cell::new(0),
        heavy_sub: RefCell::default(),
        heavy_resume: RefCell::default(),
        moved: Cell::new(0),
        moved_back: Cell::new(0),
        moved_clients: Cell::new(0),
        moved_back_clients: Cell::new(0),
        moved_time: RefCell::default(),
        not_recovered: Cell::new(0),
        refused_rooms: Cell::new(0),
        failures: RefCell::default(),
        disconnects: RefCell::default(),
        big: RefCell::new((0..n_big).map(|_| Vec::new()).collect()),
    });
    let n_heavy = plans.iter().filter(|p| p.1 == Role::Heavy).count();
    let mut tasks = Vec::with_capacity(args.count + 1);
    let (turns, turn) = watch::channel(0u64);
    let every = Duration::from_millis(args.lazy_turn_ms.max(1));
    tasks.push(tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            turns.send_modify(|g| *g += 1);
        }
    }));
    for (i, role, rooms, member) in plans {
        let lazy = member.and_then(|k| {
            (!(args.first / args.big_every.max(1) + k).is_multiple_of(args.measure_every.max(1))).then(|| turn.clone())
        });
        tasks.push(tokio::task::spawn_local(client(
            sh.clone(),
            i,
            role,
            rooms,
            member,
            lazy,
        )));
    }
    let live = || sh.live.iter().map(Cell::get).sum::<usize>();
    let t0 = Instant::now();
    let mut last = Instant::now();
    while live() < args.count - n_heavy {
        if Instant::now() > limit || t0.elapsed() > Duration::from_secs(600) {
            bail!(
                "worker {}: {}/{} live; failures {:?}",
                args.worker,
                live(),
                args.count - n_heavy,
                sh.failures.borrow()
            );
        }
        sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(args.dir.join(format!("conns-{}", args.worker)), b"conns\n")?;
    wait_file(&args.dir.join("heavy"), limit).await?;
    let t_heavy = Instant::now();
    heavy_go_tx.send_replace(true);
    while live() < args.count {
        if Instant::now() > limit || t0.elapsed() > Duration::from_secs(600) {
            bail!(
                "worker {}: {}/{} live; failures {:?}",
                args.worker,
                live(),
                args.count,
                sh.failures.borrow()
            );
        }
        if last.elapsed() > Duration::from_secs(5) {
            eprintln!("scale worker {}: {}/{} live", args.worker, live(), args.count);
            last = Instant::now();
        }
        sleep(Duration::from_millis(50)).await;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let heavy_secs = t_heavy.elapsed().as_secs_f64();
    let live_ready: Vec<usize> = sh.live.iter().map(Cell::get).collect();
    eprintln!(
        "scale worker {}: {} live in {connect_secs:.1} s ({n_big} big, {n_heavy} heavy); heavy subscribe {:?}",
        args.worker,
        live(),
        sh.heavy_sub.borrow().summary()
    );
    std::fs::write(args.dir.join(format!("ready-{}", args.worker)), b"ready\n")?;
    wait_file(&args.dir.join("go"), limit).await?;
    sh.counting.set(true);
    let ctl = (args.publish_rate > 0.0).then(|| PubControl::new(vec!["big".into()], vec![0], args.size));
    if let Some(ctl) = &ctl {
        let n = args.publishers.max(1);
        super::spawn_publishers(&env, ctl, n, &env.ep)
            .await
            .context("publishers")?;
        ctl.rate.set(args.publish_rate / f64::from(n));
        ctl.phase.set(1);
        ctl.running.set(true);
    }
    {
        let (sh, dir) = (sh.clone(), args.dir.clone());
        tokio::task::spawn_local(async move {
            if wait_file(&dir.join("drain"), limit).await.is_ok() {
                sh.period.set(1);
            }
            if wait_file(&dir.join("settled"), limit).await.is_ok() {
                sh.period.set(2);
            }
        });
    }
    wait_file(&args.dir.join("stop"), limit).await?;
    let published_path = args.dir.join("published");
    if let Some(ctl) = &ctl {
        ctl.running.set(false);
        // Let the last acknowledgements arrive.
        let sent = PubControl::get(&ctl.published, 1);
        let t = Instant::now();
        while ctl.acks.get() + ctl.nacks.borrow().values().sum::<u64>() < sent && t.elapsed() < Duration::from_secs(10)
        {
            sleep(Duration::from_millis(20)).await;
        }
        let tmp = args.dir.join("published.tmp");
        std::fs::write(&tmp, format!("{} {}\n", sent, ctl.acks.get()))?;
        std::fs::rename(&tmp, &published_path)?;
    }
    wait_file(&published_path, limit).await?;
    let text = std::fs::read_to_string(&published_path)?;
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    let (published, acknowledged) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    let settle = Instant::now();
    let unique = |m: &Vec<SeqTracker>| m.iter().map(SeqTracker::unique).sum::<u64>();
    let all_in = |sh: &Shared| sh.big.borrow().iter().all(|m| unique(m) >= published);
    while !all_in(&sh) && settle.elapsed().as_secs_f64() < args.settle_secs {
        sleep(Duration::from_millis(100)).await;
    }
    sh.counting.set(false);
    let check = {
        let big = sh.big.borrow();
        BigCheck {
            members: big.len(),
            published,
            acknowledged,
            complete: big.iter().filter(|m| unique(m) == published).count(),
            missing: big.iter().map(|m| published.saturating_sub(unique(m))).sum(),
            duplicates: big.iter().flatten().map(SeqTracker::duplicates).sum(),
        }
    };
    let report = ScaleReport {
        scenario: "scale",
        worker: args.worker,
        first: args.first,
        count: args.count,
        big: n_big,
        heavy: n_heavy,
        idle: args.count - n_big - n_heavy,
        connect_secs,
        heavy_secs,
        failures: sh.failures.borrow().clone(),
        disconnects: sh.disconnects.borrow().clone(),
        per_url: (0..n)
            .map(|u| PerUrl {
                url: all[u].clone(),
                live_ready: live_ready[u],
                live_end: sh.live[u].get(),
                delivered: sh.delivered[u][0].get(),
                delivered_after_drain: sh.delivered[u][1].get(),
                delivered_settled: sh.delivered[u][2].get(),
                latency: sh.latency[u][0].borrow().summary(),
                latency_after_drain: sh.latency[u][1].borrow().summary(),
                latency_settled: sh.latency[u][2].borrow().summary(),
            })
            .collect(),
        heavy_subscribe: sh.heavy_sub.borrow().summary(),
        heavy_resume: sh.heavy_resume.borrow().summary(),
        moved: sh.moved.get(),
        moved_back: sh.moved_back.get(),
        moved_clients: sh.moved_clients.get(),
        moved_back_clients: sh.moved_back_clients.get(),
        moved_time: sh.moved_time.borrow().summary(),
        not_recovered: sh.not_recovered.get(),
        refused_rooms: sh.refused_rooms.get(),
        check,
        publisher: ctl.map(|c| PublisherFigures {
            published: PubControl::get(&c.published, 1),
            acks: c.acks.get(),
            nacks: c.nacks.borrow().clone(),
            failures: c.failures.borrow().clone(),
        }),
    };
    for t in &tasks {
        t.abort();
    }
    Ok(report)
}
