//! Real nats-server processes for cluster tests: a 3-node JetStream cluster
//! on loopback, killed on drop.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The nats-server binary: `$NATS_SERVER`, or the one `scripts/ensure-nats.sh`
/// installs. Fails with the install command, never skips.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/nats-server");
    if local.exists() {
        return local;
    }
    panic!("nats-server not found: run scripts/ensure-nats.sh (scripts/test.sh does it for you)");
}

/// `n` distinct free ports: all listeners are held until every port is
/// known, so the kernel cannot hand out the same one twice.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub struct Server {
    pub name: String,
    pub port: u16,
    pub monitor: u16,
    cluster_port: u16,
    /// Port for leaf node connections (hub servers only).
    pub leaf_port: Option<u16>,
    config: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn log(&self) -> PathBuf {
        self.config.with_extension("log")
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("Healthcheck failed")).collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the server stops answering anything, its sockets stay open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Server::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().expect("kill runs");
        assert!(ok.success(), "kill {sig} {pid}");
    }

    /// Whether the process is still up (it exits at once if a port is taken).
    fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JetStream cluster of `n` servers (n = 1: a single server).
pub struct Cluster {
    pub servers: Vec<Server>,
    _dir: tempfile::TempDir,
    /// Dropped after the servers (fields drop in order).
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// Clusters running at once in one test binary. Each is 3 JetStream servers
/// plus gateways; more than two at once on a 2-core machine made publishes
/// time out (`unavailable`) while streams elected leaders.
static CLUSTER_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

impl Cluster {
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, true).await
    }

    /// `sync_always`: fsync every write (`sync_interval: always`) or the
    /// server's default interval.
    pub async fn start_with(n: usize, sync_always: bool) -> Self {
        Self::start_opts(n, sync_always, None).await
    }

    /// A hub cluster for leaf nodes: JetStream in `domain`, and a leaf node
    /// listener on every server ([`Leaf::start`] connects to them).
    pub async fn start_hub(n: usize, domain: &str) -> Self {
        Self::start_opts(n, true, Some(domain)).await
    }

    async fn start_opts(n: usize, sync_always: bool, domain: Option<&str>) -> Self {
        // A free port can be taken by another process's outgoing connection
        // before nats-server binds it; then that server exits. Start again on
        // new ports (bounded).
        let mut slot = Some(CLUSTER_SLOTS.acquire().await.expect("never closed"));
        for attempt in 1..=4 {
            let Some(permit) = slot.take() else { break };
            let mut c = Self::spawn_all(n, sync_always, domain, permit);
            tokio::time::sleep(Duration::from_millis(300)).await;
            if c.servers.iter_mut().all(Server::alive) {
                c.wait_ready().await;
                return c;
            }
            eprintln!("nats-server failed to start (attempt {attempt}); retrying on other ports");
            let Cluster { servers, _dir, _slot } = c;
            drop(servers);
            slot = Some(_slot);
        }
        panic!("nats-server cluster did not start in 4 attempts");
    }

    fn spawn_all(
        n: usize,
        sync_always: bool,
        domain: Option<&str>,
        slot: tokio::sync::SemaphorePermit<'static>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(4 * n);
        let mut servers: Vec<Server> = (0..n)
            .map(|i| Server {
                name: format!("n{}", i + 1),
                port: ports[4 * i],
                monitor: ports[4 * i + 1],
                cluster_port: ports[4 * i + 2],
                leaf_port: domain.map(|_| ports[4 * i + 3]),
                config: dir.path().join(format!("n{}.conf", i + 1)),
                child: None,
            })
            .collect();
        let routes: Vec<String> = servers
            .iter()
            .map(|s| format!("\"nats-route://127.0.0.1:{}\"", s.cluster_port))
            .collect();
        for s in &servers {
            let store = dir.path().join(&s.name);
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: gwtest, listen: \"127.0.0.1:{}\", routes: [{}] }}",
                    s.cluster_port,
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let (js_domain, leaf) = match (domain, s.leaf_port) {
                (Some(d), Some(p)) => (
                    format!(", domain: {d}"),
                    format!("leafnodes {{ listen: \"127.0.0.1:{p}\" }}\n"),
                ),
                _ => (String::new(), String::new()),
            };
            let conf = format!(
                "server_name: {}\nlisten: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\n\
                 log_file: \"{}\"\n\
                 jetstream {{ store_dir: \"{}\"{}{} }}\n{}\n{}",
                s.name,
                s.port,
                s.monitor,
                s.log().display(),
                store.display(),
                if sync_always { ", sync_interval: always" } else { "" },
                js_domain,
                cluster,
                leaf
            );
            std::fs::write(&s.config, conf).unwrap();
        }
        for s in &mut servers {
            s.spawn();
        }
        Self {
            servers,
            _dir: dir,
            _slot: slot,
        }
    }

    /// Waits until every running server reports healthy JetStream.
    pub async fn wait_ready(&self) {
        // Generous: the machine is shared and a cold JetStream cluster on a
        // loaded 2-core box can take a while to elect its meta leader.
        let deadline = Instant::now() + Duration::from_secs(90);
        for s in self.servers.iter().filter(|s| s.is_running()) {
            loop {
                if http_get(s.monitor, "/healthz")
                    .await
                    .is_some_and(|(code, _)| code == 200)
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "nats-server {} not ready in 90 s; its log ends with:\n{}",
                    s.name,
                    s.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    pub fn urls(&self) -> String {
        self.servers.iter().map(Server::url).collect::<Vec<_>>().join(",")
    }

    /// Restarts a killed server with its config and data.
    pub async fn restart(&mut self, i: usize) {
        self.servers[i].spawn();
        self.wait_ready().await;
    }

    /// `/connz?subs=1` of every running server, merged.
    pub async fn connections(&self) -> Vec<Value> {
        let mut all = Vec::new();
        for s in self.servers.iter().filter(|s| s.is_running()) {
            if let Some((200, body)) = http_get(s.monitor, "/connz?subs=1&limit=10000").await {
                let v: Value = serde_json::from_str(&body).unwrap();
                all.extend(v["connections"].as_array().cloned().unwrap_or_default());
            }
        }
        all
    }
}

/// A NATS leaf node (no JetStream of its own) connected to every server of a
/// hub cluster started with [`Cluster::start_hub`]: the regional tier.
pub struct Leaf {
    pub server: Server,
    _dir: tempfile::TempDir,
}

impl Leaf {
    pub async fn start(name: &str, hub: &Cluster) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2);
        let mut server = Server {
            name: name.to_string(),
            port: ports[0],
            monitor: ports[1],
            cluster_port: 0,
            leaf_port: None,
            config: dir.path().join(format!("{name}.conf")),
            child: None,
        };
        let remotes: Vec<String> = hub
            .servers
            .iter()
            .filter_map(|s| s.leaf_port)
            .map(|p| format!("\"nats-leaf://127.0.0.1:{p}\""))
            .collect();
        let conf = format!(
            "server_name: {name}\nlisten: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\n\
             log_file: \"{}\"\nleafnodes {{ reconnect: 1, remotes: [ {{ urls: [{}] }} ] }}\n",
            server.port,
            server.monitor,
            server.log().display(),
            remotes.join(", ")
        );
        std::fs::write(&server.config, conf).unwrap();
        server.spawn();
        let leaf = Self { server, _dir: dir };
        leaf.wait_connected().await;
        leaf
    }

    /// Waits until the leaf node is up and connected to the hub.
    pub async fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.leafz().await.is_some_and(|v| v["leafnodes"].as_u64() == Some(1)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "leaf node {} not connected in 30 s; its log ends with:\n{}",
                self.server.name,
                self.server.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `/leafz` of the leaf node (its connection to the hub, with counters).
    pub async fn leafz(&self) -> Option<Value> {
        let (code, body) = http_get(self.server.monitor, "/leafz").await?;
        (code == 200).then(|| serde_json::from_str(&body).unwrap())
    }

    /// Messages the leaf node received from the hub and sent to it so far.
    pub async fn link_msgs(&self) -> (u64, u64) {
        let v = self.leafz().await.expect("leafz");
        let link = &v["leafs"][0];
        (link["in_msgs"].as_u64().unwrap(), link["out_msgs"].as_u64().unwrap())
    }

    /// kill -9.
    pub fn stop(&mut self) {
        self.server.kill();
    }

    /// The same process again after [`Leaf::stop`] (same ports, same config).
    pub async fn start_again(&mut self) {
        self.server.spawn();
        self.wait_connected().await;
    }
}

/// GET on a loopback port.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    super::try_http_get(&format!("http://127.0.0.1:{port}{path}")).await
}
