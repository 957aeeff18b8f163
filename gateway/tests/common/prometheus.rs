//! A real Prometheus server (Debian's `prometheus` package) scraping test
//! gateways, queried through its HTTP API. `scripts/ensure-prometheus.sh`
//! installs it; without it the tests that use it fail (never skip).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The `prometheus` binary: `$PROMETHEUS`, else `prometheus` on `PATH`.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS") {
        return p.into();
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("prometheus");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "no prometheus binary: run scripts/ensure-prometheus.sh (installs Debian's prometheus package) \
         or set PROMETHEUS"
    );
}

/// A Prometheus process with its own config and storage in a temp dir,
/// scraping `targets` every second; killed on drop.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) as
    /// job `gateway`, and waits until it is ready.
    pub async fn start(targets: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    \
             scrape_interval: 1s\n    static_configs:\n      - targets: [{list}]\n"
        );
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        for _ in 0..5 {
            // A free port, released for Prometheus (retried if taken meanwhile).
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let mut child = Command::new(binary())
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("prometheus starts");
            for _ in 0..100 {
                if let Some((200, _)) = get(port, "/-/ready").await {
                    return Self { child, port, _dir: dir };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
        panic!("prometheus did not become ready; log:\n{log}");
    }

    /// An instant query: the `data.result` array. Panics on an API error
    /// (a query that does not parse, for example) with Prometheus's message.
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", encode(expr));
        let (status, body) = get(self.port, &path)
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer {expr}"));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "query {expr}: {status} {body}"
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of `expr`, `None` when it has no series.
    pub async fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr).await;
        assert!(r.len() <= 1, "{expr} has {} series: {r:?}", r.len());
        r.first().map(sample)
    }

    /// Waits (at most 30 s) until `expr` has the value `want`; returns the
    /// last value seen on timeout for the caller's message.
    pub async fn wait_for(&self, expr: &str, want: f64) -> Result<(), Option<f64>> {
        let mut last = None;
        for _ in 0..300 {
            last = self.value(expr).await;
            if last == Some(want) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series of a query result.
pub fn sample(series: &Value) -> f64 {
    let v = series["value"][1].as_str().unwrap_or("NaN");
    v.parse().unwrap_or(f64::NAN)
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A GET of `path` on the loopback `port` ([`super::try_http_get`]).
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    super::try_http_get(&format!("http://127.0.0.1:{port}{path}")).await
}
