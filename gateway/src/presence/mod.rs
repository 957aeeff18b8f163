//! Presence: who is in a room, cluster-wide, eventually consistent.
//!
//! Each node reads its own subscribed connections per room (any mode) from
//! the room index's member sets and, for rooms with at most `list_max` local
//! connections, which users (`sub`s) they are, from the connection
//! registry: presence keeps no index of its own, and a join costs it one
//! flag test (see `rooms::presence`).
//!
//! **Counts** travel in summaries. Every `interval` each gateway publishes
//! on `<prefix>.presence.<node id>` the rooms whose local membership
//! changed since its last summary, as `(room, connections)` (an empty
//! summary is the heartbeat), in messages of at most [`MAX_SUMMARY_BYTES`].
//! Every gateway keeps the latest view of every other gateway; a query adds
//! them to its own live counts.
//! - A gateway that starts asks for full summaries (`<prefix>.presence_sync`),
//!   and every gateway sends its whole state on its next tick; a receiver
//!   that sees a gap in a gateway's sequence numbers asks that gateway again.
//! - A gateway not heard from for [`EXPIRY_INTERVALS`] intervals is dropped
//!   from the view: a dead gateway's members disappear within
//!   `3 x interval` (3 s by default) after its last summary.
//! - `age_ms` is the age of the oldest remote summary a count relies on.
//!
//! **User lists** do not travel with every change: a login storm of 1,000
//! users into 2,000 rooms of 200 would otherwise send every changed room's
//! whole list each interval (measured: tens of MB/s and 1.5 us more CPU per
//! join). A list travels only where someone needs it:
//! - rooms someone *watches* (a subscription with `"presence":true`): each
//!   summary says which rooms its node watches when that changed, and every
//!   gateway adds its local list to its entries for rooms watched anywhere;
//! - any other room's list is gathered when asked: a request on
//!   `<prefix>.presence_list` that the gateways holding members of the room
//!   answer (the ones the counts name), waited for at most [`GATHER_WAIT`].
//!
//! Cost: per gateway, one message per interval plus ~25 bytes per changed
//! room, plus the lists of watched rooms that changed (bounded by churn, not
//! by members); every gateway receives every other gateway's messages.
//! Embedded mode: this node alone, no messages.
//!
//! Presence pushes: a subscription with `"presence":true` gets, at most
//! once per interval, the users who joined and left the room since the
//! previous push (computed from the same view, so a reconnect storm within
//! an interval is no push at all), only while the room is within the list
//! bound. They reach the connection as an order on its `ConnHandle`.
//!
//! Owns the cluster view and the watchers; the room index tells it which
//! rooms changed, the client op and the server API ask it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt as _;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::nats::follow;
use crate::control::{ConnHandle, Order, Registry};
use crate::model::{ConnId, RoomId};
use crate::rooms::RoomIndex;

/// Intervals without a summary after which a gateway is dropped.
pub const EXPIRY_INTERVALS: u32 = 3;
/// Largest summary message; a bigger one is split.
pub const MAX_SUMMARY_BYTES: usize = 256 * 1024;
/// Longest wait for the gateways' answers to a list request.
pub const GATHER_WAIT: Duration = Duration::from_millis(250);

/// One room in a summary: `(room, connections, users or null)`.
type Entry = (String, u32, Option<Vec<String>>);

#[derive(Debug, Serialize, Deserialize)]
struct Summary {
    node: String,
    seq: u64,
    /// The first message of a full summary: drop the node's old view.
    reset: bool,
    rooms: Vec<Entry>,
    /// The rooms the node watches, when that changed (always with `reset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watch: Option<Vec<String>>,
}

/// A gateway's answer to a list request.
#[derive(Debug, Serialize, Deserialize)]
struct ListAnswer {
    node: String,
    /// `null`: over the bound on that gateway.
    users: Option<Vec<String>>,
}

