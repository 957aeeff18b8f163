//! `wire`: bytes on the wire per delivery, with and without WebSocket
//! compression (`permessage-deflate`), against one gateway in one run.
//!
//! Two measurements, each done once uncompressed and once with every
//! client offering compression:
//! - chat: S subscribers of one room get M chat messages of ~200 bytes of
//!   `data`; the bytes their sockets read (frame headers included) over S x M;
//! - catch-up: one message in each of R rooms, then a fresh connection
//!   subscribes to all R rooms with `since` in one frame; the bytes of the
//!   subscribe reply and the R catch-up pushes.
//!
//! Counted by the load generator at its sockets ([`crate::conn::wire_bytes`]);
//! the TCP/IP headers are not included. Needs a gateway run with
//! `--no-rate-limits` (R publishes and R catch-up messages at once).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{Env, TargetArgs};
use crate::conn::{Conn, Endpoint, Incoming, wire_bytes};

#[derive(clap::Args, Clone, Debug)]
pub struct WireArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Subscribers of the chat room.
    #[arg(long, default_value_t = 20)]
    pub subs: usize,
    /// Chat messages published.
    #[arg(long, default_value_t = 200)]
    pub messages: usize,
    /// Rooms of the catch-up (one message each).
    #[arg(long, default_value_t = 2_000)]
    pub rooms: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct WireMode {
    pub deflate: bool,
    /// Mean bytes of `data` per chat message (a JSON string, quotes included).
    pub chat_data_bytes: f64,
    /// Bytes read per chat delivery (frame included).
    pub chat_bytes_per_delivery: f64,
    /// Bytes read for the subscribe reply and its catch-up.
    pub catchup_bytes: u64,
    /// Catch-up pushes received.
    pub catchup_messages: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct WireReport {
    pub scenario: &'static str,
    pub subs: usize,
    pub messages: usize,
    pub rooms: usize,
    pub modes: Vec<WireMode>,
}

/// A chat line of 198 bytes (200 with the quotes of the JSON string the
/// publish sends it as), from a small vocabulary: what chat text looks like
/// to a compressor (words repeat, the order does not).
fn chat_data(rng: &mut rand::rngs::StdRng, i: usize) -> String {
    const WORDS: &[&str] = &[
        "the", "meeting", "is", "at", "three", "can", "you", "send", "me", "link", "thanks", "ok", "sounds", "good",
        "I", "will", "be", "late", "today", "lunch", "anyone", "coffee", "deploy", "finished", "review", "please",
        "tomorrow", "morning", "great", "work", "team", "what", "about", "this", "issue", "fixed", "yes", "no",
        "maybe", "later", "weekend", "plans", "café", "déjà", "vu",
    ];
    let mut text = format!("user-{} #{i}:", rng.random_range(1000..9999));
    while text.len() < 198 {
        text.push(' ');
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    while text.len() > 198 {
        text.pop();
    }
    text
}

/// Reads until `done` says so (every buffered message passed to `on`), at
/// most `limit`.
async fn read_until(conn: &mut Conn, limit: Duration, mut on: impl FnMut(&[u8]) -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let mut done = false;
        conn.drain(&mut |m| {
            if let Incoming::Data(b) = m {
                done |= on(b);
            }
        })?;
        conn.flush().await?;
        if done {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out");
        }
        tokio::time::timeout(left, conn.fill()).await.context("timed out")??;
    }
}

async fn open(env: &Env, ep: &Endpoint, i: usize, user: &str) -> Result<Conn> {
    let opts = env.opts(i, user, 64 * 1024)?;
    Ok(Conn::open(ep, &opts).await?)
}

async fn one_mode(env: &Env, args: &WireArgs, deflate: bool, tag: &str) -> Result<WireMode> {
    let ep = Endpoint {
        deflate,
        ..env.ep.clone()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    // Chat: S subscribers, M messages.
    let room = format!("wire-chat-{tag}");
    let mut subs = Vec::with_capacity(args.subs);
    for i in 0..args.subs {
        let mut c = open(env, &ep, i, &format!("sub-{i}")).await?;
        c.subscribe(std::slice::from_ref(&room)).await?;
        subs.push(c);
    }
    let mut publisher = open(env, &ep, args.subs, "publisher").await?;
    let mut data_bytes = 0usize;
    let before = wire_bytes();
    for i in 0..args.messages {
        let d = chat_data(&mut rng, i);
        data_bytes += d.len() + 2;
        publisher.queue_publish(&room, d.as_bytes());
        publisher.flush().await?;
    }
    for c in &mut subs {
        let mut got = 0;
        read_until(c, Duration::from_secs(30), |b| {
            got += usize::from(b.starts_with(br#"{"op":"message""#));
            got == args.messages
        })
        .await
        .context("chat pushes")?;
    }
    let chat_bytes = wire_bytes() - before;
    drop(subs);

    // Catch-up: one message per room, then one subscribe with `since`.
    let rooms: Vec<String> = (0..args.rooms).map(|i| format!("wire-{tag}-{i:04}")).collect();
    for (i, r) in rooms.iter().enumerate() {
        publisher.queue_publish(r, chat_data(&mut rng, i).as_bytes());
        if i % 100 == 99 {
            publisher.flush().await?;
            // The replies, so the publisher's socket never fills.
            let mut acks = 0;
            read_until(&mut publisher, Duration::from_secs(30), |b| {
                acks += usize::from(b.starts_with(br#"{"id":"#));
                acks >= 100
            })
            .await
            .context("publish replies")?;
        }
    }
    publisher.flush().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut joiner = open(env, &ep, args.subs + 1, "joiner").await?;
    let mut frame = String::from(r#"{"op":"subscribe","id":9,"rooms":["#);
    for (i, r) in rooms.iter().enumerate() {
        if i > 0 {
            frame.push(',');
        }
        frame.push_str(&format!(r#"{{"room":"{r}","since":0}}"#));
    }
    frame.push_str("]}");
    let before = wire_bytes();
    joiner.queue_text(&frame);
    joiner.flush().await?;
    let (mut replied, mut pushes) = (false, 0usize);
    read_until(&mut joiner, Duration::from_secs(60), |b| {
        replied |= b.starts_with(br#"{"id":9"#);
        pushes += usize::from(b.starts_with(br#"{"op":"message""#));
        replied && pushes == args.rooms
    })
    .await
    .with_context(|| format!("catch-up: reply {replied}, {pushes} pushes"))?;
    Ok(WireMode {
        deflate,
        chat_data_bytes: data_bytes as f64 / args.messages.max(1) as f64,
        chat_bytes_per_delivery: chat_bytes as f64 / (args.messages * args.subs).max(1) as f64,
        catchup_bytes: wire_bytes() - before,
        catchup_messages: pushes,
    })
}

pub async fn run(args: &WireArgs) -> Result<WireReport> {
    if !args.target.target.is_gateway() || args.target.target != crate::conn::Target::GwJson {
        bail!("wire measures the gateway's gw.v1.json");
    }
    let env = Env::new(&args.target, args.subs + 2)?;
    let run = rand::random::<u32>();
    let mut modes = Vec::new();
    for deflate in [false, true] {
        let tag = format!("{run:08x}-{}", if deflate { "on" } else { "off" });
        modes.push(one_mode(&env, args, deflate, &tag).await?);
    }
    Ok(WireReport {
        scenario: "wire",
        subs: args.subs,
        messages: args.messages,
        rooms: args.rooms,
        modes,
    })
}
