//! `fanout` (and `cluster`): N subscribers in one room, publishers at a rate
//! stepped up until loss or p99 over a bound.
//!
//! Two ceilings come out of one sweep: the *strict* one (zero loss, no
//! duplicates, p99 <= 100 ms by default) and the *keep-up* one (zero loss,
//! p99 <= 1 s). Steps grow geometrically, stop at the first keep-up failure,
//! then bisect once between the last pass and the first failure of each
//! criterion. `cluster` is one fixed-rate step with the publisher on another
//! node than the subscribers.

use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::{Bounds, Env, Fleet, PubControl, StepResult, SubPlan, TargetArgs};
use crate::conn::{Endpoint, Target};
use crate::stats::Recorder;

#[derive(clap::Args, Clone, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Subscribers in the room.
    #[arg(long, default_value_t = 1_000)]
    pub subs: usize,
    /// Publishers sharing the rate.
    #[arg(long, default_value_t = 1)]
    pub publishers: u16,
    /// Payload bytes (for the gateway: the JSON `data` value, quotes included).
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Room (NATS subject) name.
    #[arg(long, default_value = "bench")]
    pub room: String,
    /// Explicit deliveries/s steps (comma separated) instead of a geometric sweep.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// First step of the sweep, deliveries/s.
    #[arg(long, default_value_t = 100_000.0)]
    pub start_dps: f64,
    /// Growth factor between steps.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Highest step of the sweep, deliveries/s.
    #[arg(long, default_value_t = 8_000_000.0)]
    pub max_dps: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 10.0)]
    pub step_secs: f64,
    /// Strict criterion: p99 bound in ms (plus zero loss).
    #[arg(long, default_value_t = 100.0)]
    pub strict_p99_ms: f64,
    /// Keep-up criterion: p99 bound in ms (plus zero loss).
    #[arg(long, default_value_t = 1_000.0)]
    pub keepup_p99_ms: f64,
    /// Bisection steps after the sweep, per criterion.
    #[arg(long, default_value_t = 1)]
    pub refine: u32,
    /// Keep stepping after a keep-up failure (explicit --rates only).
    #[arg(long)]
    pub no_stop: bool,
    /// Publish through another node (cluster): its WebSocket URL.
    #[arg(long)]
    pub pub_url: Option<String>,
    /// Initial read buffer per subscriber, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub read_buf: usize,
    /// Measure latency on one subscriber in K (every K-th, so spread evenly
    /// over the room's join order); the others are read between messages,
    /// once the measured ones have the latest, and count for loss only.
    /// For fixed low rates to a big room, where reading every socket at once
    /// would make the generator, not the server, the latency (1: all).
    #[arg(long, default_value_t = 1)]
    pub measure_every: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub target: Target,
    pub subs: usize,
    pub publishers: u16,
    pub size: usize,
    pub connect_secs: f64,
    pub bounds: Bounds,
    pub steps: Vec<StepResult>,
    /// Highest delivered deliveries/s of a step passing the strict criterion.
    pub strict_ceiling_dps: Option<f64>,
    pub strict_ceiling_p99_ms: Option<f64>,
    /// Highest delivered deliveries/s of a step passing the keep-up criterion.
    pub keepup_ceiling_dps: Option<f64>,
    pub keepup_ceiling_p99_ms: Option<f64>,
    /// Highest load-generator CPU of any step, cores.
    pub loadgen_cpu_max: f64,
    pub client_saturated: bool,
    /// Publish commands the server refused, by error code.
    pub publish_errors: std::collections::BTreeMap<String, u64>,
    pub notes: Vec<String>,
}