#[derive(Debug, Default)]
struct NodeView {
    seen: Option<Instant>,
    seq: u64,
    rooms: HashMap<String, (u32, Option<Vec<String>>)>,
    watch: HashSet<String>,
}

/// A room's presence as a query answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPresence {
    /// Connections subscribed, every gateway.
    pub count: u64,
    /// Age of the oldest remote view used, milliseconds.
    pub age_ms: u64,
    /// Distinct users, when the room is within the list bound everywhere.
    pub users: Option<Vec<String>>,
}

/// What the view says of a room, without asking anyone.
struct Snapshot {
    count: u64,
    oldest: Option<Instant>,
    /// Users known so far (`None`: some gateway is over the bound).
    users: Option<HashSet<String>>,
    /// Gateways with members whose list the view lacks.
    missing: Vec<String>,
}

/// The presence state of a node (see the module doc).
pub struct Presence {
    node_id: String,
    list_max: usize,
    interval: Duration,
    /// The local membership (member sets and changed rooms).
    rooms: Arc<RoomIndex>,
    /// The user of each local connection.
    registry: Arc<Registry>,
    view: RwLock<HashMap<String, NodeView>>,
    nats: Option<(async_nats::Client, String)>,
    send_full: AtomicBool,
    /// This node's watched rooms changed since the last summary.
    watch_changed: AtomicBool,
    seq: AtomicU64,
    /// Connections that asked for presence pushes, by room.
    watchers: DashMap<RoomId, Watch, foldhash::fast::RandomState>,
    /// Rooms in `watchers` (`DashMap::is_empty` locks every shard).
    watched: std::sync::atomic::AtomicUsize,
    /// The node's services tracker, from [`Presence::start`] (a new watch's
    /// gather runs on it).
    tasks: std::sync::OnceLock<TaskTracker>,
}

/// The presence pushes of one room.
struct Watch {
    conns: Vec<(ConnId, Arc<ConnHandle>)>,
    /// The users at the previous push (`None`: over the bound).
    last: Option<HashSet<String>>,
    /// `last` is known: false while a gateway that held members when the
    /// watch began has not sent its list yet (changes until then are not
    /// pushed; the first complete view becomes the baseline).
    primed: bool,
}

impl Presence {
    /// `nats`: the client and the subject prefix in cluster mode; `rooms`
    /// and `registry`: the node's, read for local counts and users.
    pub fn new(
        node_id: &str,
        list_max: usize,
        interval: Duration,
        nats: Option<(async_nats::Client, String)>,
        rooms: Arc<RoomIndex>,
        registry: Arc<Registry>,
    ) -> Self {
        Self {
            node_id: node_id.to_string(),
            list_max,
            interval,
            rooms,
            registry,
            view: RwLock::default(),
            nats,
            send_full: AtomicBool::new(true),
            watch_changed: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            watchers: DashMap::default(),
            watched: std::sync::atomic::AtomicUsize::new(0),
            tasks: std::sync::OnceLock::new(),
        }
    }

    /// Connection `conn` wants presence pushes for `room`. A new watch whose
    /// view lacks some gateway's list gathers it at once (in the
    /// background, at most [`GATHER_WAIT`]) for the baseline the first
    /// push is computed against; until then changes wait.
    pub fn watch(self: &Arc<Self>, room: &RoomId, conn: ConnId, handle: &Arc<ConnHandle>) {
        let mut unprimed = None;
        let mut w = self.watchers.entry(room.clone()).or_insert_with(|| {
            self.watched.fetch_add(1, Ordering::Relaxed);
            self.watch_changed.store(true, Ordering::Relaxed);
            // Other gateways may be watching it too: send this node's list.
            self.rooms.presence_touch(room);
            let snap = self.snapshot(room);
            let primed = snap.missing.is_empty();
            if !primed {
                unprimed = Some((snap.users.clone(), snap.missing.clone(), snap.count));
            }
            Watch {
                conns: Vec::new(),
                last: snap.users.filter(|u| self.within(snap.count, u)),
                primed,
            }
        });
        if !w.conns.iter().any(|(c, _)| *c == conn) {
            w.conns.push((conn, handle.clone()));
        }
        drop(w);
        if let Some((known, missing, count)) = unprimed
            && let Some(tasks) = self.tasks.get()
        {
            // Bounded by GATHER_WAIT: no stop signal needed.
            let (this, room) = (self.clone(), room.clone());
            tasks.spawn(async move {
                let Some(more) = this.gather(&room, &missing).await else {
                    return;
                };
                if let Some(mut w) = this.watchers.get_mut(&room)
                    && !w.primed
                {
                    w.last = known
                        .map(|mut k| {
                            k.extend(more);
                            k
                        })
                        .filter(|u| this.within(count, u));
                    w.primed = true;
                }
            });
        }
    }

