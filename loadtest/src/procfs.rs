//! Process and kernel figures read from /proc: CPU time, RSS and peak RSS of a
//! pid (the server, or the load generator itself), and kernel TCP memory.
//!
//! Linux only. CPU times in /proc are in USER_HZ ticks, which is 100 on every
//! Linux ABI the project runs on.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

const TICKS_PER_SEC: f64 = 100.0;

/// CPU time and memory of one process at one instant.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    pub rss_bytes: u64,
    /// Peak RSS over the process lifetime (VmHWM).
    pub hwm_bytes: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `pid` may be `self` or
/// `<pid>/task/<tid>` for one thread.
pub fn sample(pid: &str) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Ok(ProcSample {
        cpu_s: cpu_ticks(&stat)? as f64 / TICKS_PER_SEC,
        rss_bytes: status_number(&status, "VmRSS:") * 1024,
        hwm_bytes: status_number(&status, "VmHWM:") * 1024,
    })
}

/// utime + stime from a stat line; fields after the `(comm)` which may hold spaces.
fn cpu_ticks(stat: &str) -> Result<u64> {
    let after = &stat[stat.rfind(')').context("stat without comm")? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // after "(comm) ": state is field 3 of the man page, so utime (14) is index 11.
    let utime: u64 = f.get(11).context("stat too short")?.parse()?;
    let stime: u64 = f.get(12).context("stat too short")?.parse()?;
    Ok(utime + stime)
}

/// Open file descriptors of `pid`.
pub fn fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd")).ok().map(|d| d.count())
}

/// OS threads of `pid` (`Threads:` of its status).
pub fn threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(status_number(&status, "Threads:"))
}

/// The first number after `key` in a status file (kB for the memory lines), 0 if absent.
fn status_number(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU use of a process over an interval, as a fraction of one core.
#[derive(Clone, Debug)]
pub struct CpuMeter {
    pid: String,
    start: ProcSample,
    at: Instant,
}

impl CpuMeter {
    pub fn start(pid: &str) -> Result<Self> {
        Ok(Self {
            pid: pid.to_string(),
            start: sample(pid)?,
            at: Instant::now(),
        })
    }

    /// (cores used since start, latest sample)
    pub fn read(&self) -> Result<(f64, ProcSample)> {
        let now = sample(&self.pid)?;
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        Ok(((now.cpu_s - self.start.cpu_s) / wall, now))
    }
}

/// Kernel-wide TCP figures from /proc/net/sockstat.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SockStat {
    pub tcp_inuse: u64,
    /// TCP buffer memory, bytes (the `mem` field is in pages).
    pub tcp_mem_bytes: u64,
}

pub fn sockstat() -> Result<SockStat> {
    parse_sockstat(&std::fs::read_to_string("/proc/net/sockstat")?)
}

fn parse_sockstat(text: &str) -> Result<SockStat> {
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line in sockstat")?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| -> u64 {
        f.iter()
            .position(|x| *x == name)
            .and_then(|i| f.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(SockStat {
        tcp_inuse: field("inuse"),
        tcp_mem_bytes: field("mem") * 4096,
    })
}

/// Kernel-wide count of connections dropped because a listen backlog was
/// full (TcpExt ListenOverflows in /proc/net/netstat): a storm that hits it
/// waits for SYN retransmits (1 s, 3 s, ...), which is the server's backlog
/// setting, not its handshake speed.
pub fn listen_overflows() -> Result<u64> {
    parse_netstat(
        &std::fs::read_to_string("/proc/net/netstat")?,
        "TcpExt:",
        "ListenOverflows",
    )
}

fn parse_netstat(text: &str, prefix: &str, field: &str) -> Result<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        anyhow::bail!("no {prefix} lines in netstat");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == field)
        .with_context(|| format!("no {field}"))?;
    Ok(values
        .split_whitespace()
        .nth(i)
        .context("short netstat line")?
        .parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_threads_and_open_files() {
        let me = std::process::id();
        assert!(threads(me).unwrap() >= 1);
        assert!(fds(me).unwrap() >= 3, "stdin, stdout, stderr");
        assert_eq!(threads(u32::MAX), None, "no such process");
    }

    #[test]
    fn stat_with_spaces_in_comm_is_parsed() {
        let stat = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 1000 200";
        assert_eq!(cpu_ticks(stat).unwrap(), 325);
    }

    #[test]
    fn sockstat_mem_is_pages() {
        let s = "sockets: used 120\nTCP: inuse 40 orphan 0 tw 3 alloc 45 mem 12\nUDP: inuse 1 mem 0\n";
        let got = parse_sockstat(s).unwrap();
        assert_eq!((got.tcp_inuse, got.tcp_mem_bytes), (40, 12 * 4096));
    }

    #[test]
    fn netstat_field_is_found_by_name() {
        let t = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 5 170884 170900\nIpExt: A\nIpExt: 1\n";
        assert_eq!(parse_netstat(t, "TcpExt:", "ListenOverflows").unwrap(), 170_884);
        assert!(parse_netstat(t, "TcpExt:", "Nope").is_err());
    }

    #[test]
    fn own_process_is_readable() {
        let s = sample("self").unwrap();
        assert!(s.rss_bytes > 0 && s.hwm_bytes >= s.rss_bytes);
    }
}
