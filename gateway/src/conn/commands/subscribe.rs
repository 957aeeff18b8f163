//! `subscribe`: joins every room of one frame, each succeeding or failing on
//! its own, and queues the reply, then each room's catch-up, then live
//! messages.

use std::collections::HashSet;
use std::sync::Arc;

use fanout_tree::Weighted;
use futures_util::StreamExt;

use super::room_for;
use crate::auth;
use crate::broker::{Bus, BusError, Fetched};
use crate::conn::session::{GrantEnd, RoomSub, Session};
use crate::conn::shared::{bus_error, room_error};
use crate::error::{CloseReason, ErrorCode, ProtoError};
use crate::model::RoomId;
use crate::node::Node;
use crate::protocol::{self, ReplyBody, ServerMsg, SharedMessage, SubscribeEntry, SubscribeResult};
use crate::rooms::{Catchup, Frame, Member, RoomRef};

/// One room of a `subscribe` on its way through the phases.
pub(in crate::conn) struct Slot {
    room: RoomId,
    notify: bool,
    since: Option<u64>,
    /// The grant the room is subscribed under.
    sub: RoomSub,
    /// Subscribed before this frame (a failure then leaves it as it was).
    was_subscribed: bool,
    /// Cluster mode: the catch-up read from the stream before the join,
    /// `(since, upto]`, and `upto`.
    prefetched: Option<(u64, Fetched)>,
    /// The room's state on this node when the entry was checked.
    found: Option<RoomRef>,
}

/// What a `subscribe` may still queue as catch-up.
pub(super) struct CatchupBudget {
    bytes: usize,
    frames: usize,
}

/// Appends `messages` to the catch-up if they fit the budget; otherwise the
/// room is reported as not recovered and the client reloads its history.
pub(super) fn take_within(
    catchup: &mut Vec<SharedMessage>,
    messages: Vec<SharedMessage>,
    recovered: bool,
    budget: &mut CatchupBudget,
) -> bool {
    if !recovered {
        return false;
    }
    let bytes: usize = messages.iter().map(Weighted::weight).sum();
    if bytes > budget.bytes || messages.len() > budget.frames {
        return false;
    }
    budget.bytes -= bytes;
    budget.frames -= messages.len();
    catchup.extend(messages);
    true
}

