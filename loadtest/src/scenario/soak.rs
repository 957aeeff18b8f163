//! `soak`: N connections spread over R rooms (one room each) held for a
//! long time under steady traffic, the server sampled every interval: RSS,
//! open file descriptors, OS threads, the runtime's live tasks (from the
//! gateway's `/metrics`), and each interval's deliveries/s and latency.
//! Memory should be flat after warm-up; a leak shows as a slope.

use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{Bounds, Env, Fleet, PubControl, StepResult, SubPlan, TargetArgs};
use crate::stats::Recorder;

#[derive(clap::Args, Clone, Debug)]
pub struct SoakArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections to hold.
    #[arg(long, default_value_t = 19_000)]
    pub conns: usize,
    /// Rooms; connection i joins room i mod R.
    #[arg(long, default_value_t = 3_000)]
    pub rooms: usize,
    /// Messages published per second (each owes one delivery per member).
    #[arg(long, default_value_t = 500.0)]
    pub msgs: f64,
    /// Length of the soak.
    #[arg(long, default_value_t = 1_800.0)]
    pub secs: f64,
    /// Sampling interval (one load step each).
    #[arg(long, default_value_t = 60.0)]
    pub sample_secs: f64,
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    #[arg(long, default_value_t = 2)]
    pub publishers: u16,
    /// The gateway's metrics URL (http://HOST:PORT/metrics) for its task count.
    #[arg(long)]
    pub metrics_url: Option<String>,
}

/// One sample of the server, taken at the end of an interval.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub t_secs: f64,
    pub rss_bytes: Option<u64>,
    pub fds: Option<usize>,
    pub threads: Option<u64>,
    pub tasks: Option<u64>,
    pub connected: usize,
    pub step: StepResult,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub scenario: &'static str,
    pub conns: usize,
    pub rooms: usize,
    pub msgs_per_sec: f64,
    pub connected: usize,
    pub connect_secs: f64,
    pub failures: std::collections::BTreeMap<String, u64>,
    pub samples: Vec<Sample>,
}

/// `gateway_tasks_alive` from the gateway's metrics (plain HTTP GET).
async fn tasks(url: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
    let req = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&buf)
        .lines()
        .find_map(|l| l.strip_prefix("gateway_tasks_alive "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

pub async fn run(args: &SoakArgs) -> Result<SoakReport> {
    let env = Env::new(&args.target, args.conns)?;
    let fleet = Rc::new(Fleet::default());
    let rec = Recorder::shared();
    let rooms = args.rooms.max(1);
    let names: Vec<String> = (0..rooms).map(|r| format!("soak-{r}")).collect();
    let mut members = vec![0u64; rooms];
    let t0 = Instant::now();
    let mut tasks_v = Vec::with_capacity(args.conns);
    for index in 0..args.conns {
        members[index % rooms] += 1;
        let plan = SubPlan {
            index,
            rooms: vec![names[index % rooms].clone()],
            go: None,
            sub_time: None,
            reconnect: true,
            read_buf: 4096,
            lazy: None,
        };
        tasks_v.push(tokio::task::spawn_local(super::subscriber(
            env.clone(),
            fleet.clone(),
            rec.clone(),
            plan,
        )));
    }
    let limit = Duration::from_secs(120 + args.conns as u64 / 100);
    while fleet.live.get() + (fleet.failed() as usize) < args.conns && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected = fleet.live.get();
    eprintln!(
        "soak: {connected}/{} connections in {connect_secs:.1} s; failures {:?}",
        args.conns,
        fleet.failures.borrow()
    );
    let ctl = PubControl::new(names, members.clone(), args.size);
    super::spawn_publishers(&env, &ctl, args.publishers, &env.ep)
        .await
        .context("publishers")?;
    let per_msg = members.iter().sum::<u64>() as f64 / rooms as f64;
    let bounds = Bounds {
        strict_p99_ms: 100.0,
        keepup_p99_ms: 1_000.0,
        min_rate_fraction: 0.9,
        saturated_cpu: 0.95,
    };
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut phase = 1;
    eprintln!("     t  rss MB   fds  threads  tasks  conns  | step");
    while start.elapsed().as_secs_f64() < args.secs {
        let step = super::run_step(
            &env,
            &ctl,
            &fleet,
            &rec,
            phase,
            args.msgs * per_msg,
            args.sample_secs,
            Duration::from_secs(2),
            &bounds,
            args.publishers,
        )
        .await?;
        phase += 1;
        let pid = env.server_pid;
        let s = Sample {
            t_secs: start.elapsed().as_secs_f64(),
            rss_bytes: env.server().map(|p| p.rss_bytes),
            fds: pid.and_then(crate::procfs::fds),
            threads: pid.and_then(crate::procfs::threads),
            tasks: match &args.metrics_url {
                Some(u) => tasks(u).await,
                None => None,
            },
            connected: fleet.live.get(),
            step,
        };
        eprintln!(
            "{:6.0} {:7.1} {:>5} {:>8} {:>6} {:>6}  |{}",
            s.t_secs,
            s.rss_bytes.map_or(0.0, |b| b as f64 / 1e6),
            s.fds.map_or("-".into(), |v| v.to_string()),
            s.threads.map_or("-".into(), |v| v.to_string()),
            s.tasks.map_or("-".into(), |v| v.to_string()),
            s.connected,
            super::fanout::step_line(&s.step)
        );
        samples.push(s);
    }
    for t in &tasks_v {
        t.abort();
    }
    Ok(SoakReport {
        scenario: "soak",
        conns: args.conns,
        rooms,
        msgs_per_sec: args.msgs,
        connected,
        connect_secs,
        failures: fleet.failures.borrow().clone(),
        samples,
    })
}