    /// Connection `conn` no longer wants presence pushes for `room`.
    pub fn unwatch(&self, room: &RoomId, conn: ConnId) {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(mut w) = self.watchers.get_mut(room) {
            w.conns.retain(|(c, _)| *c != conn);
            if !w.conns.is_empty() {
                return;
            }
        } else {
            return;
        }
        if self.watchers.remove_if(room, |_, w| w.conns.is_empty()).is_some() {
            self.watched.fetch_sub(1, Ordering::Relaxed);
            self.watch_changed.store(true, Ordering::Relaxed);
        }
    }

    /// Sends each watched room's joins and leaves since its previous push:
    /// one push per room per interval, whatever the churn (a user who left
    /// and came back within it is neither). Rooms over the bound get none;
    /// a room whose lists have not all arrived waits for them (the changes
    /// are pushed once they have).
    fn push_changes(&self) {
        let rooms: Vec<RoomId> = self.watchers.iter().map(|e| e.key().clone()).collect();
        for room in rooms {
            let now = self.snapshot(&room);
            if !now.missing.is_empty() {
                continue;
            }
            let users = now.users.filter(|u| self.within(now.count, u));
            let Some(mut w) = self.watchers.get_mut(&room) else {
                continue;
            };
            if !w.primed {
                w.last = users;
                w.primed = true;
                continue;
            }
            if let (Some(before), Some(after)) = (&w.last, &users) {
                let mut join: Vec<String> = after.difference(before).cloned().collect();
                let mut leave: Vec<String> = before.difference(after).cloned().collect();
                if !join.is_empty() || !leave.is_empty() {
                    join.sort();
                    leave.sort();
                    let (join, leave): (Arc<[String]>, Arc<[String]>) = (join.into(), leave.into());
                    for (_, h) in &w.conns {
                        h.send(Order::Presence {
                            room: room.clone(),
                            count: now.count,
                            join: join.clone(),
                            leave: leave.clone(),
                        });
                    }
                }
            }
            w.last = users;
        }
    }

    /// The list bound (members).
    pub fn list_max(&self) -> usize {
        self.list_max
    }

    fn within(&self, count: u64, users: &HashSet<String>) -> bool {
        count as usize <= self.list_max && users.len() <= self.list_max
    }

    /// `room` on this node: connections and, if `list` and within the
    /// bound, their distinct users (sorted). `clear`: a summary reads it
    /// (re-arms the room's change flag).
    fn local_entry(&self, room: &RoomId, clear: bool, list: bool) -> Entry {
        let bound = if list { self.list_max } else { 0 };
        let p = self.rooms.presence(room, bound, clear);
        let users = p.conns.filter(|_| list).map(|conns| {
            let mut users: Vec<String> = conns
                .into_iter()
                .filter_map(|c| self.registry.user_of(c))
                .map(|u| u.to_string())
                .collect();
            users.sort_unstable();
            users.dedup();
            users
        });
        (room.as_str().to_string(), p.count, users)
    }

