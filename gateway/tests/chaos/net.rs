//! Network namespaces the chaos run creates: one per NATS server and per
//! gateway, joined by a bridge in a hub namespace, so faults hit real links.
//!
//! ```text
//!  root ns (test: clients, proxies)        hub ns: bridge br0 (10.R.0.0/24)
//!    cx-r 10.R.0.1  <---- veth ---->  br0 <---- veth ----> n<i> ns: 10.R.0.(10+i)  nats-server
//!                                     br0 <---- veth ----> g<j> ns: 10.R.0.(20+j)  gateway (to NATS)
//!    10.R.(1+j).1/30 <------------------- veth ----------> g<j> ns: 10.R.(1+j).2  gateway (clients)
//! ```
//! Taking a hub-side veth down partitions that process from everything
//! behind the bridge (a NATS server from its peers and the gateways; a
//! gateway from NATS while its clients stay connected); `tc tbf` on a
//! hub-side veth throttles what the process receives. Everything is
//! deleted on drop (and stale namespaces of dead runs at start).

use std::process::Command;

/// Runs `ip`/`tc` (optionally inside a namespace); panics with the output on failure.
pub fn run(ns: Option<&str>, args: &[&str]) {
    let out = cmd(ns, args).output().expect("ip/tc runs (package iproute2)");
    assert!(
        out.status.success(),
        "{} {:?} failed: {}",
        ns.map_or(String::new(), |n| format!("ip netns exec {n}")),
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `args` as a command, inside `ns` when given.
pub fn cmd(ns: Option<&str>, args: &[&str]) -> Command {
    match ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n]).args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    }
}

pub struct Net {
    /// Name prefix of this run's namespaces (`gwcx<pid>`).
    pub tag: String,
    /// Second octet of this run's addresses (10.R.x.y).
    pub r: u8,
    pub nats: usize,
    pub gateways: usize,
}

