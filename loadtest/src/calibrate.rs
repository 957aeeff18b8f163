//! `calibrate`: how many deliveries one core of load generator absorbs.
//!
//! Starts a trivial in-process server on its own thread that streams stamped
//! 200-byte messages (gateway `message` pushes in text frames, or NATS `MSG`s
//! packed into binary frames and split across frame boundaries, as
//! nats-server does) to N connections as fast as they are read. The client
//! side is the exact subscriber path the scenarios use (frame reader, stamp
//! search, sequence tracking, histogram). The figure that matters is
//! deliveries per CPU-second of the client thread, read from
//! /proc/self/task/<tid>/stat, so the server thread's share does not count.

use proto::Message as _;
use proto::client as pb;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::clock::{PayloadTemplate, Stamp, now_ns};
use crate::conn::{Conn, Endpoint, OpenOpts, Target};
use crate::procfs;
use crate::stats::{Latency, Recorder, SubscriberBook};
use crate::ws;

#[derive(clap::Args, Clone, Debug)]
pub struct CalibrateArgs {
    /// Connections.
    #[arg(long, default_value_t = 1_000)]
    pub conns: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 5.0)]
    pub secs: f64,
    /// Wire format to absorb.
    #[arg(long, value_enum, default_value = "gw.v1.json")]
    pub format: Target,
    /// Payload bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Messages per server write.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Pace the server at this many deliveries/s in total, one message per
    /// write (the worst case: one wakeup per delivery); 0 streams flat out.
    #[arg(long, default_value_t = 0.0)]
    pub paced_dps: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CalibrateReport {
    pub scenario: &'static str,
    pub format: Target,
    pub conns: usize,
    pub secs: f64,
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    /// Cores used by the client thread.
    pub client_cpu: f64,
    /// Deliveries per CPU-second of the client thread: the load generator's capacity.
    pub deliveries_per_client_cpu_sec: f64,
    pub server_thread_cpu: Option<f64>,
    pub duplicates: u64,
    pub latency: Latency,
    pub meets_2m_per_core: bool,
    pub paced_dps: f64,
}

