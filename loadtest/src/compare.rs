//! `compare`: one run, both systems. Starts the gateway and nats-server (with
//! its WebSocket listener) pinned to one CPU with `taskset`, runs the fan-out,
//! idle and storm scenarios against each in turn with this process (which
//! `compare.sh` pins to the other CPU), and prints one side-by-side table
//! with the gateway's advantage as a ratio. The `-deflate` systems are the
//! same servers with WebSocket compression: every client offers
//! `permessage-deflate` and inflates what comes compressed, nats-server runs
//! with `compression: true` in its `websocket` block.
//!
//! Every scenario gets a freshly started server, so peak-memory figures
//! (VmHWM) and RSS baselines belong to that scenario alone. Servers are
//! killed when their scenario ends, also when it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::conn::Target;
use crate::report;
use crate::scenario::TargetArgs;
use crate::scenario::fanout::{self, FanoutArgs};
use crate::scenario::idle::{self, IdleArgs};
use crate::scenario::storm::{self, StormArgs};
use crate::tokens::Alg;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum System {
    Nats,
    Gateway,
    #[value(name = "nats-deflate")]
    NatsDeflate,
    #[value(name = "gateway-deflate")]
    GatewayDeflate,
}

impl System {
    fn is_gateway(self) -> bool {
        matches!(self, System::Gateway | System::GatewayDeflate)
    }

    fn deflate(self) -> bool {
        matches!(self, System::NatsDeflate | System::GatewayDeflate)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Scenario {
    #[value(name = "fanout-1k")]
    Fanout1k,
    #[value(name = "fanout-10k")]
    Fanout10k,
    Idle,
    Storm,
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The gateway binary (built by compare.sh).
    #[arg(long, default_value = "target/release/gateway")]
    pub gateway_bin: PathBuf,
    /// The nats-server binary (compare.sh gets it from scripts/ensure-nats.sh).
    #[arg(long)]
    pub nats_bin: PathBuf,
    /// Directory for JSON results, server logs and the table.
    #[arg(long, default_value = "target/loadtest")]
    pub out: PathBuf,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "nats,gateway")]
    pub systems: Vec<System>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fanout-1k,fanout-10k,idle,storm"
    )]
    pub scenarios: Vec<Scenario>,
    /// CPU list the servers are pinned to (taskset -c); empty: no pinning.
    #[arg(long, default_value = "0")]
    pub server_cpus: String,
    /// Seconds per fan-out step.
    #[arg(long, default_value_t = 10.0)]
    pub step_secs: f64,
    #[arg(long, default_value_t = 19_000)]
    pub idle_conns: usize,
    #[arg(long, default_value_t = 19_000)]
    pub storm_clients: usize,
    /// Small sizes and short steps: a smoke test of the whole pipeline.
    #[arg(long)]
    pub quick: bool,
    /// Extra gateway arguments (whitespace separated).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub gateway_args: String,
}

struct Server {
    child: Child,
    pid: u32,
    url: String,
    target: Target,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pinned(cpus: &str, bin: &Path) -> Command {
    if cpus.is_empty() {
        Command::new(bin)
    } else {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpus).arg(bin);
        c
    }
}

