//! `storm`: C clients connecting at once, each with its own signed JWT
//! (HS256, RS256 or ES256). Reports the time until all are connected,
//! refusals by kind, and the server's peak memory (sampled every 10 ms, and
//! its lifetime VmHWM).
//!
//! Tokens are signed before the clock starts, so the storm measures the
//! server's verification, not the client's signing. nats-server's WebSocket
//! listener is run without auth (its JWTs are NATS's own nkey scheme), which
//! favours nats-server; the report says so.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::{Env, TargetArgs};
use crate::conn::{Conn, OpenOpts, Target, source_addr};
use crate::procfs::{self, CpuMeter};
use crate::progress::Progress;
use crate::stats::{Hist, Latency};
use crate::tokens::{Alg, Signer};

#[derive(clap::Args, Clone, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Clients connecting at once.
    #[arg(long, default_value_t = 19_000)]
    pub clients: usize,
    /// Token algorithm.
    #[arg(long, value_enum, default_value = "hs256")]
    pub alg: Alg,
    /// Private key (PKCS#8 PEM) for RS256/ES256; see `loadtest keygen`.
    #[arg(long)]
    pub jwt_key: Option<PathBuf>,
    /// Start clients at this rate per second instead of all at once (0: at once).
    #[arg(long, default_value_t = 0.0)]
    pub ramp_per_sec: f64,
    /// Seconds to hold the connections after the storm.
    #[arg(long, default_value_t = 1.0)]
    pub hold_secs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StormReport {
    pub scenario: &'static str,
    pub target: Target,
    pub alg: Alg,
    pub clients: usize,
    pub connected: usize,
    pub refusals: BTreeMap<String, u64>,
    /// Seconds from the first attempt until the last client was connected
    /// (None unless every client connected).
    pub all_connected_secs: Option<f64>,
    /// Seconds until the last attempt ended, connected or not.
    pub finished_secs: f64,
    pub connect_latency: Latency,
    pub signing_secs: f64,
    pub server_rss_before: Option<u64>,
    /// Highest sampled server RSS during the storm and hold.
    pub server_rss_peak: Option<u64>,
    pub server_hwm: Option<u64>,
    /// Server CPU seconds spent from the first attempt to the last.
    pub server_cpu_secs: Option<f64>,
    pub loadgen_cpu: f64,
    /// Connection attempts the kernel dropped because a listen backlog was
    /// full during the storm (machine-wide counter; SYN retransmits follow).
    pub listen_overflows: Option<u64>,
    pub notes: Vec<String>,
}

pub async fn run(args: &StormArgs) -> Result<StormReport> {
    let env = Env::new(&args.target, args.clients)?;
    let signer = match args.alg {
        Alg::Hs256 => Signer::hs256(&args.target.jwt_secret),
        alg => Signer::from_pem(
            alg,
            args.jwt_key
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--jwt-key is required for {alg:?}"))?,
        )?,
    };
    let mut notes = Vec::new();
    let ts = Instant::now();
    let mut opts = Vec::with_capacity(args.clients);
    let mut bar = Progress::new(
        format!("signing {} {:?} tokens", args.clients, args.alg),
        args.clients as u64,
    );
    for i in 0..args.clients {
        let token = match env.target() {
            Target::GwJson | Target::GwProto => Some(signer.sign(&format!("storm-{i}"))?),
            Target::NatsWs => None,
        };
        opts.push(OpenOpts {
            source: source_addr(i, env.source_ips),
            token,
            read_buf: 1024,
            timeout: env.connect_timeout,
            raw: false,
        });
        bar.set(i as u64, "");
    }
    bar.finish();
    let signing_secs = ts.elapsed().as_secs_f64();
    if env.target() == Target::NatsWs {
        notes.push("nats-server: no per-client token verification (no auth configured)".into());
    }

    let before = env.server();
    let peak = Rc::new(Cell::new(before.map_or(0, |s| s.rss_bytes)));
    let sampling = Rc::new(Cell::new(true));
    let sampler = env.server_pid.map(|pid| {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::task::spawn_local(async move {
            while sampling.get() {
                if let Ok(s) = procfs::sample(&pid.to_string()) {
                    peak.set(peak.get().max(s.rss_bytes));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    });
    let server_cpu = env.server_meter();
    let me = CpuMeter::start("self")?;
    let overflows0 = procfs::listen_overflows().ok();
    let held: Rc<RefCell<Vec<Conn>>> = Rc::new(RefCell::new(Vec::with_capacity(args.clients)));
    let refusals: Rc<RefCell<BTreeMap<String, u64>>> = Rc::default();
    let hist: Rc<RefCell<Hist>> = Rc::default();
    let last_ok = Rc::new(Cell::new(Duration::ZERO));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for (i, o) in opts.into_iter().enumerate() {
        if args.ramp_per_sec > 0.0 {
            let due = Duration::from_secs_f64(i as f64 / args.ramp_per_sec);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let (env, held, refusals, hist, last_ok) = (
            env.clone(),
            held.clone(),
            refusals.clone(),
            hist.clone(),
            last_ok.clone(),
        );
        tasks.push(tokio::task::spawn_local(async move {
            match Conn::open(&env.ep, &o).await {
                Ok(c) => {
                    let at = t0.elapsed();
                    hist.borrow_mut().record_us(at.as_micros() as u64);
                    last_ok.set(last_ok.get().max(at));
                    held.borrow_mut().push(c);
                }
                Err(e) => *refusals.borrow_mut().entry(e.kind()).or_default() += 1,
            }
        }));
    }
    let mut bar = Progress::new("storm", args.clients as u64);
    for (i, t) in tasks.into_iter().enumerate() {
        let _ = t.await;
        bar.set(
            i as u64 + 1,
            &format!("refused {}", refusals.borrow().values().sum::<u64>()),
        );
    }
    bar.finish();
    let finished_secs = t0.elapsed().as_secs_f64();
    let server_cpu_secs = server_cpu.and_then(|m| m.read().ok()).map(|(c, _)| c * finished_secs);
    let (loadgen_cpu, _) = me.read()?;
    let listen_overflows = overflows0
        .zip(procfs::listen_overflows().ok())
        .map(|(a, b)| b.saturating_sub(a));
    if let Some(n) = listen_overflows.filter(|n| *n > 0) {
        notes.push(format!(
            "{n} SYNs dropped on a full listen backlog: clients waited for SYN retransmits"
        ));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
    sampling.set(false);
    if let Some(s) = sampler {
        let _ = s.await;
    }
    let end = env.server();
    let connected = held.borrow().len();
    let report = StormReport {
        scenario: "storm",
        target: env.target(),
        alg: args.alg,
        clients: args.clients,
        connected,
        refusals: refusals.borrow().clone(),
        all_connected_secs: (connected == args.clients).then(|| last_ok.get().as_secs_f64()),
        finished_secs,
        connect_latency: hist.borrow().summary(),
        signing_secs,
        server_rss_before: before.map(|s| s.rss_bytes),
        server_rss_peak: env.server_pid.map(|_| peak.get()),
        server_hwm: end.map(|s| s.hwm_bytes),
        server_cpu_secs,
        loadgen_cpu,
        listen_overflows,
        notes,
    };
    held.borrow_mut().clear();
    Ok(report)
}
