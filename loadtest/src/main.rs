//! `loadtest`: the load generator and benchmark harness.
//!
//! Every scenario targets the gateway (`gw.v1.json`) or nats-server's
//! WebSocket listener (`--target nats-ws`) with the same client code, the same
//! payloads and the same latency clock. The whole generator runs on one thread
//! (see `scenario`), meant to be pinned to its own core with `taskset`, and
//! reports its own CPU use next to the server's.

mod calibrate;
mod clock;
mod compare;
mod conn;
mod nats;
mod procfs;
mod progress;
mod report;
mod scenario;
mod seq;
mod stats;
mod tokens;
mod ws;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load generator: the gateway side by side with nats-server's WebSocket listener"
)]
struct Cli {
    /// Also write the result as JSON to this file ("-" for stdout).
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// N subscribers in one room; steps the rate up to the strict and keep-up ceilings.
    Fanout(scenario::fanout::FanoutArgs),
    /// M users subscribing to 2,000 rooms each in one frame, then traffic over the rooms.
    Rooms(scenario::rooms::RoomsArgs),
    /// C clients connecting at once with signed JWTs.
    Storm(scenario::storm::StormArgs),
    /// N connections in R rooms under steady traffic for a long time; the server sampled.
    Soak(scenario::soak::SoakArgs),
    /// One worker of the report's scale run (loadtest/scale.sh): big room, heavy users, idle
    /// users over several gateways, clients moving when a gateway drains.
    Scale(scenario::scale::ScaleArgs),
    /// N idle authenticated connections; server RSS per connection.
    Idle(scenario::idle::IdleArgs),
    /// Bytes on the wire per delivery (chat messages, a 2,000-room catch-up), compression off and on.
    Wire(scenario::wire::WireArgs),
    /// Two nodes: publisher on one, subscribers on the other; latency at a fixed rate.
    Cluster(scenario::fanout::ClusterArgs),
    /// Measures how many deliveries per second one core of this generator absorbs.
    Calibrate(calibrate::CalibrateArgs),
    /// Writes an RS256 or ES256 key pair (PEM) with openssl for `storm --alg`.
    Keygen {
        #[arg(long, value_enum)]
        alg: tokens::Alg,
        #[arg(long, default_value = "target/loadtest/keys")]
        dir: PathBuf,
    },
    /// Starts the gateway and nats-server pinned to CPU 0 and runs the
    /// fan-out, idle and storm scenarios against both (see compare.sh).
    Compare(compare::CompareArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Fanout(a) => {
            let r = scenario::fanout::run(a).await?;
            report::fanout(&r);
            emit(&cli.json, &r)
        }
        Command::Cluster(a) => {
            let r = scenario::fanout::run_cluster(a).await?;
            report::fanout(&r);
            emit(&cli.json, &r)
        }
        Command::Rooms(a) => {
            let r = scenario::rooms::run(a).await?;
            report::rooms(&r);
            emit(&cli.json, &r)
        }
        Command::Storm(a) => {
            let r = scenario::storm::run(a).await?;
            report::storm(&r);
            emit(&cli.json, &r)
        }
        Command::Wire(a) => {
            let r = scenario::wire::run(a).await?;
            report::wire(&r);
            emit(&cli.json, &r)
        }
        Command::Soak(a) => {
            let r = scenario::soak::run(a).await?;
            emit(&cli.json, &r)
        }
        Command::Scale(a) => {
            let r = scenario::scale::run(a).await?;
            emit(&cli.json, &r)
        }
        Command::Idle(a) => {
            let r = scenario::idle::run(a).await?;
            report::idle(&r);
            emit(&cli.json, &r)
        }
        Command::Calibrate(a) => {
            let r = calibrate::run(a).await?;
            report::calibrate(&r);
            emit(&cli.json, &r)
        }
        Command::Keygen { alg, dir } => {
            let (key, public) = tokens::keygen(dir, *alg)?;
            println!("private key: {}\npublic key:  {}", key.display(), public.display());
            Ok(())
        }
        Command::Compare(a) => compare::run(a).await,
    }
}

/// Writes `value` as pretty JSON to `path` ("-" = stdout), if asked.
pub fn emit<T: Serialize>(path: &Option<PathBuf>, value: &T) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(value)?;
    if path.as_os_str() == "-" {
        println!("{text}");
    } else {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