async fn start(system: System, args: &CompareArgs, secret: &str, tag: &str) -> Result<Server> {
    let port = free_port()?;
    let log = std::fs::File::create(args.out.join(format!("{tag}.log")))?;
    let (mut cmd, url, target) = match system {
        System::Gateway | System::GatewayDeflate => {
            let mut c = pinned(&args.server_cpus, &args.gateway_bin);
            c.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--jwt-secret")
                .arg(secret);
            c.arg("--no-rate-limits").arg("--node-id").arg("bench");
            c.args(args.gateway_args.split_whitespace());
            (c, format!("ws://127.0.0.1:{port}/ws"), Target::GwJson)
        }
        System::Nats | System::NatsDeflate => {
            let conf = args.out.join(format!("{tag}.conf"));
            let compression = if system.deflate() { "  compression: true\n" } else { "" };
            std::fs::write(
                &conf,
                format!(
                    "host: 127.0.0.1\nport: -1\nwebsocket {{\n  listen: \"127.0.0.1:{port}\"\n  no_tls: true\n{compression}}}\n"
                ),
            )?;
            let mut c = pinned(&args.server_cpus, &args.nats_bin);
            c.arg("-c").arg(&conf);
            (c, format!("ws://127.0.0.1:{port}"), Target::NatsWs)
        }
    };
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut server = Server {
        pid: child.id(),
        child,
        url,
        target,
    };
    let t0 = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "{system:?} exited with {status} at start; see {}/{tag}.log",
                args.out.display()
            );
        }
        if ready(system, port).await {
            return Ok(server);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{system:?} not ready after 30 s; see {}/{tag}.log", args.out.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gateway: `GET /healthz` answers 200. nats-server: the WebSocket port accepts.
async fn ready(system: System, port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if !system.is_gateway() {
        return true;
    }
    let req = format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(0);
    buf[..n].starts_with(b"HTTP/1.1 200")
}

/// One figure of the table, per system.
#[derive(Clone, Debug, Default, Serialize)]
struct Row {
    scenario: String,
    metric: String,
    higher_is_better: bool,
    unit: &'static str,
    /// The figure per system (by name).
    values: std::collections::BTreeMap<&'static str, f64>,
    limit_note: String,
}

impl Row {
    fn get(&self, s: System) -> Option<f64> {
        self.values.get(system_name(s)).copied()
    }

    /// `gateway` over `nats` (or the inverse where lower is better).
    fn advantage(&self, nats: System, gateway: System) -> Option<f64> {
        let (n, g) = (self.get(nats)?, self.get(gateway)?);
        if self.higher_is_better {
            (n > 0.0).then(|| g / n)
        } else {
            (g > 0.0).then(|| n / g)
        }
    }
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match (v, unit) {
        (None, _) => "n/a".into(),
        (Some(v), "B") => report::bytes(v),
        (Some(v), "/s") => format!("{:.0}/s", v),
        (Some(v), "s") => format!("{v:.2} s"),
        (Some(v), "ms") => format!("{v:.1} ms"),
        (Some(v), "cores") => format!("{v:.2}"),
        (Some(v), _) => format!("{v:.0}"),
    }
}

pub async fn run(args: &CompareArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let secret = format!("bench-{:032x}", rand::random::<u128>());
    let gateway_present = args.gateway_bin.exists();
    let mut rows: Vec<Row> = Vec::new();
    let mut all = serde_json::Map::new();
    let started = Instant::now();
    let q = args.quick;
    let steps = if q { args.step_secs.min(3.0) } else { args.step_secs };
    for &scenario in &args.scenarios {
        for &system in &args.systems {
            let name = format!("{}-{}", scenario_name(scenario), system_name(system));
            if system.is_gateway() && !gateway_present {
                eprintln!("== {name}: skipped, {} not built", args.gateway_bin.display());
                continue;
            }
            eprintln!("== {name} ({:.0} s into the run)", started.elapsed().as_secs_f64());
            let server = match start(system, args, &secret, &name).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("== {name}: server did not start: {e:#}");
                    continue;
                }
            };
            let target = TargetArgs {
                target: server.target,
                url: server.url.clone(),
                jwt_secret: secret.clone(),
                server_pid: Some(server.pid),
                source_ips: 0,
                connect_concurrency: 200,
                connect_timeout_secs: 30.0,
                deflate: system.deflate(),
            };
            let value = match scenario {
                Scenario::Fanout1k | Scenario::Fanout10k => {
                    let big = scenario == Scenario::Fanout10k;
                    let a = FanoutArgs {
                        target,
                        subs: match (big, q) {
                            (false, false) => 1_000,
                            (true, false) => 10_000,
                            (false, true) => 200,
                            (true, true) => 1_000,
                        },
                        publishers: 1,
                        size: 200,
                        room: "bench".into(),
                        rates: Vec::new(),
                        start_dps: match (big, q) {
                            (false, false) => 200_000.0,
                            (true, false) => 50_000.0,
                            (_, true) => 20_000.0,
                        },
                        factor: 1.5,
                        max_dps: if q { 200_000.0 } else { 8_000_000.0 },
                        step_secs: steps,
                        strict_p99_ms: 100.0,
                        keepup_p99_ms: 1_000.0,
                        refine: 1,
                        no_stop: false,
                        pub_url: None,
                        read_buf: 16 * 1024,
                        measure_every: 1,
                    };
                    match fanout::run(&a).await {
                        Ok(r) => {
                            report::fanout(&r);
                            let label = format!("fanout {} subs", a.subs);
                            let sat = |ok: fn(&crate::scenario::StepResult) -> bool| {
                                r.steps
                                    .iter()
                                    .filter(|s| !ok(s))
                                    .map(limit_of)
                                    .next()
                                    .unwrap_or_else(|| "sweep ended below the limit".into())
                            };
                            push(
                                &mut rows,
                                &label,
                                "strict ceiling (zero loss, p99 <= 100 ms)",
                                true,
                                "/s",
                                system,
                                r.strict_ceiling_dps,
                                sat(|s| s.strict_ok),
                            );
                            push(
                                &mut rows,
                                &label,
                                "keep-up ceiling (zero loss, p99 <= 1 s)",
                                true,
                                "/s",
                                system,
                                r.keepup_ceiling_dps,
                                sat(|s| s.keepup_ok),
                            );
                            push(
                                &mut rows,
                                &label,
                                "load generator CPU, max of steps",
                                false,
                                "cores",
                                system,
                                Some(r.loadgen_cpu_max),
                                String::new(),
                            );
                            serde_json::to_value(&r)?
                        }
                        Err(e) => failed(&name, e),
                    }
                }
                Scenario::Idle => {
                    let a = IdleArgs {
                        target,
                        conns: if q { 2_000 } else { args.idle_conns },
                        rooms: 100,
                        settle_secs: 3.0,
                        hold_secs: if q { 1.0 } else { 5.0 },
                    };
                    match idle::run(&a).await {
                        Ok(r) => {
                            report::idle(&r);
                            let label = format!("idle {} conns", a.conns);
                            let note = if r.connected < a.conns {
                                format!("only {} connected: {:?}", r.connected, r.failures)
                            } else {
                                String::new()
                            };
                            push(
                                &mut rows,
                                &label,
                                "server RSS per connection",
                                false,
                                "B",
                                system,
                                r.server_rss_per_conn,
                                note,
                            );
                            push(
                                &mut rows,
                                &label,
                                "kernel TCP memory per connection (both ends)",
                                false,
                                "B",
                                system,
                                Some(r.kernel_tcp_mem_per_conn),
                                String::new(),
                            );
                            serde_json::to_value(&r)?
                        }
                        Err(e) => failed(&name, e),
                    }
                }
                Scenario::Storm => {
                    let a = StormArgs {
                        target,
                        clients: if q { 2_000 } else { args.storm_clients },
                        alg: Alg::Hs256,
                        jwt_key: None,
                        ramp_per_sec: 0.0,
                        hold_secs: 1.0,
                    };
                    match storm::run(&a).await {
                        Ok(r) => {
                            report::storm(&r);
                            let label = format!("storm {} clients HS256", a.clients);
                            let mut why = Vec::new();
                            if !r.refusals.is_empty() {
                                why.push(format!("refusals {:?}", r.refusals));
                            }
                            if let Some(n) = r.listen_overflows.filter(|n| *n > 0) {
                                why.push(format!("{n} SYNs dropped on a full listen backlog (SYN retransmits)"));
                            }
                            let note = why.join("; ");
                            push(
                                &mut rows,
                                &label,
                                "time until all connected",
                                false,
                                "s",
                                system,
                                r.all_connected_secs,
                                note,
                            );
                            push(
                                &mut rows,
                                &label,
                                "refusals",
                                false,
                                "",
                                system,
                                Some(r.refusals.values().sum::<u64>() as f64),
                                String::new(),
                            );
                            push(
                                &mut rows,
                                &label,
                                "server peak RSS",
                                false,
                                "B",
                                system,
                                r.server_rss_peak.map(|v| v as f64),
                                String::new(),
                            );
                            serde_json::to_value(&r)?
                        }
                        Err(e) => failed(&name, e),
                    }
                }
            };
            std::fs::write(
                args.out.join(format!("{name}.json")),
                serde_json::to_string_pretty(&value)?,
            )?;
            all.insert(name, value);
            drop(server);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let table = render(&rows, &args.systems);
    println!("\n{table}");
    println!(
        "total run time {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    std::fs::write(args.out.join("compare.md"), &table)?;
    let doc = serde_json::json!({ "rows": rows, "results": all, "run_secs": started.elapsed().as_secs_f64() });
    std::fs::write(args.out.join("compare.json"), serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

fn failed(name: &str, e: anyhow::Error) -> serde_json::Value {
    eprintln!("== {name} failed: {e:#}");
    serde_json::json!({ "error": format!("{e:#}") })
}

/// Why a failing step failed, in a few words for the table.
fn limit_of(s: &crate::scenario::StepResult) -> String {
    let mut why = if s.client_saturated {
        "LOAD GENERATOR saturated".to_string()
    } else if s.server_cpu.is_some_and(|c| c > 0.9) {
        format!("server CPU {:.2} cores", s.server_cpu.unwrap_or(0.0))
    } else {
        String::new()
    };
    let what = if s.lost > 0 {
        format!("loss at {:.0}/s", s.target_dps)
    } else {
        format!("p99 {:.0} ms at {:.0}/s", s.latency.p99_ms, s.target_dps)
    };
    if !why.is_empty() {
        why.push_str(", ");
    }
    why + &what
}

#[allow(clippy::too_many_arguments)]
fn push(
    rows: &mut Vec<Row>,
    scenario: &str,
    metric: &str,
    higher: bool,
    unit: &'static str,
    system: System,
    v: Option<f64>,
    note: String,
) {
    let i = match rows.iter().position(|r| r.scenario == scenario && r.metric == metric) {
        Some(i) => i,
        None => {
            rows.push(Row {
                scenario: scenario.into(),
                metric: metric.into(),
                higher_is_better: higher,
                unit,
                ..Row::default()
            });
            rows.len() - 1
        }
    };
    let r = &mut rows[i];
    if let Some(v) = v {
        r.values.insert(system_name(system), v);
    }
    if !note.is_empty() {
        if !r.limit_note.is_empty() {
            r.limit_note.push_str("; ");
        }
        r.limit_note.push_str(&format!("{}: {note}", system_name(system)));
    }
}

fn render(rows: &[Row], systems: &[System]) -> String {
    let pairs: Vec<(System, System)> = [
        (System::Nats, System::Gateway),
        (System::NatsDeflate, System::GatewayDeflate),
    ]
    .into_iter()
    .filter(|(n, g)| systems.contains(n) && systems.contains(g))
    .collect();
    let mut t = String::from("| scenario | metric |");
    for s in systems {
        t.push_str(&format!(" {} |", system_name(*s)));
    }
    for (n, g) in &pairs {
        t.push_str(&format!(" {} vs {} |", system_name(*g), system_name(*n)));
    }
    t.push_str(" what limited it |\n|---|---|");
    t.push_str(&"---|".repeat(systems.len() + pairs.len() + 1));
    t.push('\n');
    for r in rows {
        t.push_str(&format!("| {} | {} |", r.scenario, r.metric));
        for s in systems {
            t.push_str(&format!(" {} |", fmt(r.get(*s), r.unit)));
        }
        for (n, g) in &pairs {
            let adv = if r.unit == "cores" {
                "-".into()
            } else {
                r.advantage(*n, *g).map_or("-".into(), |a| format!("{a:.2}x"))
            };
            t.push_str(&format!(" {adv} |"));
        }
        t.push_str(&format!(" {} |\n", r.limit_note));
    }
    t
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Fanout1k => "fanout-1k",
        Scenario::Fanout10k => "fanout-10k",
        Scenario::Idle => "idle",
        Scenario::Storm => "storm",
    }
}

fn system_name(s: System) -> &'static str {
    match s {
        System::Nats => "nats",
        System::Gateway => "gateway",
        System::NatsDeflate => "nats-deflate",
        System::GatewayDeflate => "gateway-deflate",
    }
}