impl Session<'_> {
    /// Joins every room of one `subscribe` frame, in three phases:
    /// 1. every entry is checked (room name, mode, grant or room token, the
    ///    rooms-per-connection cap), without waiting;
    /// 2. cluster mode: what needs NATS (subscribing the room on this node,
    ///    catching up with an offset the client saw elsewhere, reading a
    ///    catch-up older than the node's cache) happens while the connection
    ///    only holds the rooms ([`Member::Joining`]); its other rooms keep
    ///    receiving their messages meanwhile;
    /// 3. with the outbox held and no wait, every room is joined (the offset
    ///    and the cached catch-up are read under the room's lock), and the
    ///    reply, then each room's catch-up, then live messages are queued.
    pub(in crate::conn) async fn subscribe(
        &mut self,
        id: Option<u32>,
        entries: Vec<SubscribeEntry>,
    ) -> Result<(), CloseReason> {
        if let Err(r) = self.limits.check_subscribe(entries.len()) {
            return self.rate_limited(id, r);
        }
        let started = std::time::Instant::now();
        let node = self.node.clone();
        let mut slots = self.check_entries(&entries);
        // Bytes read from the stream in phase 2, already charged.
        let mut charged = 0;
        if !matches!(node.bus, Bus::Embedded) {
            charged = self.prepare_in_cluster(&mut slots).await;
        }
        // One growth of the connection's room map for the whole frame.
        let new_rooms = slots.iter().flatten().filter(|s| !s.was_subscribed).count();
        self.rooms.reserve(new_rooms);
        // Phase 3: no await from here to the release.
        self.outbox.hold();
        let reply_bytes: usize = entries
            .iter()
            .map(|e| e.room.as_deref().map_or(0, str::len) + 128)
            .sum();
        let mut budget = self.catchup_budget(reply_bytes);
        let budget_bytes = budget.bytes;
        let mut results = Vec::with_capacity(slots.len());
        let mut catchup = Vec::new();
        for (i, slot) in slots.into_iter().enumerate() {
            results.push(
                match slot.and_then(|s| self.join_checked(s, &mut catchup, &mut budget)) {
                    Ok((room, offset, recovered)) => {
                        // Presence pushes follow the latest subscription's choice.
                        self.set_presence_watch(&room, entries[i].presence == Some(true));
                        SubscribeResult::Joined {
                            room,
                            offset,
                            recovered,
                        }
                    }
                    Err(error) => SubscribeResult::Failed {
                        room: protocol::truncate(entries[i].room.as_deref().unwrap_or(""), 200),
                        error,
                    },
                },
            );
        }
        self.limits
            .spend_replay((budget_bytes - budget.bytes).saturating_sub(charged));
        // Encoded in the connection's codec; the catch-up pushes are the
        // room's own frames (a protobuf one made at most once per message per
        // node), resolved here rather than under the outbox's lock.
        let reply = id.map(|id| {
            self.encode(&ServerMsg::Reply {
                id,
                ok: ReplyBody::Subscribe { rooms: results },
            })
        });
        let catchup: Vec<Frame> = catchup.iter().map(|m| self.room_frame(m)).collect();
        node.metrics.subscribe_rooms.record(entries.len() as f64);
        tracing::trace!(conn = self.id.0, rooms = entries.len(), elapsed = ?started.elapsed(), "subscribe");
        self.outbox
            .release(reply, catchup)
            .map_err(|_| CloseReason::SlowConsumer)
    }

    /// What this frame may queue as catch-up: what one subscribe may replay,
    /// what the connection's history budget has left, and what its outbox
    /// can still take next to a reply of `reply_bytes`.
    fn catchup_budget(&mut self, reply_bytes: usize) -> CatchupBudget {
        let (free_frames, free_bytes) = room_for(&self.outbox);
        CatchupBudget {
            bytes: self
                .node
                .cfg
                .catchup_max_bytes
                .min(self.limits.replay_available())
                .min(free_bytes.saturating_sub(reply_bytes)),
            frames: free_frames.saturating_sub(1),
        }
    }

    /// Phase 1: checks every entry of the frame; nothing is joined yet.
    fn check_entries(&self, entries: &[SubscribeEntry]) -> Vec<Result<Slot, ProtoError>> {
        let cap = self.node.cfg.max_rooms_per_conn;
        // Counting distinct new rooms only matters when the frame could
        // reach the cap (even counting every entry as new).
        let near_cap = self.rooms.len() + entries.len() > cap;
        let mut new_rooms: HashSet<RoomId, foldhash::fast::RandomState> = HashSet::default();
        entries
            .iter()
            .map(|entry| {
                let slot = self.check_entry(entry)?;
                if near_cap && !slot.was_subscribed && !new_rooms.contains(&slot.room) {
                    if self.rooms.len() + new_rooms.len() >= self.node.cfg.max_rooms_per_conn {
                        return Err(ProtoError::new(
                            ErrorCode::LimitExceeded,
                            format!("at most {} rooms per connection", self.node.cfg.max_rooms_per_conn),
                        ));
                    }
                    new_rooms.insert(slot.room.clone());
                }
                Ok(slot)
            })
            .collect()
    }

    fn check_entry(&self, entry: &SubscribeEntry) -> Result<Slot, ProtoError> {
        let name = entry.room.as_deref().unwrap_or("");
        let (room, found) = self
            .node
            .rooms
            .intern(name)
            .ok_or_else(|| ProtoError::bad_request("invalid room name"))?;
        let notify = match entry.mode.as_deref() {
            None | Some("full") => false,
            Some("notify") => true,
            Some(_) => return Err(ProtoError::bad_request("mode must be full or notify")),
        };
        let mut sub = RoomSub::BY_CONNECTION;
        if let Some(token) = &entry.token {
            let grant = self
                .node
                .verifier
                .verify_room(token, &self.identity().sub, room.as_str())
                .map_err(|e| {
                    self.node.metrics.auth_failed(e.label());
                    ProtoError::forbidden(format!("room token refused: {e}"))
                })?;
            // Subscribing again with a fresh room token renews the grant.
            sub = RoomSub::by_room_token(
                grant.publish,
                grant
                    .exp
                    .map(|exp| GrantEnd::at(auth::deadline(exp, self.node.verifier.leeway()))),
            );
        } else if !self.identity().grants.can_subscribe(room.as_str()) {
            return Err(ProtoError::forbidden("the token does not grant this room"));
        }
        Ok(Slot {
            was_subscribed: self.rooms.contains_key(&room),
            room,
            notify,
            // Notify mode pushes no messages: `since` has nothing to replay.
            since: if notify { None } else { entry.since },
            sub,
            prefetched: None,
            found,
        })
    }

    /// Phase 2 (cluster mode): holds each room ([`Member::Joining`]), makes
    /// it live on this node, brings it up to an offset the client saw on
    /// another node, and reads a catch-up the node's cache no longer holds,
    /// concurrently. The outbox is not held: the connection's other rooms
    /// are delivered as usual while NATS answers (or does not).
    /// Returns the bytes it read from the stream (charged to the history
    /// budget).
    async fn prepare_in_cluster(&mut self, slots: &mut [Result<Slot, ProtoError>]) -> usize {
        let node = self.node.clone();
        for s in slots.iter_mut().flatten() {
            if let Err(e) = node
                .rooms
                .join_found(s.found.as_ref(), &s.room, self.id, Member::Joining, None, None)
            {
                // Nothing joined: the slot fails in phase 3 the same way.
                tracing::debug!(room = %s.room, error = %e, "room could not be held");
                continue;
            }
            if !s.was_subscribed {
                // Recorded now, so a connection that ends while it waits
                // leaves the room (the session's drop).
                self.set_room(&s.room, s.sub);
            }
        }
        let work: Vec<(usize, RoomId, Option<u64>)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().ok().map(|s| (i, s.room.clone(), s.since)))
            .collect();
        let results: Vec<(usize, Prepared)> = futures_util::stream::iter(work)
            .map(|(i, room, since)| {
                let node = &node;
                async move { (i, prepare_room(node, &room, since).await) }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        // Catch-ups older than the cache: one read at a time, each capped by
        // what the earlier ones left (a frame naming the same old room many
        // times reads it once at most); bytes read from NATS are charged to
        // the connection's history budget even when nothing fits.
        let mut read_left = self.catchup_budget(0).bytes;
        let mut read_bytes = 0;
        for (i, r) in results {
            let Ok(slot) = &mut slots[i] else { continue };
            let r = match (r, slot.since) {
                (Ok(Some(upto)), Some(since)) => match node.bus.catchup(&slot.room, since, upto, read_left).await {
                    Ok(f) => {
                        read_bytes += f.read_bytes;
                        read_left = read_left.saturating_sub(f.read_bytes);
                        Ok(Some((upto, f)))
                    }
                    Err(e) => Err(e),
                },
                (Ok(_), _) => Ok(None),
                (Err(e), _) => Err(e),
            };
            match r {
                Ok(prefetched) => slot.prefetched = prefetched,
                Err(e) => {
                    tracing::debug!(room = %slot.room, error = %e, "room could not be made live");
                    if !slot.was_subscribed {
                        self.drop_room(&slot.room);
                    }
                    slots[i] = Err(bus_error(&e));
                }
            }
        }
        self.limits.spend_replay(read_bytes);
        read_bytes
    }

    /// Phase 3, one room: joins it in its mode and takes its catch-up within
    /// `budget`. Returns the room, the offset the membership took effect at
    /// and `recovered` (when `since` was given).
    fn join_checked(
        &mut self,
        s: Slot,
        catchup: &mut Vec<SharedMessage>,
        budget: &mut CatchupBudget,
    ) -> Result<(RoomId, u64, Option<bool>), ProtoError> {
        let member = if s.notify {
            Member::Notify(self.activity.get_or_init(Arc::default))
        } else {
            self.forget_activity(&s.room);
            self.full_member()
        };
        // The slot as of now: an earlier entry of this frame may have joined
        // the same room.
        let held = self.rooms.get(&s.room).and_then(|r| r.member);
        let joined = match self
            .node
            .rooms
            .join_found(s.found.as_ref(), &s.room, self.id, member, s.since, held)
        {
            Ok(j) => j,
            Err(e) => {
                if !s.was_subscribed {
                    self.drop_room(&s.room);
                }
                return Err(room_error(e));
            }
        };
        let Some((offset, c)) = joined.at else {
            // Not live: the broker could not make it live in phase 2.
            if let Some(sub) = self.rooms.get_mut(&s.room) {
                sub.member = joined.slot;
            }
            if !s.was_subscribed {
                self.drop_room(&s.room);
            }
            return Err(bus_error(&BusError::Timeout));
        };
        self.set_room(
            &s.room,
            RoomSub {
                member: joined.slot,
                ..s.sub
            },
        );
        let recovered = match c {
            None => None,
            Some(Catchup::Messages { messages, recovered }) => Some(take_within(catchup, messages, recovered, budget)),
            // Older than the cache: what phase 2 read from the stream, then
            // the cache from where that read ended up to the join.
            Some(Catchup::NeedsBackend) => Some(match s.prefetched {
                Some((upto, f)) if f.recovered => match self.node.rooms.catchup(&s.room, upto, offset) {
                    Catchup::Messages {
                        messages: tail,
                        recovered: true,
                    } => {
                        let mut messages = f.messages;
                        messages.extend(tail);
                        take_within(catchup, messages, true, budget)
                    }
                    _ => false,
                },
                _ => false,
            }),
        };
        Ok((s.room, offset, recovered))
    }
}

/// What phase 2 made of one room: its last offset when the catch-up for
/// `since` lies (partly) before the cache and must be read from the stream.
type Prepared = Result<Option<u64>, BusError>;

/// Phase 2 for one room (cluster mode): live on this node and synced up to
/// `since`.
async fn prepare_room(node: &Node, room: &RoomId, since: Option<u64>) -> Prepared {
    node.bus.ensure_live(room).await?;
    let Some(since) = since else {
        return Ok(None);
    };
    // The client may have seen newer messages on another node.
    node.bus.sync_to(room, since).await?;
    let upto = node.rooms.last_offset(room);
    match node.rooms.catchup(room, since, upto) {
        Catchup::NeedsBackend => Ok(Some(upto)),
        Catchup::Messages { .. } => Ok(None),
    }
}