pub async fn run(args: &CalibrateArgs) -> Result<CalibrateReport> {
    // Both ends live in this process: two sockets per connection.
    anyhow::ensure!(
        args.conns <= 9_000,
        "--conns above 9000 would pass the 20,000 open-file limit"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let server = {
        let (stop, format, size) = (stop.clone(), args.format, args.size);
        let (batch, period) = match args.paced_dps {
            r if r > 0.0 => (1, Some(Duration::from_secs_f64(args.conns as f64 / r))),
            _ => (args.batch.max(1), None),
        };
        std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let tid = std::fs::read_link("/proc/thread-self")?.to_string_lossy().into_owned();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                tx.send((listener.local_addr()?, tid))?;
                loop {
                    let (sock, _) = listener.accept().await?;
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let _ = stream_to(sock, format, size, batch, period, stop).await;
                    });
                }
                #[allow(unreachable_code)]
                Ok::<_, anyhow::Error>(())
            })
        })
    };
    let (addr, server_tid) = rx
        .recv_timeout(Duration::from_secs(5))
        .context("calibration server did not start")?;
    let ep = Endpoint {
        target: args.format,
        addr,
        host: addr.to_string(),
        path: "/".into(),
        deflate: false,
    };
    let rec = Recorder::shared();
    let mut tasks = Vec::new();
    for i in 0..args.conns {
        let (ep, rec) = (ep.clone(), rec.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let opts = OpenOpts {
                source: None,
                token: None,
                read_buf: 16 * 1024,
                timeout: Duration::from_secs(10),
                raw: true,
            };
            let mut conn = Conn::open(&ep, &opts).await?;
            let _ = i;
            let mut book = SubscriberBook::default();
            let e = crate::scenario::read_loop(&mut conn, &mut book, &rec).await;
            Err::<(), _>(e)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // connect and warm up
    let me = format!("{0}/task/{0}", std::process::id());
    let c0 = procfs::sample(&me)?;
    let s0 = procfs::sample(&server_tid).ok();
    let d0 = rec.borrow().unique(0);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;
    let wall = t0.elapsed().as_secs_f64();
    let deliveries = rec.borrow().unique(0) - d0;
    let c1 = procfs::sample(&me)?;
    let s1 = procfs::sample(&server_tid).ok();
    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    drop(server); // the thread exits with the process
    let client_cpu = (c1.cpu_s - c0.cpu_s) / wall;
    let per_cpu = deliveries as f64 / (c1.cpu_s - c0.cpu_s).max(0.01);
    let mut r = rec.borrow_mut();
    let ph = r.phase(0);
    Ok(CalibrateReport {
        scenario: "calibrate",
        format: args.format,
        conns: args.conns,
        secs: wall,
        deliveries,
        deliveries_per_sec: deliveries as f64 / wall,
        client_cpu,
        deliveries_per_client_cpu_sec: per_cpu,
        server_thread_cpu: s0.zip(s1).map(|(a, b)| (b.cpu_s - a.cpu_s) / wall),
        duplicates: ph.duplicates,
        latency: ph.latency.summary(),
        meets_2m_per_core: per_cpu >= 2_000_000.0,
        paced_dps: args.paced_dps,
    })
}

/// The trivial server side of one connection: accept the upgrade, then write
/// stamped messages in batches until told to stop.
async fn stream_to(
    mut sock: tokio::net::TcpStream,
    format: Target,
    size: usize,
    batch: usize,
    period: Option<Duration>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while memchr::memmem::find(&head, b"\r\n\r\n").is_none() {
        let n = sock.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed during handshake");
        head.extend_from_slice(&buf[..n]);
    }
    sock.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .await?;
    let body = if format.is_gateway() {
        size.saturating_sub(2)
    } else {
        size
    };
    let mut tmpl = PayloadTemplate::new(body);
    let (mut seq, mut out, mut stream) = (0u64, Vec::with_capacity(batch * (size + 120)), Vec::new());
    let mut pace = period.map(|p| {
        let mut iv = tokio::time::interval(p);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        iv
    });
    while !stop.load(Ordering::Relaxed) {
        if let Some(iv) = pace.as_mut() {
            iv.tick().await;
        }
        out.clear();
        stream.clear();
        let now = now_ns();
        for _ in 0..batch {
            let p = tmpl.stamp(&Stamp {
                sent_ns: now,
                seq,
                phase: 0,
                publisher: 0,
            });
            match format {
                Target::GwJson => {
                    let mut m = Vec::with_capacity(size + 100);
                    m.extend_from_slice(br#"{"op":"message","room":"bench","offset":"#);
                    crate::nats::push_number(&mut m, seq);
                    m.extend_from_slice(br#","ts":1764201234567,"from":"pub-0","data":""#);
                    m.extend_from_slice(p);
                    m.extend_from_slice(br#""}"#);
                    ws::server_frame_into(&mut out, ws::OP_TEXT, true, &m);
                }
                Target::GwProto => {
                    let mut data = Vec::with_capacity(p.len() + 2);
                    data.push(b'"');
                    data.extend_from_slice(p);
                    data.push(b'"');
                    let frame = pb::ServerFrame {
                        id: None,
                        body: Some(pb::server_frame::Body::Message(pb::Message {
                            room: "bench".into(),
                            offset: seq,
                            ts: 1_764_201_234_567,
                            from: "pub-0".into(),
                            data: data.into(),
                        })),
                    };
                    ws::server_frame_into(&mut out, ws::OP_BINARY, true, &frame.encode_to_vec());
                }
                Target::NatsWs => {
                    stream.extend_from_slice(b"MSG bench 1 ");
                    crate::nats::push_number(&mut stream, p.len() as u64);
                    stream.extend_from_slice(b"\r\n");
                    stream.extend_from_slice(p);
                    stream.extend_from_slice(b"\r\n");
                }
            }
            seq += 1;
        }
        if format == Target::NatsWs {
            // Frame boundaries that cut messages, as nats-server's do.
            for chunk in stream.chunks(4_000) {
                ws::server_frame_into(&mut out, ws::OP_BINARY, true, chunk);
            }
        }
        sock.write_all(&out).await?;
    }
    Ok(())
}
