//! `subscribe`: joins every room of one frame, each succeeding or failing on
//! its own, and queues the reply, then each room's catch-up, then live
//! messages.

use std::collections::HashMap;
use std::sync::Arc;

use fanout_tree::Weighted;
use futures_util::StreamExt;

use super::room_for;
use crate::auth;
use crate::broker::{BusError, Fetched};
use crate::conn::session::{RoomSub, Session};
use crate::conn::{bus_error, room_error};
use crate::error::{CloseReason, ErrorCode, ProtoError};
use crate::model::RoomId;
use crate::protocol::{self, ReplyBody, ServerMsg, SharedMessage, SubscribeEntry, SubscribeResult};
use crate::rooms::{Catchup, Frame, Member};

/// One room of a `subscribe` on its way through the phases.
pub(in crate::conn) struct Slot {
    room: RoomId,
    since: Option<u64>,
    /// The offset the membership took effect at and the catch-up; `None`
    /// until the room is live on this node.
    at: Option<(u64, Option<Catchup>)>,
}

/// What a `subscribe` may still queue as catch-up.
pub(super) struct CatchupBudget {
    bytes: usize,
    frames: usize,
}

/// Bytes of the catch-ups of `slots` served from this node's cache.
pub(super) fn cached_catchup_bytes(slots: &[Result<Slot, ProtoError>]) -> usize {
    let bytes = |s: &Result<Slot, ProtoError>| match s.as_ref().ok()?.at.as_ref()?.1.as_ref()? {
        Catchup::Messages {
            messages,
            recovered: true,
        } => Some(messages.iter().map(Weighted::weight).sum::<usize>()),
        _ => None,
    };
    slots.iter().filter_map(bytes).sum()
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
    /// Joins every room of one `subscribe` frame. The outbox is held from
    /// the first join until the reply is queued, so the reply comes first,
    /// then each room's catch-up, then live messages.
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
        self.outbox.hold();
        // Phase 1: check and register every room.
        let mut slots: Vec<Result<Slot, ProtoError>> = Vec::with_capacity(entries.len());
        for entry in &entries {
            slots.push(self.join_one(entry).await);
        }
        // Phase 2 (cluster mode): rooms new to this node are subscribed on the
        // bus, concurrently; each room once however many joiners wait.
        let cold: Vec<(usize, RoomId)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Ok(s) if s.at.is_none() => Some((i, s.room.clone())),
                _ => None,
            })
            .collect();
        if !cold.is_empty() {
            let results: Vec<(usize, Result<(), BusError>)> = futures_util::stream::iter(cold)
                .map(|(i, room)| {
                    let node = &node;
                    async move { (i, node.bus.ensure_live(&room).await) }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            for (i, r) in results {
                let slot = std::mem::replace(&mut slots[i], Err(ProtoError::bad_request("")));
                slots[i] = match (slot, r) {
                    (Ok(mut s), Ok(())) => {
                        let upto = node.rooms.live_from(&s.room).unwrap_or(0);
                        s.at = Some((upto, s.since.map(|since| node.rooms.catchup(&s.room, since, upto))));
                        Ok(s)
                    }
                    (Ok(s), Err(e)) => {
                        tracing::debug!(room = %s.room, error = %e, "room could not be made live");
                        self.drop_room(&s.room);
                        Err(bus_error(&e))
                    }
                    (Err(e), _) => Err(e),
                };
            }
        }
        // The catch-up budget: what one subscribe may replay, what the
        // connection's history budget has left, and what its outbox can
        // still take next to the reply.
        let reply_bytes: usize = entries
            .iter()
            .map(|e| e.room.as_deref().map_or(0, str::len) + 128)
            .sum();
        let (free_frames, free_bytes) = room_for(&self.outbox);
        let mut budget = CatchupBudget {
            bytes: node
                .cfg
                .catchup_max_bytes
                .min(self.limits.replay_available())
                .min(free_bytes.saturating_sub(reply_bytes)),
            frames: free_frames.saturating_sub(1),
        };
        let budget_bytes = budget.bytes;
        // Phase 3: catch-up older than this node's cache, from the stream.
        let backend: Vec<(usize, RoomId, u64, u64)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Ok(Slot {
                    room,
                    since,
                    at: Some((upto, Some(Catchup::NeedsBackend))),
                }) => Some((i, room.clone(), since.unwrap_or(0), *upto)),
                _ => None,
            })
            .collect();
        let mut fetched: HashMap<usize, Result<Fetched, BusError>> = HashMap::new();
        if !backend.is_empty() {
            // The budget left by the catch-ups served from the cache; each read caps at it.
            let budget = budget.bytes.saturating_sub(cached_catchup_bytes(&slots));
            fetched = futures_util::stream::iter(backend)
                .map(|(i, room, since, upto)| {
                    let node = &node;
                    async move { (i, node.bus.catchup(&room, since, upto, budget).await) }
                })
                .buffer_unordered(16)
                .collect()
                .await;
        }
        // Phase 4: the reply, and the catch-up within the budget.
        let mut results = Vec::with_capacity(slots.len());
        let mut catchup = Vec::new();
        for (i, slot) in slots.into_iter().enumerate() {
            let slot = slot.and_then(|s| {
                let (offset, c) = s.at.unwrap_or((0, None));
                let recovered = match c {
                    None => None,
                    Some(Catchup::Messages { messages, recovered }) => {
                        Some(take_within(&mut catchup, messages, recovered, &mut budget))
                    }
                    Some(Catchup::NeedsBackend) => match fetched.remove(&i) {
                        Some(Ok(f)) => Some(take_within(&mut catchup, f.messages, f.recovered, &mut budget)),
                        Some(Err(e)) => return Err(bus_error(&e)),
                        None => Some(false),
                    },
                };
                Ok((s.room, offset, recovered))
            });
            results.push(match slot {
                Ok((room, offset, recovered)) => SubscribeResult::Joined {
                    room,
                    offset,
                    recovered,
                },
                Err(error) => SubscribeResult::Failed {
                    room: protocol::truncate(entries[i].room.as_deref().unwrap_or(""), 200),
                    error,
                },
            });
        }
        self.limits.spend_replay(budget_bytes - budget.bytes);
        // Encoded in the connection's codec; the catch-up pushes are the
        // room's own frames (a protobuf one made at most once per message per
        // node), resolved here rather than under the outbox's lock.
        let codec = self.codec();
        let reply = id.map(|id| {
            codec.encode(&ServerMsg::Reply {
                id,
                ok: ReplyBody::Subscribe { rooms: results },
            })
        });
        let catchup: Vec<Frame> = catchup.iter().map(|m| m.frame(codec).clone()).collect();
        node.metrics.subscribe_rooms.record(entries.len() as f64);
        tracing::trace!(conn = self.id.0, rooms = entries.len(), elapsed = ?started.elapsed(), "subscribe");
        self.outbox
            .release(reply, catchup)
            .map_err(|_| CloseReason::SlowConsumer)
    }

    pub(in crate::conn) async fn join_one(&mut self, entry: &SubscribeEntry) -> Result<Slot, ProtoError> {
        let name = entry.room.as_deref().unwrap_or("");
        let room = RoomId::parse(name).ok_or_else(|| ProtoError::bad_request("invalid room name"))?;
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
            sub = RoomSub {
                by_token: true,
                token_pub: grant.publish,
                expires: grant.exp.map(|exp| auth::deadline(exp, self.node.verifier.leeway())),
            };
        } else if !self.identity().grants.can_subscribe(room.as_str()) {
            return Err(ProtoError::forbidden("the token does not grant this room"));
        }
        let already = self.rooms.contains_key(&room);
        if !already && self.rooms.len() >= self.node.cfg.max_rooms_per_conn {
            return Err(ProtoError::new(
                ErrorCode::LimitExceeded,
                format!("at most {} rooms per connection", self.node.cfg.max_rooms_per_conn),
            ));
        }
        // Notify mode pushes no messages: `since` has nothing to replay.
        let since = if notify { None } else { entry.since };
        if let Some(since) = since {
            // The client may have seen newer messages on another node.
            self.node.bus.sync_to(&room, since).await;
        }
        let member = if notify {
            Member::Notify(self.activity.get_or_init(Arc::default))
        } else {
            self.forget_activity(&room);
            if self.proto {
                Member::FullProto(&self.outbox)
            } else {
                Member::Full(&self.outbox)
            }
        };
        let joined = self
            .node
            .rooms
            .join(&room, self.id, member, since)
            .map_err(room_error)?;
        self.set_room(&room, sub);
        Ok(Slot {
            room,
            since,
            at: joined.at,
        })
    }
}
