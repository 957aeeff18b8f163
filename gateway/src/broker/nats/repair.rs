//! Keeping a room's cache complete: reading the gaps the sequencer reports,
//! catching up after a reconnect or when a client saw a newer offset
//! elsewhere, and resetting members when messages left the stream before
//! this node read them.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::*;

impl NatsBus {
    pub(super) fn spawn_repair(self: &Arc<Self>, room: RoomId, gap: Gap) {
        let bus = self.clone();
        self.spawn(async move { bus.repair(room, gap).await });
    }

    /// Reads the messages of a gap from the stream and applies them, then
    /// whatever waited behind the gap; repeats while gaps remain.
    ///
    /// `gap.upto` is an offset known to be stored (a message's previous
    /// offset, the stream's tail, or an acknowledged publish), so a read that
    /// did not reach it is incomplete (for example during a leader election)
    /// and is retried rather than skipped.
    pub(super) async fn repair(self: Arc<Self>, room: RoomId, mut gap: Gap) {
        let mut attempt = 0u32;
        loop {
            tracing::debug!(%room, after = gap.after, upto = gap.upto, attempt, "repairing a gap");
            metrics::counter!("gateway_bus_gaps_total").increment(u64::from(attempt == 0));
            let read = self.read(&room, gap.after + 1, gap.upto).await;
            let fetched = match read {
                Ok((entries, true)) => entries,
                Ok((entries, false)) if attempt >= REPAIR_ATTEMPTS => {
                    // Never skip silently: what was read may end anywhere
                    // inside the gap, so members are reset (they resume with
                    // `since`, which is read from the stream) and the cache
                    // restarts after the gap.
                    let closed = self.rooms.gap_unread(&room, gap.upto);
                    tracing::error!(%room, after = gap.after, upto = gap.upto, read = entries.len(), closed, "the stream no longer has part of a gap; members must resume");
                    metrics::counter!("gateway_bus_gaps_skipped_total").increment(1);
                    match self.rooms.repaired(&room, Vec::new(), gap.upto) {
                        Some(next) => {
                            gap = next;
                            attempt = 0;
                            continue;
                        }
                        None => return,
                    }
                }
                Ok(_) | Err(_) if attempt < REPAIR_ATTEMPTS => {
                    if let Err(e) = read {
                        tracing::debug!(%room, error = %e, "gap read failed; retrying");
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(20)))).await;
                    continue;
                }
                Ok(_) | Err(_) => {
                    tracing::warn!(%room, "gap repair failed; retried on the next message or reconnect");
                    self.rooms.repair_failed(&room);
                    return;
                }
            };
            attempt = 0;
            let first = fetched.first().map_or(gap.upto, |f| f.0);
            if first > gap.after + 1 && self.may_have_lost(&room, gap.after).await {
                // The last message this node applied is gone from the stream,
                // so messages between it and `first` may be gone too: never
                // skip silently; members resume with `since` and are told.
                let closed = self.rooms.lost_messages(&room, first - 1);
                metrics::counter!("gateway_bus_lost_resets_total").increment(1);
                tracing::error!(%room, after = gap.after, first, closed, "messages left the stream before this node read them; members must resume");
            }
            tracing::debug!(
                %room,
                n = fetched.len(),
                first = fetched.first().map(|f| f.0),
                last = fetched.last().map(|f| f.0),
                "gap read"
            );
            match self.rooms.repaired(&room, fetched, gap.upto) {
                Some(next) => gap = next,
                None => return,
            }
        }
    }

    /// Whether messages of `room` after `after` (the last offset this node
    /// applied; 0: none) may have left the stream before this node read them.
    /// If the message at `after` is still stored, nothing after it is gone
    /// (per-room limits and max age drop the oldest first). With nothing
    /// applied, only a room that never dropped a message is safe.
    pub(super) async fn may_have_lost(&self, room: &RoomId, after: u64) -> bool {
        if after > 0 {
            return !self.still_stored(room, after).await;
        }
        let mut count = None;
        let body = self.forward_request(room, 1, 1, usize::MAX);
        if self
            .direct(room, body, |m| {
                count = m.pending.map(|p| p + 1);
                false
            })
            .await
            .is_err()
        {
            return true;
        }
        count.is_none_or(|c| !self.never_dropped(c))
    }

    /// Whether a room with `stored` messages in its stream can never have
    /// dropped one: no max age, and fewer than the per-room limit.
    pub(super) fn never_dropped(&self, stored: u64) -> bool {
        self.cfg.max_age.is_zero() && (self.cfg.history <= 0 || stored < self.cfg.history as u64)
    }

    /// A client saw `offset` elsewhere; make sure this node has applied it
    /// before the client joins, so it gets no message twice.
    pub async fn sync_to(self: &Arc<Self>, room: &RoomId, offset: u64) -> Result<(), BusError> {
        if self.is_ephemeral(room) || !self.rooms.is_live(room) || offset <= self.rooms.last_offset(room) {
            return Ok(());
        }
        // Trust the stream, not the client: an offset beyond the room's tail
        // is bogus (answered recovered:false) and must not start a repair.
        let tail = self
            .last_seq_retrying(room)
            .await
            .map_err(|_| BusError::unavailable(UnavailableKind::BehindClient))?;
        let offset = offset.min(tail);
        if offset <= self.rooms.last_offset(room) {
            return Ok(());
        }
        self.clone().repair_to(room.clone(), offset).await;
        // A repair that was already running reaches `offset` on its own.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.rooms.last_offset(room) < offset && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Still behind: answering now would tell the joiner its messages
        // are gone (recovered:false) while the stream holds them.
        if self.rooms.last_offset(room) < offset {
            return Err(BusError::unavailable(UnavailableKind::BehindClient));
        }
        Ok(())
    }

    /// After a reconnect: fetch what every live room missed.
    pub(super) async fn resync_all(self: Arc<Self>) {
        let rooms = self.rooms.live_rooms();
        tracing::info!(
            rooms = rooms.len(),
            "checking rooms for messages missed while disconnected"
        );
        let bus = &self;
        futures_util::stream::iter(rooms)
            .for_each_concurrent(32, |(room, last)| async move {
                if bus.is_ephemeral(&room) {
                    return;
                }
                // The stream may be electing a leader right after a
                // reconnect: retry for a while before giving up.
                for attempt in 1..=REPAIR_ATTEMPTS {
                    match bus.last_seq(&room).await {
                        Ok(tail) => {
                            if tail > last {
                                bus.clone().repair_to(room, tail).await;
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(%room, error = %e, attempt, "resync failed; retrying");
                            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(20)))).await;
                        }
                    }
                }
                tracing::warn!(%room, "resync gave up; the next message repairs the room");
            })
            .await;
    }

    /// A new subscription reaches the other servers of the NATS cluster a
    /// moment after the server this node talks to has it: a message the
    /// stream republishes from another server in that moment is not
    /// delivered here, and without a later message nothing would reveal the
    /// gap. So the stream's tail is checked again shortly after going live.
    pub(super) fn spawn_settle_check(self: &Arc<Self>, room: RoomId) {
        let bus = Arc::downgrade(self);
        self.spawn(async move {
            for wait in SETTLE_CHECKS {
                tokio::time::sleep(wait).await;
                let Some(bus) = bus.upgrade() else { return };
                if !bus.rooms.is_live(&room) {
                    return;
                }
                if let Ok(tail) = bus.last_seq(&room).await
                    && tail > bus.rooms.last_offset(&room)
                {
                    tracing::debug!(%room, tail, "messages sent while the subscription spread; repairing");
                    bus.repair_to(room.clone(), tail).await;
                }
            }
        });
    }

    /// Repairs `room` up to offset `tail` unless a repair is already under
    /// way (which then continues to `tail`).
    pub(super) async fn repair_to(self: Arc<Self>, room: RoomId, tail: u64) {
        if let Some(gap) = self.rooms.request_repair(&room, tail) {
            self.repair(room, gap).await;
        }
    }
}