    /// The view of `room`: this node live, the others from their latest
    /// summaries.
    fn snapshot(&self, room: &RoomId) -> Snapshot {
        let now = Instant::now();
        let (_, mine, my_users) = self.local_entry(room, false, true);
        let mut snap = Snapshot {
            count: u64::from(mine),
            oldest: None,
            users: my_users.map(|u| u.into_iter().collect()),
            missing: Vec::new(),
        };
        let expiry = self.interval * EXPIRY_INTERVALS;
        for (node, v) in self.view.read().iter() {
            let Some(seen) = v.seen else { continue };
            if node == &self.node_id || now.duration_since(seen) > expiry {
                continue;
            }
            snap.oldest = Some(snap.oldest.map_or(seen, |o| o.min(seen)));
            if let Some((n, list)) = v.rooms.get(room.as_str()) {
                snap.count += u64::from(*n);
                match (&mut snap.users, list) {
                    (Some(all), Some(theirs)) => all.extend(theirs.iter().cloned()),
                    (Some(_), None) if (*n as usize) <= self.list_max => snap.missing.push(node.clone()),
                    _ => snap.users = None,
                }
            }
        }
        snap
    }

    /// The room's presence now: this node's live state plus the latest
    /// summaries of the other gateways; a small room's list is gathered
    /// from the gateways holding its members when the summaries lack it
    /// (at most [`GATHER_WAIT`]; a gateway that does not answer in time
    /// leaves the answer without a list).
    pub async fn room(&self, room: &RoomId) -> RoomPresence {
        let now = Instant::now();
        let mut snap = self.snapshot(room);
        if snap.count as usize > self.list_max {
            snap.users = None;
        }
        if let (Some(users), false) = (&mut snap.users, snap.missing.is_empty()) {
            match self.gather(room, &snap.missing).await {
                Some(more) => users.extend(more),
                None => snap.users = None,
            }
        }
        let users = snap.users.filter(|u| self.within(snap.count, u)).map(|u| {
            let mut v: Vec<String> = u.into_iter().collect();
            v.sort();
            v
        });
        RoomPresence {
            count: snap.count,
            age_ms: snap.oldest.map_or(0, |o| now.duration_since(o).as_millis() as u64),
            users,
        }
    }

    /// Asks `nodes` for their users of `room`; `None` unless every one
    /// answered with a list in time.
    async fn gather(&self, room: &RoomId, nodes: &[String]) -> Option<Vec<String>> {
        let (client, prefix) = self.nats.as_ref()?;
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(inbox.clone()).await.ok()?;
        client
            .publish_with_reply(
                format!("{prefix}.presence_list"),
                inbox,
                room.as_str().to_string().into(),
            )
            .await
            .ok()?;
        let mut waiting: HashSet<&str> = nodes.iter().map(String::as_str).collect();
        let mut users = Vec::new();
        let deadline = tokio::time::Instant::now() + GATHER_WAIT;
        while !waiting.is_empty() {
            let msg = tokio::time::timeout_at(deadline, answers.next()).await.ok()??;
            let Ok(a) = serde_json::from_slice::<ListAnswer>(&msg.payload) else {
                continue;
            };
            if waiting.remove(a.node.as_str()) {
                users.extend(a.users?);
            }
        }
        Some(users)
    }

