//! Reading a room's stored messages from its stream: gap reads (a pull
//! consumer), and batched direct gets for `since` catch-up and `history`
//! pages that read only what the client is owed.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use fanout_tree::Weighted;
use futures_util::StreamExt;
use proto::Message as _;
use proto::bus::Envelope;

use super::*;

/// One message of a room read from its stream by a direct get.
pub(super) struct Stored {
    pub(super) seq: u64,
    /// Messages of the room stored after this one (batch answers only).
    pub(super) pending: Option<u64>,
    pub(super) payload: bytes::Bytes,
}

/// How a forward read of a catch-up ended.
pub(super) enum ReadEnd {
    /// Every message up to the asked offset was read.
    Reached,
    /// Some message after `since` may be gone from the stream.
    Lost,
    /// The frames would pass the byte budget.
    OverBudget,
}

/// A catch-up read from the stream in progress.
pub(super) struct CatchupRead {
    /// Whether the first answer proved that nothing after `since` is gone.
    proved: bool,
    /// Every message of the room in `(since, covered]` is in `read`.
    covered: u64,
    read: Vec<(u64, SharedMessage)>,
    bytes: usize,
    /// Payload bytes received from the stream, kept or not.
    read_bytes: usize,
}

impl NatsBus {
    /// Messages of `room` with offsets in `[from, upto]`, oldest first, and
    /// whether the read reached `upto` (saw it or a later message).
    pub(super) async fn read(
        &self,
        room: &RoomId,
        from: u64,
        upto: u64,
    ) -> Result<(Vec<(u64, SharedMessage)>, bool), BusError> {
        let mut out = Vec::new();
        if from > upto {
            return Ok((out, true));
        }
        let mut reached = false;
        self.read_with(room, from.max(1), |seq, msg| {
            if seq >= upto {
                reached = true;
            }
            if seq > upto {
                return false;
            }
            out.push((seq, msg));
            seq < upto
        })
        .await?;
        Ok((out, reached))
    }

    /// Streams the stored messages of `room` from offset `from` to `each`
    /// until it returns false or the stream has no more.
    pub(super) async fn read_with(
        &self,
        room: &RoomId,
        from: u64,
        mut each: impl FnMut(u64, SharedMessage) -> bool,
    ) -> Result<(), BusError> {
        metrics::counter!("gateway_bus_reads_total").increment(1);
        let stream = self.stream_of(room);
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: self.store_subject(room),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(BusError::nats(UnavailableKind::Read))?;
        let name = consumer.cached_info().name.clone();
        let mut delivered = 0u64;
        let result = async {
            loop {
                let mut batch = consumer
                    .fetch()
                    .max_messages(FETCH_BATCH)
                    .messages()
                    .await
                    .map_err(BusError::nats(UnavailableKind::Read))?;
                let mut got = 0;
                let mut pending = 0;
                while let Some(m) = batch.next().await {
                    let m = m.map_err(BusError::nats(UnavailableKind::Read))?;
                    let Ok(info) = m.info() else { continue };
                    let (seq, left) = (info.stream_sequence, info.pending);
                    // A fresh consumer numbers its deliveries 1, 2, 3...: a
                    // jump means a delivery was lost between batches, so the
                    // read is incomplete and the caller retries.
                    delivered += 1;
                    if info.consumer_sequence != delivered {
                        tracing::debug!(%room, delivered, next = info.consumer_sequence, "stream read skipped deliveries");
                        return Err(BusError::unavailable(UnavailableKind::SkippedDeliveries));
                    }
                    got += 1;
                    pending = left;
                    let Ok(env) = Envelope::decode(m.payload.as_ref()) else {
                        continue;
                    };
                    if !each(seq, encode(room, seq, &env)) {
                        return Ok(());
                    }
                }
                if got == 0 || pending == 0 {
                    return Ok(());
                }
            }
        }
        .await;
        let _ = stream.delete_consumer(&name).await;
        result
    }

