//! A TCP proxy with faults, between a gateway and one NATS server (netem is
//! missing from these kernels). Bytes are never dropped or reordered (TCP
//! would not deliver that): "delay" holds every chunk for a latency plus
//! jitter, "loss" stalls the stream the way a retransmission does (a chunk
//! and everything behind it wait 200-600 ms), "reset" cuts every open
//! connection (the client sees the server vanish and reconnects).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to traffic now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// Chance per chunk of a retransmission-like stall, per mille.
    pub loss_per_mille: u32,
}

/// The fault knobs of a set of proxies (one gateway's links to NATS).
#[derive(Clone)]
pub struct Knobs {
    faults: Arc<Mutex<Faults>>,
    reset: Arc<watch::Sender<u64>>,
}

impl Knobs {
    pub fn new() -> Self {
        Self {
            faults: Arc::default(),
            reset: Arc::new(watch::channel(0).0),
        }
    }
    pub fn set(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }
    fn get(&self) -> Faults {
        *self.faults.lock().unwrap()
    }
    /// Cuts every connection open now.
    pub fn reset(&self) {
        self.reset.send_modify(|e| *e += 1);
    }
}

/// Listens on `listen_ip:0` and forwards to `upstream`; returns the port.
pub async fn start(listen_ip: &str, upstream: String, knobs: Knobs, seed: u64) -> u16 {
    let listener = TcpListener::bind((listen_ip, 0)).await.expect("proxy binds");
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let Ok((down, _)) = listener.accept().await else {
                continue;
            };
            n += 1;
            let (knobs, upstream) = (knobs.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(Ok(up)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&upstream)).await
                else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                let mut reset = knobs.reset.subscribe();
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let a = pipe(dr, uw, knobs.clone(), seed ^ n);
                let b = pipe(ur, dw, knobs.clone(), seed ^ n ^ 0x5555);
                tokio::select! {
                    _ = a => {}
                    _ = b => {}
                    _ = reset.changed() => {}
                }
            });
        }
    });
    port
}

/// One direction: a reader stamping chunks with their due time, a writer
/// sending each no earlier (and in order).
async fn pipe(mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf, knobs: Knobs, seed: u64) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut last_due = Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let f = knobs.get();
            let mut hold = f.delay_ms
                + if f.jitter_ms > 0 {
                    rng.random_range(0..=f.jitter_ms)
                } else {
                    0
                };
            if f.loss_per_mille > 0 && rng.random_range(0..1000) < f.loss_per_mille {
                hold += rng.random_range(200..=600);
            }
            let due = (Instant::now() + Duration::from_millis(hold)).max(last_due);
            last_due = due;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