    /// Cluster mode: publishes summaries every interval and follows the
    /// other gateways', on `tasks` until `stop`.
    pub async fn start(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<(), async_nats::SubscribeError> {
        let (this, stop0) = (self.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(this.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => this.push_changes(),
                    () = stop0.cancelled() => return,
                }
            }
        });
        let Some((client, prefix)) = self.nats.clone() else {
            return Ok(());
        };
        let _ = self.tasks.set(tasks.clone());
        self.rooms.track_presence(true);
        let summaries = client.subscribe(format!("{prefix}.presence.*")).await?;
        let syncs = client.subscribe(format!("{prefix}.presence_sync")).await?;
        let lists = client.subscribe(format!("{prefix}.presence_list")).await?;
        // Ask everyone for their whole state.
        let _ = client.publish(format!("{prefix}.presence_sync"), "*".into()).await;
        let this = self.clone();
        follow(tasks, stop, summaries, move |msg| {
            let this = this.clone();
            async move {
                match serde_json::from_slice::<Summary>(&msg.payload) {
                    Ok(s) => this.apply(s).await,
                    Err(e) => tracing::debug!(error = %e, "malformed presence summary ignored"),
                }
            }
        });
        let this = self.clone();
        follow(tasks, stop, syncs, move |msg| {
            let who = std::str::from_utf8(&msg.payload).unwrap_or("");
            if who == "*" || who == this.node_id {
                this.send_full.store(true, Ordering::Relaxed);
            }
            async {}
        });
        let (this, answering) = (self.clone(), client.clone());
        follow(tasks, stop, lists, move |msg| {
            let (this, client) = (this.clone(), answering.clone());
            async move { this.answer_list(&client, msg).await }
        });
        let (this, stop3) = (self.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(this.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop3.cancelled() => return,
                }
                this.publish(&client, &prefix).await;
                this.expire();
            }
        });
        Ok(())
    }

    /// Answers a list request if this node holds members of the room.
    async fn answer_list(&self, client: &async_nats::Client, msg: async_nats::Message) {
        let (Some(reply), Some(room)) = (
            msg.reply,
            std::str::from_utf8(&msg.payload).ok().and_then(RoomId::parse),
        ) else {
            return;
        };
        let (_, count, users) = self.local_entry(&room, false, true);
        if count == 0 {
            return;
        }
        let answer = ListAnswer {
            node: self.node_id.clone(),
            users,
        };
        if let Ok(body) = serde_json::to_vec(&answer) {
            let _ = client.publish(reply, body.into()).await;
        }
    }

    async fn apply(&self, s: Summary) {
        if s.node == self.node_id {
            return;
        }
        let (gap, newly_watched) = {
            let mut view = self.view.write();
            let v = view.entry(s.node.clone()).or_default();
            let gap = !s.reset && v.seen.is_some() && s.seq != v.seq + 1;
            let fresh = v.seen.is_none() && !s.reset;
            if s.reset {
                v.rooms.clear();
            }
            v.seq = s.seq;
            v.seen = Some(Instant::now());
            for (room, count, users) in s.rooms {
                if count == 0 {
                    v.rooms.remove(&room);
                } else {
                    v.rooms.insert(room, (count, users));
                }
            }
            let mut newly = Vec::new();
            if let Some(watch) = s.watch {
                let watch: HashSet<String> = watch.into_iter().collect();
                newly = watch.difference(&v.watch).cloned().collect();
                v.watch = watch;
            }
            (gap || fresh, newly)
        };
        // Rooms another gateway started watching: send this node's list.
        for room in newly_watched.iter().filter_map(|r| RoomId::parse(r)) {
            self.rooms.presence_touch(&room);
        }
        if gap && let Some((client, prefix)) = &self.nats {
            // A missed message (or a gateway seen mid-stream): ask for all.
            let _ = client
                .publish(format!("{prefix}.presence_sync"), s.node.into_bytes().into())
                .await;
        }
    }

    fn expire(&self) {
        let expiry = self.interval * EXPIRY_INTERVALS;
        let now = Instant::now();
        self.view
            .write()
            .retain(|_, v| v.seen.is_some_and(|s| now.duration_since(s) <= expiry));
    }

    async fn publish(&self, client: &async_nats::Client, prefix: &str) {
        let full = self.send_full.swap(false, Ordering::Relaxed);
        let watch_changed = self.watch_changed.swap(false, Ordering::Relaxed);
        let changed = self.rooms.take_presence_changes();
        let mut ids = if full { self.rooms.room_ids() } else { changed };
        ids.sort_unstable();
        ids.dedup();
        // Lists only for rooms watched somewhere (see the module doc).
        let interest: HashSet<String> = {
            let view = self.view.read();
            self.watchers
                .iter()
                .map(|e| e.key().as_str().to_string())
                .chain(view.values().flat_map(|v| v.watch.iter().cloned()))
                .collect()
        };
        let rooms: Vec<Entry> = ids
            .iter()
            .map(|r| self.local_entry(r, true, interest.contains(r.as_str())))
            // A full summary lists only rooms with members.
            .filter(|e| !full || e.1 > 0)
            .collect();
        let watch = (full || watch_changed).then(|| {
            self.watchers
                .iter()
                .map(|e| e.key().as_str().to_string())
                .collect::<Vec<_>>()
        });
        let subject = format!("{prefix}.presence.{}", subject_token(&self.node_id));
        let mut batch: Vec<Entry> = Vec::new();
        let mut size = watch.as_ref().map_or(0, |w| w.iter().map(|r| r.len() + 3).sum());
        let mut watch = watch;
        let mut first = true;
        let mut rooms = rooms.into_iter().peekable();
        loop {
            let next = rooms.next();
            let end = next.is_none();
            if let Some(e) = next {
                size += e.0.len() + 16 + e.2.as_ref().map_or(0, |u| u.iter().map(|s| s.len() + 3).sum());
                batch.push(e);
            }
            if end || size >= MAX_SUMMARY_BYTES {
                let msg = Summary {
                    node: self.node_id.clone(),
                    seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
                    reset: full && first,
                    rooms: std::mem::take(&mut batch),
                    watch: watch.take(),
                };
                first = false;
                size = 0;
                if let Ok(body) = serde_json::to_vec(&msg)
                    && let Err(e) = client.publish(subject.clone(), body.into()).await
                {
                    tracing::debug!(error = %e, "presence summary not sent");
                    // Lost: send everything next time.
                    self.send_full.store(true, Ordering::Relaxed);
                }
            }
            if end {
                break;
            }
        }
    }
}