    /// The body of a direct-get request for up to `batch` messages of `room`
    /// from offset `from` on, stopping after about `max_bytes`.
    pub(super) fn forward_request(&self, room: &RoomId, from: u64, batch: usize, max_bytes: usize) -> String {
        serde_json::json!({
            "seq": from,
            "next_by_subj": self.store_subject(room),
            "batch": batch,
            "max_bytes": max_bytes.clamp(1, i64::MAX as usize),
        })
        .to_string()
    }

    /// Sends a direct-get request (`body`, JSON) to the stream of `room` and
    /// hands the messages it answers, in order, to `each` until the end of
    /// the batch, "not found", or `each` returns false; then says how the
    /// answer ended. Only batch and `multi_last` requests: they end with an
    /// end-of-batch status, which tells how many messages of the room the
    /// answering server holds after the batch (none said: taken as none).
    ///
    /// Errors: NATS unreachable, no answer within [`DIRECT_TIMEOUT`], or an
    /// error status.
    pub(super) async fn direct(
        &self,
        room: &RoomId,
        body: String,
        mut each: impl FnMut(Stored) -> bool,
    ) -> Result<Answer, BusError> {
        metrics::counter!("gateway_bus_reads_total").increment(1);
        let subject = self.store_subject(room);
        let inbox = self.client.new_inbox();
        // Dropping the subscription (an UNSUB) ends an answer read in part.
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(BusError::nats(UnavailableKind::Subscribe))?;
        let target = &self.direct_get[partition(room.as_str(), self.cfg.partitions) as usize];
        self.client
            .publish_with_reply(target.clone(), inbox, body.into())
            .await
            .map_err(BusError::nats(UnavailableKind::DirectGet))?;
        loop {
            let msg = tokio::time::timeout(DIRECT_TIMEOUT, sub.next())
                .await
                .map_err(|_| {
                    tracing::debug!(%room, "direct get: no answer within {DIRECT_TIMEOUT:?}");
                    BusError::Timeout
                })?
                .ok_or(BusError::unavailable(UnavailableKind::DirectGetEnded))?;
            if let Some(status) = msg.status {
                // 204: end of batch; 404: no (more) messages.
                return match status.as_u16() {
                    204 => {
                        let left = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(PENDING))
                            .and_then(|v| v.as_str().parse::<u64>().ok());
                        Ok(if left.is_some_and(|n| n > 0) {
                            Answer::Cut
                        } else {
                            Answer::Exhausted
                        })
                    }
                    404 => Ok(Answer::Exhausted),
                    code => {
                        tracing::debug!(%room, code, description = msg.description.as_deref().unwrap_or(""), "direct get failed");
                        Err(BusError::unavailable(UnavailableKind::DirectGetStatus(code)))
                    }
                };
            }
            let header = |name: &str| {
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            let seq = header(SEQ).and_then(|v| v.parse::<u64>().ok());
            let (Some(seq), true) = (seq, header(SUBJECT).as_deref() == Some(subject.as_str())) else {
                return Err(BusError::unavailable(UnavailableKind::DirectGetMalformed));
            };
            let pending = header(PENDING).and_then(|v| v.parse::<u64>().ok());
            if !each(Stored {
                seq,
                pending,
                payload: msg.payload,
            }) {
                return Ok(Answer::Stopped);
            }
        }
    }

