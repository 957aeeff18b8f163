//! The processes of the chaos run: nats-server and gateway, each in its own
//! namespace (`ip netns exec` execs, so the child's pid is the server's and
//! kill -9 / SIGSTOP reach it).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::net::{Net, cmd};

pub const SECRET: &str = "chaos-secret-0123456789-chaos-secret";

pub struct Proc {
    pub name: String,
    ns: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// SIGSTOPped and not yet continued.
    pub stopped: bool,
}

impl Proc {
    /// A process run in namespace `ns` (empty: the root namespace).
    pub fn new(name: String, ns: String, args: Vec<String>, log: PathBuf) -> Self {
        Self {
            name,
            ns,
            args,
            log,
            child: None,
            stopped: false,
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let ns = (!self.ns.is_empty()).then_some(self.ns.as_str());
        let child = cmd(ns, &args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", self.name));
        self.child = Some(child);
        self.stopped = false;
    }

    /// kill -9 (continued first if stopped, so it dies at once).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it exited on its own (a crash: a finding).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn signal(&mut self, stop: bool) {
        if let Some(c) = &self.child {
            let sig = if stop { "-STOP" } else { "-CONT" };
            let _ = std::process::Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
            self.stopped = stop;
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(false);
        self.kill();
    }
}

/// Three JetStream servers (R3 streams, `sync_interval: always`).
pub fn nats(net: &Net, dir: &Path) -> Vec<Proc> {
    let bin = std::env::var("NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/nats-server"));
    assert!(
        bin.exists(),
        "nats-server not found at {}: run scripts/ensure-nats.sh",
        bin.display()
    );
    let routes: Vec<String> = (0..net.nats)
        .map(|i| format!("\"nats-route://{}:6222\"", net.nats_ip(i)))
        .collect();
    (0..net.nats)
        .map(|i| {
            let ip = net.nats_ip(i);
            let conf = dir.join(format!("n{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nlisten: \"{ip}:4222\"\nhttp: \"{ip}:8222\"\n\
                     jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
                     cluster {{ name: chaos, listen: \"{ip}:6222\", routes: [{}] }}\n",
                    dir.join(format!("n{i}")).display(),
                    routes.join(", ")
                ),
            )
            .unwrap();
            Proc::new(
                format!("nats n{i}"),
                net.nats_ns(i),
                vec![bin.display().to_string(), "-c".into(), conf.display().to_string()],
                dir.join(format!("n{i}.log")),
            )
        })
        .collect()
}

/// The gateways; gateway `j` reaches NATS server `i` through `proxy_ports[j][i]`.
pub fn gateways(net: &Net, dir: &Path, proxy_ports: &[Vec<u16>], history: usize) -> Vec<Proc> {
    let bin = std::env::var("CHAOS_GATEWAY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_gateway").to_string());
    (0..net.gateways)
        .map(|j| {
            let urls: Vec<String> = proxy_ports[j]
                .iter()
                .map(|p| format!("nats://{}:{p}", net.root_ip()))
                .collect();
            let args = vec![
                bin.clone(),
                "--listen".into(),
                format!("{}:8080", net.gateway_ip(j)),
                "--node-id".into(),
                format!("gw{j}"),
                "--jwt-secret".into(),
                SECRET.into(),
                "--nats".into(),
                urls.join(","),
                "--nats-ignore-discovered".into(),
                "--nats-replicas".into(),
                "3".into(),
                "--nats-partitions".into(),
                "4".into(),
                "--history-size".into(),
                history.to_string(),
                "--no-rate-limits".into(),
                "--drain-timeout-ms".into(),
                "1000".into(),
            ];
            Proc::new(
                format!("gateway gw{j}"),
                net.gateway_ns(j),
                args,
                dir.join(format!("gw{j}.log")),
            )
        })
        .collect()
}

/// GET `url` (plain HTTP/1.1, 2 s timeout): the status, or `None`.
pub async fn http_status(addr: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fut).await.ok().flatten()
}

/// Waits (at most `limit`) until `GET path` on `addr` answers 200.
pub async fn wait_ok(addr: &str, path: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if http_status(addr, path).await == Some(200) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