/// A node id as one subject token (ids are free text).
fn subject_token(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use fanout_tree::{Outbox, OutboxLimits};

    use super::*;
    use crate::rooms::{LogMode, Member, RoomLimits};

    fn limits() -> RoomLimits {
        RoomLimits {
            history_size: 10,
            history_max_bytes: 1 << 20,
            history_total_bytes: 1 << 30,
            dedup_window: Duration::from_secs(60),
            dedup_max_keys: 100,
            max_rooms: 10,
            max_pending: 4,
            fanout_shards: 1,
            tree: fanout_tree::TreeConfig::default(),
        }
    }

    #[tokio::test]
    async fn local_counts_and_lists_come_from_the_member_sets_and_stop_listing_past_the_bound() {
        let rooms = Arc::new(RoomIndex::new(limits(), LogMode::Authoritative));
        let registry = Arc::new(Registry::default());
        let p = Presence::new("n", 2, Duration::from_secs(1), None, rooms.clone(), registry.clone());
        let r = RoomId::parse("r").unwrap();
        let ob = Arc::new(Outbox::new(OutboxLimits::default()));
        // Two connections of "a", one of "b".
        for (conn, user) in [(1, "a"), (2, "a"), (3, "b")] {
            registry.register(user, ConnId(conn), 0, 0);
        }
        let j1 = rooms.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        let j2 = rooms.join(&r, ConnId(2), Member::FullProto(&ob), None, None).unwrap();
        let got = p.room(&r).await;
        assert_eq!((got.count, got.users), (2, Some(vec!["a".to_string()])));
        let j3 = rooms.join(&r, ConnId(3), Member::Full(&ob), None, None).unwrap();
        let got = p.room(&r).await;
        assert_eq!((got.count, got.users), (3, None), "3 connections: over the bound of 2");
        rooms.leave(&r, ConnId(1), j1.slot);
        let got = p.room(&r).await;
        assert_eq!(
            (got.count, got.users),
            (2, Some(vec!["a".to_string(), "b".to_string()]))
        );
        rooms.leave(&r, ConnId(2), j2.slot);
        rooms.leave(&r, ConnId(3), j3.slot);
        assert_eq!(p.room(&r).await.count, 0);
    }
}