pub async fn run(args: &FanoutArgs) -> Result<FanoutReport> {
    let env = Env::new(&args.target, args.subs)?;
    let pub_ep = match &args.pub_url {
        Some(u) => Endpoint::parse(args.target.target, u)?,
        None => env.ep.clone(),
    };
    let fleet = Rc::new(Fleet::default());
    let rec = Recorder::shared();
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.subs);
    let every = args.measure_every.max(1);
    let (turns, turn) = tokio::sync::watch::channel(0u64);
    if every > 1 {
        let measured = args.subs.div_ceil(every) as u64;
        tasks.push(tokio::task::spawn_local(super::lazy_turns(
            rec.clone(),
            measured,
            turns,
            Duration::from_millis(500),
        )));
    }
    for index in 0..args.subs {
        let plan = SubPlan {
            index,
            rooms: vec![args.room.clone()],
            go: None,
            sub_time: None,
            reconnect: true,
            read_buf: args.read_buf,
            lazy: (!index.is_multiple_of(every)).then(|| turn.clone()),
        };
        tasks.push(tokio::task::spawn_local(super::subscriber(
            env.clone(),
            fleet.clone(),
            rec.clone(),
            plan,
        )));
    }
    let result = sweep(args, &env, &fleet, &rec, &pub_ep, t0).await;
    for t in &tasks {
        t.abort();
    }
    result
}

async fn sweep(
    args: &FanoutArgs,
    env: &Rc<Env>,
    fleet: &Fleet,
    rec: &std::cell::RefCell<Recorder>,
    pub_ep: &Endpoint,
    t0: Instant,
) -> Result<FanoutReport> {
    let limit = Duration::from_secs(60 + args.subs as u64 / 100);
    super::wait_live(
        fleet,
        args.subs,
        &format!("connecting {} subscribers", args.subs),
        limit,
    )
    .await?;
    let connect_secs = t0.elapsed().as_secs_f64();
    eprintln!("{} subscribers live in {connect_secs:.1} s", args.subs);
    let ctl = PubControl::new(vec![args.room.clone()], vec![args.subs as u64], args.size);
    super::spawn_publishers(env, &ctl, args.publishers, pub_ep).await?;
    let bounds = Bounds {
        strict_p99_ms: args.strict_p99_ms,
        keepup_p99_ms: args.keepup_p99_ms,
        min_rate_fraction: 0.95,
        saturated_cpu: 0.9,
    };
    let drain = Duration::from_secs_f64(args.keepup_p99_ms / 1000.0 + 2.0);
    let mut notes = Vec::new();

    // Warm-up, not judged: phase 0 at the first rate for one second.
    let first = args.rates.first().copied().unwrap_or(args.start_dps);
    super::run_step(env, &ctl, fleet, rec, 0, first, 1.0, drain, &bounds, args.publishers).await?;

    let explicit = !args.rates.is_empty();
    let mut rates: Vec<f64> = args.rates.clone();
    if !explicit {
        let mut r = args.start_dps;
        while r <= args.max_dps * 1.0001 && rates.len() < 30 {
            rates.push(r);
            r *= args.factor.max(1.05);
        }
    }
    let mut steps: Vec<StepResult> = Vec::new();
    let mut phase = 1u32;
    let step =
        async |rate: f64, steps: &mut Vec<StepResult>, phase: &mut u32, notes: &mut Vec<String>| -> Result<bool> {
            if let Some(prev) = steps.last()
                && !prev.keepup_ok
            {
                super::quiesce(rec, prev.phase, Duration::from_secs(10)).await;
            }
            if let Err(e) =
                super::wait_live(fleet, args.subs, "reconnecting subscribers", Duration::from_secs(30)).await
            {
                notes.push(format!("stopped: {e}"));
                return Ok(false);
            }
            let s = super::run_step(
                env,
                &ctl,
                fleet,
                rec,
                *phase,
                rate,
                args.step_secs,
                drain,
                &bounds,
                args.publishers,
            )
            .await?;
            eprintln!("{}", step_line(&s));
            *phase += 1;
            let ok = s.keepup_ok;
            steps.push(s);
            Ok(ok)
        };
    for &rate in &rates {
        let ok = step(rate, &mut steps, &mut phase, &mut notes).await?;
        let keep_going = ok || (explicit && args.no_stop);
        if !keep_going {
            break;
        }
    }
    if !explicit {
        for _ in 0..args.refine {
            for strict in [true, false] {
                let pass = |s: &StepResult| if strict { s.strict_ok } else { s.keepup_ok };
                let best = steps
                    .iter()
                    .filter(|s| pass(s))
                    .map(|s| s.target_dps)
                    .fold(None, max_opt);
                let Some(best) = best else { continue };
                let fail = steps
                    .iter()
                    .filter(|s| !pass(s) && s.target_dps > best)
                    .map(|s| s.target_dps)
                    .fold(None, min_opt);
                let Some(fail) = fail else { continue };
                let mid = (best * fail).sqrt();
                if fail / best > 1.1 && !steps.iter().any(|s| (s.target_dps / mid - 1.0).abs() < 0.02) {
                    step(mid, &mut steps, &mut phase, &mut notes).await?;
                }
            }
        }
    }
    let best_of = |strict: bool| {
        steps
            .iter()
            .filter(|s| if strict { s.strict_ok } else { s.keepup_ok })
            .max_by(|a, b| a.delivered_dps.total_cmp(&b.delivered_dps))
    };
    let (strict, keepup) = (best_of(true), best_of(false));
    let loadgen_cpu_max = steps.iter().map(|s| s.loadgen_cpu).fold(0.0, f64::max);
    let client_saturated = steps.iter().any(|s| s.client_saturated);
    if client_saturated {
        notes.push("the load generator saturated in at least one step; see steps".into());
    }
    Ok(FanoutReport {
        scenario: if args.pub_url.is_some() { "cluster" } else { "fanout" },
        target: args.target.target,
        subs: args.subs,
        publishers: args.publishers,
        size: args.size,
        connect_secs,
        bounds,
        strict_ceiling_dps: strict.map(|s| s.delivered_dps),
        strict_ceiling_p99_ms: strict.map(|s| s.latency.p99_ms),
        keepup_ceiling_dps: keepup.map(|s| s.delivered_dps),
        keepup_ceiling_p99_ms: keepup.map(|s| s.latency.p99_ms),
        loadgen_cpu_max,
        client_saturated,
        publish_errors: ctl.nacks.borrow().clone(),
        steps,
        notes,
    })
}