    /// Catch-up for a joiner whose `since` is older than this node's cache:
    /// the messages of `room` in `(since, upto]`, oldest first. Only the part
    /// the cache lacks is read from the stream (plus the message at `since`,
    /// which proves that nothing after it is gone), and reading stops as soon
    /// as the frames would pass `max_bytes` (encoded bytes): then, as when a
    /// message after `since` may be gone, the answer is `recovered: false`
    /// with no messages. `since` 0 (the client saw nothing) is recovered only
    /// if the room never dropped a message. The messages read are put in
    /// front of the cache as far as its caps allow, so the next joiner with
    /// the same `since` reads nothing. One read at a time per room.
    ///
    /// Errors: the stream could not be read ([`BusError::Unavailable`],
    /// [`BusError::Timeout`]).
    pub async fn catchup(&self, room: &RoomId, since: u64, upto: u64, max_bytes: usize) -> Result<Fetched, BusError> {
        let lost = |read_bytes| Fetched {
            messages: Vec::new(),
            recovered: false,
            read_bytes,
        };
        if self.is_ephemeral(room) {
            return Ok(lost(0));
        }
        let link = self.links.get(room).map(|l| l.clone());
        let _one_at_a_time = match &link {
            Some(l) => Some(l.reads.lock().await),
            None => None,
        };
        // An earlier reader may have filled the cache meanwhile.
        if let Catchup::Messages { messages, recovered } = self.rooms.catchup(room, since, upto) {
            return Ok(Fetched {
                messages,
                recovered,
                read_bytes: 0,
            });
        }
        if max_bytes == 0 {
            // Nothing could be replayed: read nothing.
            return Ok(lost(0));
        }
        let mut st = CatchupRead {
            proved: false,
            covered: since,
            read: Vec::new(),
            bytes: 0,
            read_bytes: 0,
        };
        // Live messages may push the cache's start up while this reads: then
        // read on from where the last read stopped.
        for _ in 0..4 {
            let (start, cached) = self.rooms.cache_start(room, upto).unwrap_or((upto, 0));
            let read_upto = start.min(upto);
            let budget = max_bytes.saturating_sub(cached);
            match read_forward(self, room, since, read_upto, budget, &mut st).await? {
                ReadEnd::Reached => {}
                ReadEnd::Lost | ReadEnd::OverBudget => return Ok(lost(st.read_bytes)),
            }
            if let Some(messages) = self.rooms.catchup_from_stream(room, since, upto, &st.read, read_upto) {
                let bytes: usize = messages.iter().map(Weighted::weight).sum();
                if bytes > max_bytes {
                    return Ok(lost(st.read_bytes));
                }
                return Ok(Fetched {
                    messages,
                    recovered: true,
                    read_bytes: st.read_bytes,
                });
            }
        }
        Err(BusError::unavailable(UnavailableKind::CacheMoving))
    }

    /// The newest stored message of `room` at or below offset `n`. `n` may
    /// lie past the stream's last sequence only if `first` (the first step
    /// of a page: `before` comes from the client).
    pub(super) async fn last_at_or_below(
        &self,
        room: &RoomId,
        n: u64,
        first: bool,
    ) -> Result<Option<Stored>, BusError> {
        if n == 0 {
            return Ok(None);
        }
        let mut found = None;
        if n < u64::MAX {
            let body = serde_json::json!({ "multi_last": [self.store_subject(room)], "up_to_seq": n }).to_string();
            self.direct(room, body, |m| {
                found = Some(m);
                false
            })
            .await?;
            if found.is_some() || !first {
                return Ok(found);
            }
        }
        // Also "not found" when `n` is past the stream's last sequence: then
        // the room's last message is the one.
        // Asked of the leader: a replica that is behind has an older last.
        match self
            .stream_of(room)
            .get_last_raw_message_by_subject(&self.store_subject(room))
            .await
        {
            Ok(m) if m.sequence <= n => Ok(Some(Stored {
                seq: m.sequence,
                pending: None,
                payload: m.payload,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BusError::nats(UnavailableKind::LastMessage)(e)),
        }
    }

    /// A history page beyond the cache: up to `limit` messages of `room`
    /// older than `before` (the newest if `None`), oldest first, and whether
    /// older ones remain. A page that reaches the cache's start is put in
    /// front of the cache.
    ///
    /// Two passes: a walk back from `before`, newest first, one direct get
    /// per message plus one to learn `more`, finds where the page starts;
    /// then the page is read forward from there (the forward scan) up to
    /// `before` (or the room's last message, asked of the leader). A walk
    /// step answered by a replica that is behind returns an older message
    /// than the leader would, skipping the ones it lacks; so the walk only
    /// says where to start (never too late), and the forward read, which a
    /// lagging replica can only end early (then the leader goes on), says
    /// what the page holds.
    ///
    /// Errors: the stream could not be read, or the room's oldest messages
    /// kept leaving the stream while the page was read.
    pub async fn history(
        &self,
        room: &RoomId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<SharedMessage>, bool), BusError> {
        if self.is_ephemeral(room) {
            return Ok((Vec::new(), false));
        }
        let upto = match before {
            Some(0) => return Ok((Vec::new(), false)),
            Some(b) => b - 1,
            None => u64::MAX,
        };
        for _ in 0..HISTORY_ATTEMPTS {
            match self.history_page(room, upto, limit).await {
                Ok(Some(page)) => return Ok(page),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%room, error = ?e, "history read failed");
                    return Err(e);
                }
            }
        }
        Err(BusError::unavailable(UnavailableKind::HistoryMoving))
    }

