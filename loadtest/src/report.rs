//! Human-readable output: one table per scenario result. JSON output is the
//! serde form of the same report structs, written by `main`.

use crate::calibrate::CalibrateReport;
use crate::scenario::fanout::{FanoutReport, step_line};
use crate::scenario::idle::IdleReport;
use crate::scenario::rooms::RoomsReport;
use crate::scenario::storm::StormReport;

pub fn rate(v: Option<f64>) -> String {
    v.map_or("none".into(), |v| format!("{:.0}/s", v))
}

pub fn bytes(v: f64) -> String {
    if v.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", v / 1024.0 / 1024.0)
    } else if v.abs() >= 1024.0 {
        format!("{:.1} KiB", v / 1024.0)
    } else {
        format!("{v:.0} B")
    }
}

fn table(title: &str, rows: &[(&str, String)]) {
    println!("{title}");
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}

pub fn fanout(r: &FanoutReport) {
    println!("steps:");
    for s in &r.steps {
        println!("{}", step_line(s));
    }
    table(
        &format!(
            "{} against {} ({} subscribers, {} B payloads)",
            r.scenario,
            r.target.label(),
            r.subs,
            r.size
        ),
        &[
            ("connect time", format!("{:.1} s", r.connect_secs)),
            (
                "strict ceiling",
                format!(
                    "{} (p99 {}; bound: zero loss, p99 <= {} ms)",
                    rate(r.strict_ceiling_dps),
                    r.strict_ceiling_p99_ms.map_or("-".into(), |p| format!("{p:.1} ms")),
                    r.bounds.strict_p99_ms
                ),
            ),
            (
                "keep-up ceiling",
                format!(
                    "{} (p99 {}; bound: zero loss, p99 <= {} ms)",
                    rate(r.keepup_ceiling_dps),
                    r.keepup_ceiling_p99_ms.map_or("-".into(), |p| format!("{p:.1} ms")),
                    r.bounds.keepup_p99_ms
                ),
            ),
            (
                "load generator CPU max",
                format!(
                    "{:.2} cores{}",
                    r.loadgen_cpu_max,
                    if r.client_saturated { " (SATURATED)" } else { "" }
                ),
            ),
            ("notes", r.notes.join("; ")),
        ],
    );
}

pub fn idle(r: &IdleReport) {
    table(
        &format!(
            "idle against {} ({} connections, {} rooms)",
            r.target.label(),
            r.conns,
            r.rooms
        ),
        &[
            ("connected", format!("{} in {:.1} s", r.connected, r.connect_secs)),
            ("failures", format!("{:?}", r.failures)),
            ("disconnects", format!("{:?}", r.disconnects)),
            (
                "server RSS before / after / end",
                format!(
                    "{} / {} / {}",
                    r.server_rss_before.map_or("-".into(), |v| bytes(v as f64)),
                    r.server_rss_after.map_or("-".into(), |v| bytes(v as f64)),
                    r.server_rss_end.map_or("-".into(), |v| bytes(v as f64)),
                ),
            ),
            (
                "server RSS per connection",
                r.server_rss_per_conn.map_or("- (no --server-pid)".into(), bytes),
            ),
            (
                "kernel TCP memory per connection",
                format!("{} (both loopback ends)", bytes(r.kernel_tcp_mem_per_conn)),
            ),
            ("load generator RSS per connection", bytes(r.loadgen_rss_per_conn)),
        ],
    );
}

pub fn storm(r: &StormReport) {
    table(
        &format!(
            "storm against {} ({} clients, {:?})",
            r.target.label(),
            r.clients,
            r.alg
        ),
        &[
            ("connected", format!("{}/{}", r.connected, r.clients)),
            (
                "all connected after",
                r.all_connected_secs
                    .map_or("never (see refusals)".into(), |s| format!("{s:.2} s")),
            ),
            ("last attempt ended after", format!("{:.2} s", r.finished_secs)),
            (
                "connect latency",
                format!(
                    "p50 {:.1} p99 {:.1} max {:.1} ms",
                    r.connect_latency.p50_ms, r.connect_latency.p99_ms, r.connect_latency.max_ms
                ),
            ),
            ("refusals", format!("{:?}", r.refusals)),
            (
                "server RSS before / peak",
                format!(
                    "{} / {}",
                    r.server_rss_before.map_or("-".into(), |v| bytes(v as f64)),
                    r.server_rss_peak.map_or("-".into(), |v| bytes(v as f64))
                ),
            ),
            (
                "server CPU during storm",
                r.server_cpu_secs.map_or("-".into(), |c| format!("{c:.2} s")),
            ),
            ("load generator CPU", format!("{:.2} cores", r.loadgen_cpu)),
            (
                "listen backlog overflows",
                r.listen_overflows.map_or("-".into(), |n| n.to_string()),
            ),
            ("token signing (before the clock)", format!("{:.2} s", r.signing_secs)),
            ("notes", r.notes.join("; ")),
        ],
    );
}

pub fn rooms(r: &RoomsReport) {
    let mut rows = vec![
        (
            "users x rooms",
            format!(
                "{} x {} (pool {}, {} members per room)",
                r.users, r.rooms_per_user, r.pool, r.members_per_room
            ),
        ),
        (
            "subscribe round trip",
            format!(
                "p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms (arrivals over {:.1} s)",
                r.subscribe.p50_ms, r.subscribe.p90_ms, r.subscribe.p99_ms, r.subscribe.max_ms, r.arrival_secs
            ),
        ),
        ("refused rooms", r.refused_rooms.to_string()),
        ("failures", format!("{:?}", r.failures)),
    ];
    if let Some(s) = &r.traffic {
        rows.push(("traffic", step_line(s)));
    }
    table(&format!("rooms against {}", r.target.label()), &rows);
}

pub fn calibrate(r: &CalibrateReport) {
    table(
        &format!("calibrate: load generator absorbing {} frames", r.format.label()),
        &[
            ("connections", r.conns.to_string()),
            ("deliveries/s", format!("{:.0}", r.deliveries_per_sec)),
            ("client thread CPU", format!("{:.2} cores", r.client_cpu)),
            (
                "deliveries per client CPU-second",
                format!(
                    "{:.0} ({})",
                    r.deliveries_per_client_cpu_sec,
                    if r.meets_2m_per_core {
                        "meets 2M/s per core"
                    } else {
                        "BELOW 2M/s per core"
                    }
                ),
            ),
            (
                "server thread CPU",
                r.server_thread_cpu.map_or("-".into(), |c| format!("{c:.2} cores")),
            ),
            ("duplicates", r.duplicates.to_string()),
        ],
    );
}

pub fn wire(r: &crate::scenario::wire::WireReport) {
    let mut rows = Vec::new();
    for m in &r.modes {
        let mode = if m.deflate {
            "permessage-deflate"
        } else {
            "uncompressed"
        };
        rows.push((
            "chat: bytes per delivery",
            format!(
                "{mode}: {:.1} B (data {:.0} B)",
                m.chat_bytes_per_delivery, m.chat_data_bytes
            ),
        ));
        rows.push((
            "catch-up: bytes (reply + pushes)",
            format!(
                "{mode}: {} for {} messages",
                bytes(m.catchup_bytes as f64),
                m.catchup_messages
            ),
        ));
    }
    table(
        &format!(
            "wire: {} subscribers x {} chat messages; catch-up of {} rooms",
            r.subs, r.messages, r.rooms
        ),
        &rows,
    );
}
