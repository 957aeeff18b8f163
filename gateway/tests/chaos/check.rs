//! The checker: what the streams hold at the end against what publishers
//! were told and what every subscriber received.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::clients::{PubRecord, SubRecord};

/// Per room: offset -> key of every message in its stream at the end.
pub type Truth = HashMap<String, BTreeMap<u64, String>>;

#[derive(Debug, Default)]
pub struct Report {
    pub acked: usize,
    pub acked_expired: usize,
    pub lost: Vec<String>,
    pub ack_conflicts: Vec<String>,
    pub stored_twice: Vec<String>,
    pub mismatched: Vec<String>,
    pub client_rooms: usize,
    pub deliveries: usize,
    pub duplicates: Vec<String>,
    pub out_of_order: Vec<String>,
    pub missing: Vec<String>,
    pub missing_total: usize,
    pub excused: usize,
    /// Messages a client loaded with `history` after a recovered:false.
    pub filled: usize,
    pub phantoms: Vec<String>,
    pub not_recovered: usize,
    pub unexplained: Vec<String>,
    pub anomalies: Vec<String>,
}

impl Report {
    pub fn violations(&self) -> usize {
        self.lost.len()
            + self.ack_conflicts.len()
            + self.stored_twice.len()
            + self.mismatched.len()
            + self.duplicates.len()
            + self.out_of_order.len()
            + self.missing_total
            + self.phantoms.len()
            + self.unexplained.len()
            + self.anomalies.len()
    }
}

pub fn check(truth: &Truth, pubs: &[PubRecord], subs: &[SubRecord]) -> Report {
    let mut rep = Report::default();
    let oldest = |room: &str| {
        truth
            .get(room)
            .and_then(|m| m.keys().next().copied())
            .unwrap_or(u64::MAX)
    };
    // Every message known to have existed: stream + acknowledgements.
    let mut known: HashMap<String, BTreeMap<u64, String>> = truth.clone();
    for p in pubs {
        for c in &p.conflicts {
            rep.ack_conflicts
                .push(format!("key {} acknowledged as offset {} and {}", c.0, c.1, c.2));
        }
        for (key, (room, offset)) in &p.acks {
            rep.acked += 1;
            match truth.get(room).and_then(|m| m.get(offset)) {
                Some(k) if k == key => {}
                Some(k) => rep
                    .mismatched
                    .push(format!("{room}@{offset}: acknowledged {key}, stored {k}")),
                // Gone by retention (the room's oldest kept offset is newer).
                None if *offset < oldest(room) => rep.acked_expired += 1,
                None => rep
                    .lost
                    .push(format!("{key} acknowledged at {room}@{offset}, not in the stream")),
            }
            known
                .entry(room.clone())
                .or_default()
                .entry(*offset)
                .or_insert_with(|| key.clone());
        }
    }
    for (room, msgs) in truth {
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for (o, k) in msgs {
            if let Some(prev) = seen.insert(k, *o) {
                rep.stored_twice.push(format!("{room}: key {k} at {prev} and {o}"));
            }
        }
    }
    for (ci, s) in subs.iter().enumerate() {
        rep.anomalies
            .extend(s.anomalies.iter().map(|a| format!("client s{ci}: {a}")));
        for room in &s.rooms {
            let Some(&start) = s.start.get(room) else {
                rep.missing.push(format!("client s{ci} never subscribed to {room}"));
                rep.missing_total += 1;
                continue;
            };
            rep.client_rooms += 1;
            let got: &[(u64, String)] = s.delivered.get(room).map_or(&[], |v| v.as_slice());
            rep.deliveries += got.len();
            let mut last = start;
            let mut have = HashSet::new();
            for (o, k) in got {
                if !have.insert(*o) {
                    rep.duplicates.push(format!("client s{ci} got {room}@{o} twice"));
                } else if *o <= last {
                    rep.out_of_order
                        .push(format!("client s{ci} got {room}@{o} after {last}"));
                }
                last = last.max(*o);
                match known.get(room).and_then(|m| m.get(o)) {
                    Some(want) if want == k => {}
                    Some(want) => rep
                        .mismatched
                        .push(format!("client s{ci} got {room}@{o} as {k}, stored {want}")),
                    None if *o < oldest(room) => {} // expired, unacknowledged: cannot tell
                    None => rep
                        .phantoms
                        .push(format!("client s{ci} got {room}@{o} ({k}): never stored")),
                }
            }
            // What `history` reloaded after a recovered:false counts as received.
            for (o, k) in s.filled.get(room).into_iter().flatten() {
                rep.filled += 1;
                if !have.insert(*o) {
                    rep.duplicates
                        .push(format!("client s{ci} got {room}@{o} live and from history"));
                }
                match known.get(room).and_then(|m| m.get(o)) {
                    Some(want) if want != k => rep
                        .mismatched
                        .push(format!("client s{ci} loaded {room}@{o} as {k}, stored {want}")),
                    _ => {}
                }
            }
            let gaps: Vec<_> = s.not_recovered.iter().filter(|n| &n.room == room).collect();
            let mut missing = Vec::new();
            for (o, _) in known.get(room).into_iter().flatten().filter(|(o, _)| **o > start) {
                if have.contains(o) {
                    continue;
                }
                let left = !truth.get(room).is_some_and(|m| m.contains_key(o));
                if left && gaps.iter().any(|g| g.since < *o && *o <= g.offset) {
                    rep.excused += 1;
                } else {
                    missing.push(*o);
                }
            }
            if !missing.is_empty() {
                rep.missing_total += missing.len();
                rep.missing.push(format!(
                    "client s{ci} {room}: {} missing (first {:?}; start {start}, {} sessions)",
                    missing.len(),
                    &missing[..missing.len().min(5)],
                    s.sessions
                ));
            }
        }
        for g in &s.not_recovered {
            rep.not_recovered += 1;
            // The message at `since` counts: the gateway proves that nothing
            // after `since` is gone by reading it; once it has left the
            // stream, whether a message between it and the oldest one kept
            // also left cannot be told (offsets are not contiguous per room).
            let left = known.get(&g.room).into_iter().flatten().any(|(o, _)| {
                g.since <= *o && *o <= g.offset && !truth.get(&g.room).is_some_and(|m| m.contains_key(o))
            });
            if !left {
                rep.unexplained.push(format!(
                    "client s{ci} {}: recovered:false for since {} (offset {}) with every message still stored",
                    g.room, g.since, g.offset
                ));
            }
        }
    }
    rep
}