    /// One attempt at [`Self::history`] for the messages at or below `upto`;
    /// `None` if a message the read went on from left the stream meanwhile.
    async fn history_page(
        &self,
        room: &RoomId,
        upto: u64,
        limit: usize,
    ) -> Result<Option<(Vec<SharedMessage>, bool)>, BusError> {
        let mut below = upto;
        let mut taken = 0;
        let mut newest = None;
        let mut older = None;
        // A page as long as the room's whole history needs no walk: it is
        // read forward from the room's first message.
        let whole = self.cfg.history > 0 && limit as u64 >= self.cfg.history as u64;
        if whole {
            taken = limit;
            if upto == u64::MAX {
                newest = Some(self.last_seq(room).await?).filter(|&n| n > 0);
            }
        }
        // The message after a full page only answers `more`.
        while !whole && let Some(m) = self.last_at_or_below(room, below, taken == 0).await? {
            newest.get_or_insert(m.seq);
            if taken == limit {
                older = Some(m.seq);
                break;
            }
            taken += 1;
            below = m.seq.saturating_sub(1);
        }
        if limit == 0 {
            return Ok(Some((Vec::new(), older.is_some())));
        }
        // With no `before`, the first step asked the leader for the room's
        // last message: the page ends there.
        let reach = match (upto, newest) {
            (u64::MAX, None) => return Ok(Some((Vec::new(), false))),
            (u64::MAX, Some(n)) => n,
            _ => upto,
        };
        let mut page: std::collections::VecDeque<(u64, Option<SharedMessage>)> = Default::default();
        let mut dropped = older;
        let end = scan(
            self,
            room,
            Start::At(older.map_or(1, |o| o + 1)),
            reach,
            taken + 1,
            usize::MAX,
            |m| {
                if m.seq > upto {
                    return false;
                }
                let msg = Envelope::decode(m.payload.as_ref())
                    .ok()
                    .map(|env| encode(room, m.seq, &env));
                page.push_back((m.seq, msg));
                if page.len() > limit {
                    dropped = page.pop_front().map(|(seq, _)| seq);
                }
                true
            },
        )
        .await?;
        if matches!(end, ScanEnd::Broken) {
            return Ok(None);
        }
        let oldest = page.front().map(|(seq, _)| *seq);
        let page: Vec<(u64, SharedMessage)> = page
            .into_iter()
            .filter_map(|(seq, msg)| msg.map(|m| (seq, m)))
            .collect();
        if let (Some(oldest), Some(&(newest, _))) = (oldest, page.last()) {
            // Nothing after a stored message is gone: the page holds every
            // message of the room after the older one (or after the offset
            // before its oldest, when none is older).
            let covers_from = dropped.unwrap_or(oldest.saturating_sub(1));
            self.rooms.prepend(room, covers_from, &page, newest);
        }
        Ok(Some((page.into_iter().map(|(_, f)| f).collect(), dropped.is_some())))
    }