impl Net {
    /// Creates the namespaces and links. Needs root (CAP_NET_ADMIN).
    pub fn create(nats: usize, gateways: usize) -> Self {
        let uid = Command::new("id").arg("-u").output().expect("id runs");
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "the chaos run creates network namespaces and needs root"
        );
        clean_stale();
        let pid = std::process::id();
        let r = free_octet(pid);
        let net = Self {
            tag: format!("gwcx{pid}"),
            r,
            nats,
            gateways,
        };
        let hub = net.hub();
        run(None, &["ip", "netns", "add", &hub]);
        run(Some(&hub), &["ip", "link", "set", "lo", "up"]);
        run(Some(&hub), &["ip", "link", "add", "br0", "type", "bridge"]);
        run(Some(&hub), &["ip", "link", "set", "br0", "up"]);
        // The test's own leg on the bridge (clients of NATS: proxies, checker).
        let root_if = format!("{}r", net.tag);
        run(
            None,
            &["ip", "link", "add", &root_if, "type", "veth", "peer", "name", "hub-r"],
        );
        run(None, &["ip", "link", "set", "hub-r", "netns", &hub]);
        run(None, &["ip", "addr", "add", &format!("10.{r}.0.1/24"), "dev", &root_if]);
        run(None, &["ip", "link", "set", &root_if, "up"]);
        run(Some(&hub), &["ip", "link", "set", "hub-r", "master", "br0", "up"]);
        for i in 0..nats {
            net.leaf(&net.nats_ns(i), &format!("n{i}"), &net.nats_ip(i));
        }
        for j in 0..gateways {
            let ns = net.gateway_ns(j);
            net.leaf(&ns, &format!("g{j}"), &format!("10.{r}.0.{}", 20 + j));
            // The clients' link, straight to the root namespace.
            let root_side = format!("{}c{j}", net.tag);
            run(
                None,
                &["ip", "link", "add", &root_side, "type", "veth", "peer", "name", "cli"],
            );
            run(None, &["ip", "link", "set", "cli", "netns", &ns]);
            run(
                None,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.{r}.{}.1/30", 1 + j),
                    "dev",
                    &root_side,
                ],
            );
            run(None, &["ip", "link", "set", &root_side, "up"]);
            run(
                Some(&ns),
                &["ip", "addr", "add", &format!("{}/30", net.gateway_ip(j)), "dev", "cli"],
            );
            run(Some(&ns), &["ip", "link", "set", "cli", "up"]);
        }
        net
    }

    /// A namespace `ns` with one veth `eth0` (address `ip`/24) on the bridge
    /// (hub side named `hub_if`).
    fn leaf(&self, ns: &str, hub_if: &str, ip: &str) {
        let hub = self.hub();
        run(None, &["ip", "netns", "add", ns]);
        run(Some(ns), &["ip", "link", "set", "lo", "up"]);
        run(
            Some(ns),
            &["ip", "link", "add", "eth0", "type", "veth", "peer", "name", hub_if],
        );
        run(Some(ns), &["ip", "link", "set", hub_if, "netns", &hub]);
        run(Some(ns), &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        run(Some(ns), &["ip", "link", "set", "eth0", "up"]);
        run(Some(&hub), &["ip", "link", "set", hub_if, "master", "br0", "up"]);
    }

    pub fn hub(&self) -> String {
        format!("{}-hub", self.tag)
    }
    pub fn nats_ns(&self, i: usize) -> String {
        format!("{}-n{i}", self.tag)
    }
    pub fn gateway_ns(&self, j: usize) -> String {
        format!("{}-g{j}", self.tag)
    }
    /// A NATS server's address (client 4222, routes 6222, monitor 8222).
    pub fn nats_ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.r, 10 + i)
    }
    /// The test's own address on the bridge (proxies listen here).
    pub fn root_ip(&self) -> String {
        format!("10.{}.0.1", self.r)
    }
    /// A gateway's address for clients (it listens on :8080).
    pub fn gateway_ip(&self, j: usize) -> String {
        format!("10.{}.{}.2", self.r, 1 + j)
    }

    /// Takes the hub side of a NATS server's (`n<i>`) or gateway's (`g<j>`)
    /// link down or up.
    pub fn link(&self, hub_if: &str, up: bool) {
        run(
            Some(&self.hub()),
            &["ip", "link", "set", hub_if, if up { "up" } else { "down" }],
        );
    }

    /// Throttles what flows through the bridge to `hub_if` with a token
    /// bucket (`rate` like "256kbit"), or removes the throttle.
    pub fn throttle(&self, hub_if: &str, rate: Option<&str>) {
        let hub = self.hub();
        match rate {
            Some(rate) => run(
                Some(&hub),
                &[
                    "tc", "qdisc", "replace", "dev", hub_if, "root", "tbf", "rate", rate, "burst", "16kbit", "latency",
                    "400ms",
                ],
            ),
            None => {
                let _ = cmd(Some(&hub), &["tc", "qdisc", "del", "dev", hub_if, "root"]).output();
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        delete_tagged(&self.tag);
    }
}

fn namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Deletes this run's namespaces (their veths go with them) and root-side links.
fn delete_tagged(tag: &str) {
    for ns in namespaces().into_iter().filter(|n| n.starts_with(&format!("{tag}-"))) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    }
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip runs");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = l.split(':').nth(1).map(|s| s.trim().split('@').next().unwrap_or(""))
            && name.starts_with(tag)
        {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
    }
}

/// Namespaces of runs whose process is gone (killed before its drop ran).
fn clean_stale() {
    for ns in namespaces() {
        let Some(rest) = ns.strip_prefix("gwcx") else { continue };
        let Some(pid) = rest.split('-').next() else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_tagged(&format!("gwcx{pid}"));
        }
    }
}

/// A second octet whose 10.R.0.0/16 no interface of the root namespace uses.
fn free_octet(pid: u32) -> u8 {
    let out = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .expect("ip runs");
    let used = String::from_utf8_lossy(&out.stdout).to_string();
    (0..50)
        .map(|k| 200 + ((pid as usize + k) % 50) as u8)
        .find(|r| !used.contains(&format!(" 10.{r}.")))
        .expect("a free 10.x.0.0/16 among 10.200-249")
}
