//! A reconnect storm against a running gateway: N clients ask to connect at
//! the same moment, and every client refused with 503 or 429 retries after
//! `Retry-After` (with jitter, 0.5x to 1.5x), as the protocol tells clients to.
//! Prints how long until every client was connected (upgrade + `connect`
//! answered ok), refusals by status, other errors, and the server's peak
//! memory (sampled VmRSS and its lifetime VmHWM from /proc/PID/status).
//!
//! Run the gateway in its own process: one process holds at most ~19,900
//! sockets here (20,000 open files per process). See docs/operations.md:
//!
//! ```text
//! target/release/gateway --listen 127.0.0.1:9100 --jwt-secret storm-secret-0123456789abcdef0123 &
//! cargo run --release -p gateway --example reconnect_storm -- \
//!     ws://127.0.0.1:9100/ws storm-secret-0123456789abcdef0123 19000 $(pidof gateway)
//! ```
//!
//! Bounded: at most 100 attempts per client, each within 30 s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const MAX_ATTEMPTS: usize = 100;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Source addresses 127.0.0.1..=127.0.0.N, so retries do not run out of ports.
const SOURCES: u8 = 4;

#[derive(Default)]
struct Tally {
    connected: AtomicUsize,
    refused_503: AtomicUsize,
    refused_429: AtomicUsize,
    errors: AtomicUsize,
    /// Microseconds from the start until the last client was connected.
    last_connected_us: AtomicU64,
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, secret, clients, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: reconnect_storm WS_URL JWT_SECRET CLIENTS [SERVER_PID]");
    };
    let clients: usize = clients.parse()?;
    let server_pid: Option<u32> = rest.first().map(|p| p.parse()).transpose()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(storm(url.clone(), secret.clone(), clients, server_pid))
}

async fn storm(url: String, secret: String, clients: usize, server_pid: Option<u32>) -> anyhow::Result<()> {
    let server: SocketAddr = {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow::anyhow!("ws:// URL expected"))?;
        rest.split('/').next().unwrap_or(rest).parse()?
    };
    let tokens: Vec<String> = (0..clients)
        .map(|i| gateway::auth::mint_hs256(secret.as_bytes(), &format!("storm-{i}"), vec![], vec![], Some(3600)))
        .collect::<Result<_, _>>()?;
    let rss_before = server_pid.and_then(|p| proc_status_kib(p, "VmRSS:"));
    let sampling = Arc::new(AtomicBool::new(true));
    let peak_rss = Arc::new(AtomicU64::new(rss_before.unwrap_or(0)));
    let sampler = server_pid.map(|pid| {
        let (sampling, peak) = (sampling.clone(), peak_rss.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(kib) = proc_status_kib(pid, "VmRSS:") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });

    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for (i, token) in tokens.into_iter().enumerate() {
        let (url, tally) = (url.clone(), tally.clone());
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(SOURCES)) as u8));
        tasks.push(tokio::spawn(async move {
            for _ in 0..MAX_ATTEMPTS {
                match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(&url, server, source, &token)).await {
                    Ok(Ok(ws)) => {
                        tally.connected.fetch_add(1, Ordering::Relaxed);
                        let at = start.elapsed().as_micros() as u64;
                        tally.last_connected_us.fetch_max(at, Ordering::Relaxed);
                        return Some(ws);
                    }
                    Ok(Err(Failure::Refused(status, retry_after))) => {
                        match status {
                            503 => tally.refused_503.fetch_add(1, Ordering::Relaxed),
                            429 => tally.refused_429.fetch_add(1, Ordering::Relaxed),
                            _ => tally.errors.fetch_add(1, Ordering::Relaxed),
                        };
                        let wait = Duration::from_secs(retry_after.max(1)).mul_f64(0.5 + rand::random::<f64>());
                        tokio::time::sleep(wait).await;
                    }
                    Ok(Err(Failure::Other(e))) => {
                        if tally.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("error: {e}");
                        }
                        tokio::time::sleep(Duration::from_secs(1).mul_f64(0.5 + rand::random::<f64>())).await;
                    }
                    Err(_) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            None
        }));
    }
    let mut held = Vec::with_capacity(clients);
    for t in tasks {
        if let Some(ws) = t.await? {
            held.push(ws);
        }
    }
    let finished = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    sampling.store(false, Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.await;
    }
    let t = &tally;
    let connected = t.connected.load(Ordering::Relaxed);
    println!("clients            {clients}");
    println!("connected          {connected}");
    println!(
        "all connected in   {}",
        if connected == clients {
            format!("{:.2} s", t.last_connected_us.load(Ordering::Relaxed) as f64 / 1e6)
        } else {
            "never (see errors)".into()
        }
    );
    println!("finished in        {:.2} s", finished.as_secs_f64());
    println!("refused 503        {}", t.refused_503.load(Ordering::Relaxed));
    println!("refused 429        {}", t.refused_429.load(Ordering::Relaxed));
    println!("other errors       {}", t.errors.load(Ordering::Relaxed));
    if let Some(pid) = server_pid {
        let mib = |k: u64| k as f64 / 1024.0;
        println!("server RSS before  {:.1} MiB", mib(rss_before.unwrap_or(0)));
        println!(
            "server RSS peak    {:.1} MiB (sampled every 20 ms)",
            mib(peak_rss.load(Ordering::Relaxed))
        );
        println!(
            "server VmHWM       {:.1} MiB (process lifetime)",
            mib(proc_status_kib(pid, "VmHWM:").unwrap_or(0))
        );
    }
    drop(held);
    Ok(())
}

enum Failure {
    Refused(u16, u64),
    Other(String),
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// One attempt: TCP from `source`, upgrade, `connect`, ok reply.
async fn attempt(url: &str, server: SocketAddr, source: IpAddr, token: &str) -> Result<Ws, Failure> {
    let other = |e: &dyn std::fmt::Display| Failure::Other(e.to_string());
    let sock = TcpSocket::new_v4().map_err(|e| other(&e))?;
    sock.bind(SocketAddr::new(source, 0)).map_err(|e| other(&e))?;
    let tcp = sock.connect(server).await.map_err(|e| other(&e))?;
    let req = url.into_client_request().map_err(|e| other(&e))?;
    let cfg = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let mut ws = match tokio_tungstenite::client_async_with_config(req, tcp, Some(cfg)).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            return Err(Failure::Refused(resp.status().as_u16(), retry_after));
        }
        Err(e) => return Err(other(&e)),
    };
    let connect = format!(r#"{{"id":1,"op":"connect","token":"{token}"}}"#);
    ws.send(Message::text(connect)).await.map_err(|e| other(&e))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"ok\"") => return Ok(ws),
            Some(Ok(Message::Text(t))) => return Err(Failure::Other(format!("connect refused: {t}"))),
            Some(Ok(Message::Close(f))) => return Err(Failure::Other(format!("closed: {f:?}"))),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(other(&e)),
            None => return Err(Failure::Other("connection ended".into())),
        }
    }
}