    /// The stream's last offset for `room` (0 if it has none), asked of the
    /// stream's leader. A direct get may be answered by a replica that is
    /// behind (just restarted, or cut off): a stale tail made a client's
    /// `since` look newer than the room, which then went live too early and
    /// its resuming members missed messages (chaos run, seed 20261129).
    pub(super) async fn last_seq(&self, room: &RoomId) -> Result<u64, BusError> {
        match self
            .stream_of(room)
            .get_last_raw_message_by_subject(&self.store_subject(room))
            .await
        {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(BusError::nats(UnavailableKind::LastMessage)(e)),
        }
    }

    /// [`Self::last_seq`], retried briefly: right after a leader change the
    /// first request may fail.
    pub(super) async fn last_seq_retrying(&self, room: &RoomId) -> Result<u64, BusError> {
        let mut attempt = 0;
        loop {
            match self.last_seq(room).await {
                Ok(seq) => return Ok(seq),
                Err(e) if attempt >= 3 || !self.is_connected() => return Err(e),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
    }

    /// Whether the message at `offset` of `room` is still in the stream,
    /// asked of the stream's leader (a replica that is behind would say
    /// "gone" of a message it has not received yet).
    pub(super) async fn still_stored(&self, room: &RoomId, offset: u64) -> bool {
        match self.stream_of(room).get_raw_message(offset).await {
            Ok(m) => m.subject.as_str() == self.store_subject(room),
            Err(_) => false,
        }
    }
}

/// Reads the messages of `room` after `st.covered` up to `read_upto` into
/// `st`, within `budget` bytes of frames. The first answer (the stored
/// message at or after `since`) decides whether anything after `since`
/// may be gone; a replica behind the leader decides nothing: what it
/// lacks is asked of the leader ([`scan`]).
pub(super) async fn read_forward<S: StreamReads>(
    src: &S,
    room: &RoomId,
    since: u64,
    read_upto: u64,
    budget: usize,
    st: &mut CatchupRead,
) -> Result<ReadEnd, BusError> {
    if st.covered >= read_upto {
        return Ok(ReadEnd::Reached);
    }
    let mut end = None;
    let mut take = |st: &mut CatchupRead, m: Stored| -> bool {
        st.read_bytes += m.payload.len();
        if m.seq > read_upto {
            st.covered = read_upto;
            return false;
        }
        if let Ok(env) = Envelope::decode(m.payload.as_ref()) {
            let msg = encode(room, m.seq, &env);
            st.bytes += msg.weight();
            if st.bytes > budget {
                end = Some(ReadEnd::OverBudget);
                return false;
            }
            st.read.push((m.seq, msg));
        }
        st.covered = m.seq;
        true
    };
    if !st.proved {
        // One message until the first answer proves nothing after `since`
        // is gone: a `since` older than the stream's history then costs
        // one message, not a batch.
        let mut first = None;
        src.direct_from(room, since.max(1), 1, budget, |m| {
            first = Some(m);
            false
        })
        .await?;
        if first.is_none() {
            // Nothing at or after `since` on the server that answered: it
            // may be a replica that is behind.
            metrics::counter!("gateway_bus_stale_reads_total").increment(1);
            first = src.leader_next(room, since.max(1)).await?;
        }
        let Some(m) = first else {
            return Ok(ReadEnd::Lost);
        };
        // If the message at `since` is stored, so is everything after it;
        // and nothing lies between `since` and `since + 1`. With `since`
        // 0, only a room that never dropped a message is whole (the count
        // comes with direct answers only).
        let intact = if since == 0 {
            m.pending.is_some_and(|p| src.never_dropped(p + 1))
        } else {
            m.seq <= since.saturating_add(1)
        };
        if !intact {
            st.read_bytes += m.payload.len();
            return Ok(ReadEnd::Lost);
        }
        st.proved = true;
        if m.seq <= since {
            st.read_bytes += m.payload.len();
        } else if !take(st, m) {
            return Ok(end.unwrap_or(ReadEnd::Reached));
        }
        if st.covered >= read_upto {
            return Ok(ReadEnd::Reached);
        }
    }
    // `st.covered` is a message read (or `since`, proved stored): the read
    // goes on after it.
    let after = st.covered;
    let left = budget.saturating_sub(st.bytes);
    let scan = scan(src, room, Start::After(after), read_upto, DIRECT_BATCH, left, |m| {
        take(st, m)
    })
    .await?;
    if let Some(end) = end {
        return Ok(end);
    }
    Ok(match scan {
        ScanEnd::Reached => ReadEnd::Reached,
        // The leader lacks a message up to `read_upto`, or the one read
        // last left the stream meanwhile.
        ScanEnd::Exhausted | ScanEnd::Broken => ReadEnd::Lost,
    })
}

#[cfg(test)]
mod tests {
    use super::super::scan::tests::{Lagging, room};
    use super::*;

    fn fresh(since: u64) -> CatchupRead {
        CatchupRead {
            proved: false,
            covered: since,
            read: Vec::new(),
            bytes: 0,
            read_bytes: 0,
        }
    }

    async fn catch_up(src: &Lagging, since: u64, upto: u64) -> (ReadEnd, Vec<u64>) {
        let mut st = fresh(since);
        let end = read_forward(src, &room(), since, upto, usize::MAX, &mut st)
            .await
            .unwrap();
        (end, st.read.iter().map(|(seq, _)| *seq).collect())
    }

    const STORED: [u64; 6] = [5, 8, 13, 21, 34, 55];

    /// Issue 16 (chaos run): a replica behind holds nothing at or after
    /// `since`. That proves nothing is gone; the leader is asked, and the
    /// catch-up is whole (it used to answer recovered:false at once).
    #[tokio::test]
    async fn a_since_past_a_replica_behind_is_proved_by_the_leader() {
        let src = Lagging::new(&STORED, 13);
        let (end, read) = catch_up(&src, 21, 55).await;
        assert!(matches!(end, ReadEnd::Reached));
        assert_eq!(read, [34, 55]);
    }

    #[tokio::test]
    async fn a_catch_up_a_replica_behind_ends_early_is_read_on_from_the_leader() {
        let src = Lagging::new(&STORED, 13);
        let (end, read) = catch_up(&src, 5, 55).await;
        assert!(matches!(end, ReadEnd::Reached));
        assert_eq!(read, [8, 13, 21, 34, 55]);
    }

    /// The message at `since` left the stream (the oldest kept is 8):
    /// messages after it may be gone too, so the catch-up is lost.
    #[tokio::test]
    async fn a_since_that_left_the_stream_is_lost() {
        let src = Lagging::new(&STORED[1..], u64::MAX);
        let (end, _) = catch_up(&src, 5, 55).await;
        assert!(matches!(end, ReadEnd::Lost));
    }

    /// `since` 0 (the client saw nothing): whole only if the room never
    /// dropped a message, which the count in the first answer tells.
    #[tokio::test]
    async fn since_zero_is_lost_unless_the_room_never_dropped_one() {
        let mut src = Lagging::new(&STORED, u64::MAX);
        let (end, _) = catch_up(&src, 0, 55).await;
        assert!(matches!(end, ReadEnd::Lost), "6 stored, a limit of 6: may have dropped");
        src.never_dropped_below = 7;
        let (end, read) = catch_up(&src, 0, 55).await;
        assert!(matches!(end, ReadEnd::Reached));
        assert_eq!(read, STORED);
    }

    /// Nothing at or after `since` even at the leader: the client's `since`
    /// is beyond the stream (or everything after it left).
    #[tokio::test]
    async fn a_since_the_leader_has_nothing_after_is_lost() {
        let src = Lagging::new(&STORED, 13);
        let (end, _) = catch_up(&src, 56, 60).await;
        assert!(matches!(end, ReadEnd::Lost));
    }
}
