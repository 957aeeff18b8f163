//! `idle`: N authenticated connections, each subscribed to one room, doing
//! nothing. Reports the server's RSS per connection (RSS after minus RSS
//! before, over N) and, separately, kernel TCP memory from /proc/net/sockstat
//! (which counts both ends of every loopback connection).

use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tokio::time::sleep;

use super::{Env, Fleet, SubPlan, TargetArgs};
use crate::conn::Target;
use crate::procfs::{self, SockStat};
use crate::stats::Recorder;

#[derive(clap::Args, Clone, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections to hold.
    #[arg(long, default_value_t = 19_000)]
    pub conns: usize,
    /// Distinct rooms; connection i joins room i mod R.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Seconds to wait after the last connection before measuring.
    #[arg(long, default_value_t = 3.0)]
    pub settle_secs: f64,
    /// Seconds to keep holding (answering pings) after the first measurement.
    #[arg(long, default_value_t = 5.0)]
    pub hold_secs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub target: Target,
    pub conns: usize,
    pub rooms: usize,
    pub connected: usize,
    pub failures: std::collections::BTreeMap<String, u64>,
    pub disconnects: std::collections::BTreeMap<String, u64>,
    pub connect_secs: f64,
    pub server_rss_before: Option<u64>,
    pub server_rss_after: Option<u64>,
    pub server_rss_end: Option<u64>,
    /// (RSS at the end - RSS before) / connections, bytes.
    pub server_rss_per_conn: Option<f64>,
    pub sockstat_before: SockStat,
    pub sockstat_after: SockStat,
    /// Kernel TCP memory added per connection (both loopback ends), bytes.
    pub kernel_tcp_mem_per_conn: f64,
    pub loadgen_rss_per_conn: f64,
}

pub async fn run(args: &IdleArgs) -> Result<IdleReport> {
    let env = Env::new(&args.target, args.conns)?;
    let fleet = Rc::new(Fleet::default());
    let rec = Recorder::shared();
    let before = env.server();
    let sock_before = procfs::sockstat()?;
    let me_before = procfs::sample("self")?;
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.conns);
    for index in 0..args.conns {
        let plan = SubPlan {
            index,
            rooms: vec![format!("idle-{}", index % args.rooms.max(1))],
            go: None,
            sub_time: None,
            reconnect: false,
            read_buf: 1024,
            lazy: None,
        };
        tasks.push(tokio::task::spawn_local(super::subscriber(
            env.clone(),
            fleet.clone(),
            rec.clone(),
            plan,
        )));
    }
    let limit = Duration::from_secs(60 + args.conns as u64 / 200);
    let mut bar = crate::progress::Progress::new(format!("connecting {} idle clients", args.conns), args.conns as u64);
    let settled = |f: &Fleet| f.live.get() + (f.failed() + f.disconnected()) as usize >= args.conns;
    while !settled(&fleet) && t0.elapsed() < limit {
        bar.set(fleet.live.get() as u64, &format!("failed {}", fleet.failed()));
        sleep(Duration::from_millis(50)).await;
    }
    bar.finish();
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected = fleet.live.get();
    eprintln!(
        "{connected}/{} idle connections in {connect_secs:.1} s; failures {:?}",
        args.conns,
        fleet.failures.borrow()
    );
    sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let after = env.server();
    let sock_after = procfs::sockstat()?;
    let me_after = procfs::sample("self")?;
    sleep(Duration::from_secs_f64(args.hold_secs)).await;
    let end = env.server();
    let n = connected.max(1) as f64;
    let report = IdleReport {
        scenario: "idle",
        target: args.target.target,
        conns: args.conns,
        rooms: args.rooms,
        connected,
        failures: fleet.failures.borrow().clone(),
        disconnects: fleet.disconnects.borrow().clone(),
        connect_secs,
        server_rss_before: before.map(|s| s.rss_bytes),
        server_rss_after: after.map(|s| s.rss_bytes),
        server_rss_end: end.map(|s| s.rss_bytes),
        server_rss_per_conn: before
            .zip(end.or(after))
            .map(|(b, e)| (e.rss_bytes as f64 - b.rss_bytes as f64) / n),
        sockstat_before: sock_before,
        sockstat_after: sock_after,
        kernel_tcp_mem_per_conn: (sock_after.tcp_mem_bytes as f64 - sock_before.tcp_mem_bytes as f64) / n,
        loadgen_rss_per_conn: (me_after.rss_bytes as f64 - me_before.rss_bytes as f64) / n,
    };
    for t in &tasks {
        t.abort();
    }
    Ok(report)
}
