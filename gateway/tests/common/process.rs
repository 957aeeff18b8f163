//! The `gateway` binary as an operator runs it: a child process listening on
//! 127.0.0.1 (port 0 on its first start), with JSON logs on stderr that are
//! kept for the test. Killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A gateway process.
pub struct GatewayProcess {
    child: Option<Child>,
    args: Vec<String>,
    /// `host:port` it listens on (the same after a [`GatewayProcess::restart`]).
    pub addr: String,
    /// Every line it wrote to stderr (logs, warnings, the dev-mode banner).
    log: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts `gateway --listen 127.0.0.1:0 --log-format json <args>` without
    /// `GATEWAY_JWT_SECRET` from the environment (so dev mode unless `args`
    /// configure a key), and waits for its listening line.
    pub fn start(args: &[&str]) -> Self {
        let mut g = Self {
            child: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            addr: "127.0.0.1:0".into(),
            log: Arc::default(),
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &self.addr, "--log-format", "json"])
            .args(&self.args)
            .env_remove("GATEWAY_JWT_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway binary starts");
        let mut reader = BufReader::new(child.stderr.take().unwrap());
        let addr = loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                panic!("gateway exited before listening: {}", self.logs());
            }
            self.log.lock().unwrap().push(line.trim_end().to_string());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(addr) = v["fields"]["addr"].as_str()
            {
                break addr.to_string();
            }
        };
        // Keep reading, so the child never blocks on a full pipe.
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        self.addr = addr;
        self.child = Some(child);
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` (`TERM`, `HUP`...) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{signal} {pid} failed");
    }

    /// Its exit status once it exits by itself, or `None` if it is still
    /// running after `timeout`.
    pub async fn exited(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let t = std::time::Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            if t.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no drain, no close frames.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address, with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Its stderr so far, one line each.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Its stderr once `needle` shows up in it (at most 10 s).
    pub fn log_with(&self, needle: &str) -> String {
        for _ in 0..200 {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{needle:?} not in the gateway's log:\n{}", self.logs());
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
