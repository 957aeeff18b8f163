//! `rooms`: M users, each subscribing to K rooms (2,000 by default) in one
//! frame, then traffic spread over all rooms.
//!
//! User u takes K consecutive rooms starting at u * stride of a pool of Q
//! rooms (stride = Q / M), so every room has the same number of members and
//! each message owes exactly that many deliveries. Subscribe frames are sent
//! at times spread evenly over `--arrival-secs` (0: all at once), so each
//! user's round trip is measured while the others do the same.

use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tokio::sync::watch;

use super::{Bounds, Env, Fleet, PubControl, StepResult, SubPlan, TargetArgs};
use crate::conn::Target;
use crate::stats::{Hist, Latency, Recorder};

#[derive(clap::Args, Clone, Debug)]
pub struct RoomsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Users.
    #[arg(long, default_value_t = 1_000)]
    pub users: usize,
    /// Rooms per user, subscribed in one frame.
    #[arg(long, default_value_t = 2_000)]
    pub rooms_per_user: usize,
    /// Rooms in the pool.
    #[arg(long, default_value_t = 10_000)]
    pub pool: usize,
    /// Subscribe frames are spread evenly over this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub arrival_secs: f64,
    /// Deliveries per second of the traffic phase (0: no traffic).
    #[arg(long, default_value_t = 200_000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    #[arg(long, default_value_t = 1)]
    pub publishers: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoomsReport {
    pub scenario: &'static str,
    pub target: Target,
    pub users: usize,
    pub rooms_per_user: usize,
    pub pool: usize,
    pub members_per_room: u64,
    pub arrival_secs: f64,
    /// Subscribe round trip per user.
    pub subscribe: Latency,
    pub refused_rooms: u64,
    pub failures: std::collections::BTreeMap<String, u64>,
    pub traffic: Option<StepResult>,
}

pub async fn run(args: &RoomsArgs) -> Result<RoomsReport> {
    let env = Env::new(&args.target, args.users)?;
    let fleet = Rc::new(Fleet::default());
    let rec = Recorder::shared();
    let sub_time: Rc<std::cell::RefCell<Hist>> = Rc::default();
    let pool = args.pool.max(1);
    let k = args.rooms_per_user.min(pool);
    let stride = (pool / args.users.max(1)).max(1);
    let names: Vec<String> = (0..pool).map(|r| format!("r{r}")).collect();
    let mut members = vec![0u64; pool];
    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(args.users);
    for u in 0..args.users {
        let rooms: Vec<String> = (0..k).map(|j| names[(u * stride + j) % pool].clone()).collect();
        for j in 0..k {
            members[(u * stride + j) % pool] += 1;
        }
        // Interleave arrival order so neighbours in the pool do not arrive together.
        let slot = (u * 7919) % args.users.max(1);
        let offset = Duration::from_secs_f64(args.arrival_secs * slot as f64 / args.users.max(1) as f64);
        let plan = SubPlan {
            index: u,
            rooms,
            go: Some((go_rx.clone(), offset)),
            sub_time: Some(sub_time.clone()),
            reconnect: false,
            read_buf: 16 * 1024,
            lazy: None,
        };
        tasks.push(tokio::task::spawn_local(super::subscriber(
            env.clone(),
            fleet.clone(),
            rec.clone(),
            plan,
        )));
    }
    let result = async {
        let t0 = Instant::now();
        while fleet.connected.get() + (fleet.failed() as usize) < args.users {
            if t0.elapsed() > Duration::from_secs(120) {
                anyhow::bail!(
                    "only {} users connected; failures {:?}",
                    fleet.connected.get(),
                    fleet.failures.borrow()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "{} users connected; subscribing {k} rooms each over {:.1} s",
            fleet.connected.get(),
            args.arrival_secs
        );
        go_tx.send_replace(true);
        let want = fleet.connected.get();
        super::wait_live(
            &fleet,
            want,
            "subscribing",
            Duration::from_secs_f64(args.arrival_secs + 120.0),
        )
        .await?;
        let subscribe = sub_time.borrow().summary();
        eprintln!(
            "subscribe round trip: p50 {:.2} p99 {:.2} max {:.2} ms",
            subscribe.p50_ms, subscribe.p99_ms, subscribe.max_ms
        );
        let traffic = if args.rate > 0.0 {
            let ctl = PubControl::new(names.clone(), members.clone(), args.size);
            super::spawn_publishers(&env, &ctl, args.publishers, &env.ep).await?;
            let bounds = Bounds {
                strict_p99_ms: 100.0,
                keepup_p99_ms: 1_000.0,
                min_rate_fraction: 0.95,
                saturated_cpu: 0.9,
            };
            let s = super::run_step(
                &env,
                &ctl,
                &fleet,
                &rec,
                1,
                args.rate,
                args.secs,
                Duration::from_secs(3),
                &bounds,
                args.publishers,
            )
            .await?;
            eprintln!("{}", super::fanout::step_line(&s));
            Some(s)
        } else {
            None
        };
        Ok(RoomsReport {
            scenario: "rooms",
            target: args.target.target,
            users: args.users,
            rooms_per_user: k,
            pool,
            members_per_room: members.iter().copied().max().unwrap_or(0),
            arrival_secs: args.arrival_secs,
            subscribe,
            refused_rooms: fleet.refused_rooms.get(),
            failures: fleet.failures.borrow().clone(),
            traffic,
        })
    }
    .await;
    for t in &tasks {
        t.abort();
    }
    result
}
