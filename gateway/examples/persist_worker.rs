//! A persist worker: copies every room message the gateways store into an
//! application database, at least once, never losing one silently.
//!
//! How (docs/cluster.md, "Consuming every room's messages"):
//! - An archive stream `<PREFIX>_ARCHIVE` *sources* every room stream
//!   (`<PREFIX>_ROOMS_<p>`): JetStream copies each stored message into it as
//!   it is stored. It is a work queue with no message, byte or age limit and
//!   discard-new, so nothing leaves it until this worker acknowledged it. (A
//!   consumer on the room streams themselves would not do: they keep only the
//!   last `--history-size` messages per room, and a worker further behind
//!   than that would miss messages without noticing: the old system's
//!   `MaxMsgs: 10000` loss.)
//! - A durable pull consumer on the archive with explicit acks: a message is
//!   acknowledged (and the acknowledgement confirmed by the server) only after
//!   it is written and synced to the database, so a crash anywhere means a
//!   redelivery, never a loss.
//! - The database write is idempotent on (room, offset): the offset is the
//!   room stream's sequence (from the `Nats-Stream-Source` header), the one
//!   clients see, so a redelivered message is written once.
//!
//! The "database" here is a JSON-lines file (one object per message: `room`,
//! `offset`, `from`, `ts`, `data`, decoded from the gateway's envelope); a
//! real worker writes to its own database with (room, offset) as a unique
//! key.
//!
//! Usage: `persist-worker --nats URL[,URL...] --out FILE [--prefix gw] [--partitions 8]
//! [--replicas 1] [--durable persist] [--ack-wait-secs 30]`. Stops on SIGINT.
//! A worker that dies holding unacknowledged messages gets them again after
//! `--ack-wait-secs` (from the consumer; a restarted worker included).

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt as _;
use proto::Message as _;
use proto::bus::Envelope;

struct Args {
    nats: String,
    out: std::path::PathBuf,
    prefix: String,
    partitions: u32,
    replicas: usize,
    durable: String,
    ack_wait: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        nats: String::new(),
        out: std::path::PathBuf::new(),
        prefix: "gw".into(),
        partitions: 8,
        replicas: 1,
        durable: "persist".into(),
        ack_wait: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--nats" => a.nats = value,
            "--out" => a.out = value.into(),
            "--prefix" => a.prefix = value,
            "--partitions" => a.partitions = value.parse()?,
            "--replicas" => a.replicas = value.parse()?,
            "--durable" => a.durable = value,
            "--ack-wait-secs" => a.ack_wait = Duration::from_secs(value.parse()?),
            other => bail!("unknown flag {other}"),
        }
    }
    if a.nats.is_empty() || a.out.as_os_str().is_empty() {
        bail!(
            "usage: persist-worker --nats URL --out FILE [--prefix gw] [--partitions 8] [--replicas 1] [--durable persist] [--ack-wait-secs 30]"
        );
    }
    Ok(a)
}

/// The archive stream: sources every room stream, keeps every message
/// until it is acknowledged, refuses (never drops) when full.
fn archive_config(a: &Args) -> stream::Config {
    let prefix = a.prefix.to_ascii_uppercase();
    stream::Config {
        name: format!("{prefix}_ARCHIVE"),
        description: Some("every stored room message until the persist worker acknowledged it".into()),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: a.replicas,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        discard: stream::DiscardPolicy::New,
        sources: Some(
            (0..a.partitions)
                .map(|p| stream::Source {
                    name: format!("{prefix}_ROOMS_{p}"),
                    // From the first message the room stream ever stored
                    // (that it still holds), never from "now": a source of
                    // an empty stream otherwise may start past its first
                    // message.
                    start_sequence: Some(1),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    }
}

/// (room, offset) of an archived message: the room from the subject
/// `<prefix>.store.<p>.<room>`, the offset from `Nats-Stream-Source`
/// (`<stream>[:<hash>] <sequence> ...`).
fn key_of(msg: &async_nats::jetstream::Message) -> Option<(String, u64)> {
    let room = msg.subject.as_str().rsplit('.').next()?.to_string();
    let source = msg.headers.as_ref()?.get("Nats-Stream-Source")?.as_str().to_string();
    let offset = source.split_whitespace().nth(1)?.parse().ok()?;
    Some((room, offset))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    // The database: the keys already written (the idempotency check).
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    if let Ok(f) = std::fs::File::open(&a.out) {
        for line in std::io::BufReader::new(f).lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            if let (Some(room), Some(offset)) = (v["room"].as_str(), v["offset"].as_u64()) {
                seen.insert((room.to_string(), offset));
            }
        }
    }
    let mut db = std::fs::OpenOptions::new().create(true).append(true).open(&a.out)?;
    let servers = a
        .nats
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    let client = async_nats::connect(servers.as_slice()).await?;
    let js = jetstream::new(client);
    let cfg = archive_config(&a);
    let archive = match js.get_stream(&cfg.name).await {
        Ok(s) => s,
        Err(_) => js
            .create_stream(cfg.clone())
            .await
            .context("creating the archive stream")?,
    };
    let consumer: consumer::PullConsumer = archive
        .get_or_create_consumer(
            &a.durable,
            consumer::pull::Config {
                durable_name: Some(a.durable.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                // What a crash costs: messages delivered to the dead worker
                // and not acknowledged come again after this long.
                ack_wait: a.ack_wait,
                max_ack_pending: 1_000,
                ..Default::default()
            },
        )
        .await?;
    eprintln!("persist-worker: consuming {} as {}", cfg.name, a.durable);
    let mut stop = Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(256)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        loop {
            let msg = tokio::select! {
                m = batch.next() => m,
                () = &mut stop => return Ok(()),
            };
            let Some(msg) = msg else { break };
            let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
            let Some(key) = key_of(&msg) else {
                eprintln!(
                    "persist-worker: a message without a room offset on {}; left unacknowledged",
                    msg.subject
                );
                continue;
            };
            if !seen.contains(&key) {
                let Ok(env) = Envelope::decode(msg.payload.as_ref()) else {
                    eprintln!("persist-worker: undecodable message {key:?}; left unacknowledged");
                    continue;
                };
                let data: serde_json::Value = serde_json::from_slice(&env.data).unwrap_or(serde_json::Value::Null);
                let line = serde_json::json!({"room": key.0, "offset": key.1, "from": env.from, "ts": env.ts_ms, "data": data});
                // One write per row: a reader never sees half of one
                // between two writes.
                db.write_all(format!("{line}\n").as_bytes())?;
                db.sync_data()?;
                seen.insert(key);
            }
            // Only after the write is durable; confirmed by the server.
            msg.double_ack().await.map_err(|e| anyhow::anyhow!("ack failed: {e}"))?;
        }
    }
}