fn max_opt(a: Option<f64>, b: f64) -> Option<f64> {
    Some(a.map_or(b, |a| a.max(b)))
}

fn min_opt(a: Option<f64>, b: f64) -> Option<f64> {
    Some(a.map_or(b, |a| a.min(b)))
}

pub fn step_line(s: &StepResult) -> String {
    format!(
        "  step {:>2}: target {:>9.0}/s delivered {:>9.0}/s p50 {:>7.2} p99 {:>8.2} max {:>8.1} ms lost {} dup {} | cpu loadgen {:.2} server {} | {}{}{}",
        s.phase,
        s.target_dps,
        s.delivered_dps,
        s.latency.p50_ms,
        s.latency.p99_ms,
        s.latency.max_ms,
        s.lost,
        s.duplicates,
        s.loadgen_cpu,
        s.server_cpu.map_or("-".into(), |c| format!("{c:.2}")),
        if s.strict_ok {
            "strict ok"
        } else if s.keepup_ok {
            "keep-up ok"
        } else {
            "FAIL"
        },
        if s.note.is_empty() { "" } else { ": " },
        s.note
    )
}

/// The `cluster` scenario's arguments: a fixed rate across two nodes.
#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// URL of the node the publisher talks to (the subscribers use --url).
    #[arg(long)]
    pub pub_url: String,
    #[arg(long, default_value_t = 1_000)]
    pub subs: usize,
    /// Deliveries per second.
    #[arg(long, default_value_t = 100_000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Publishing connections (a gateway answers one connection's durable
    /// publishes one after another, each after its stream acknowledgement).
    #[arg(long, default_value_t = 1)]
    pub publishers: u16,
}

pub async fn run_cluster(args: &ClusterArgs) -> Result<FanoutReport> {
    let f = FanoutArgs {
        target: args.target.clone(),
        subs: args.subs,
        publishers: args.publishers,
        size: args.size,
        room: "cluster-bench".into(),
        rates: vec![args.rate],
        start_dps: args.rate,
        factor: 1.5,
        max_dps: args.rate,
        step_secs: args.secs,
        strict_p99_ms: 100.0,
        keepup_p99_ms: 1_000.0,
        refine: 0,
        no_stop: true,
        pub_url: Some(args.pub_url.clone()),
        read_buf: 16 * 1024,
        measure_every: 1,
    };
    run(&f).await
}
