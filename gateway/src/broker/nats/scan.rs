//! Forward reads of a room's stream that a replica behind the leader cannot
//! shorten.
//!
//! Direct gets may be answered by any replica of a stream (nats-server keeps
//! a follower in the direct-get queue group once it was ~90% caught up, and
//! never takes it out; the read-after-write option of 2.12 was withdrawn), so
//! an answer is the stream as one replica holds it, a prefix of what the
//! leader holds. A replica that is behind cannot leave a hole inside an
//! answer (it applies in order), only end it early. So a forward read that
//! ends before a message known to be stored is continued from the stream's
//! leader (`STREAM.MSG.GET`), one message per request, instead of taking the
//! rest as gone.

use super::*;

/// How a direct-get answer ended.
pub(super) enum Answer {
    /// The server that answered holds no further message of the room (404, or
    /// an end of batch with nothing pending).
    Exhausted,
    /// The batch or byte limit cut the answer: that server holds more.
    Cut,
    /// The caller stopped reading.
    Stopped,
}

/// How a [`scan`] ended.
pub(super) enum ScanEnd {
    /// A message at or after the bound was handed over, or the caller stopped.
    Reached,
    /// The stream's leader holds no message of the room after the last one
    /// handed over: the rest up to the bound left the stream, or the bound was
    /// never a stored offset.
    Exhausted,
    /// A message the read went on from left the stream meanwhile: messages
    /// after it may have left too, unseen (rooms lose their oldest first).
    Broken,
}

/// Where a [`scan`] starts.
#[derive(Clone, Copy)]
pub(super) enum Start {
    /// After this message, already read, which must still be stored.
    After(u64),
    /// At this offset.
    At(u64),
}

/// What a forward scan asks of a room's stream. [`NatsBus`] asks NATS; the
/// unit tests below use a stream whose replica is behind its leader.
pub(super) trait StreamReads {
    /// A direct get of up to `batch` messages of `room` from offset `from`
    /// on, stopping after about `max_bytes` payload bytes, handed to `each`
    /// in order until it returns false. Any replica may answer.
    async fn direct_from(
        &self,
        room: &RoomId,
        from: u64,
        batch: usize,
        max_bytes: usize,
        each: impl FnMut(Stored) -> bool + Send,
    ) -> Result<Answer, BusError>;

    /// The first stored message of `room` at or after offset `from`, asked
    /// of the stream's leader (`None`: there is none).
    async fn leader_next(&self, room: &RoomId, from: u64) -> Result<Option<Stored>, BusError>;

    /// Whether the message at `offset` of `room` is still stored, asked of
    /// the stream's leader.
    async fn still_stored(&self, room: &RoomId, offset: u64) -> bool;

    /// Whether a room with `stored` messages in its stream can never have
    /// dropped one (the stream's limits).
    fn never_dropped(&self, stored: u64) -> bool;
}

impl StreamReads for NatsBus {
    async fn direct_from(
        &self,
        room: &RoomId,
        from: u64,
        batch: usize,
        max_bytes: usize,
        each: impl FnMut(Stored) -> bool + Send,
    ) -> Result<Answer, BusError> {
        let body = self.forward_request(room, from, batch, max_bytes);
        self.direct(room, body, each).await
    }

    async fn leader_next(&self, room: &RoomId, from: u64) -> Result<Option<Stored>, BusError> {
        NatsBus::leader_next(self, room, from).await
    }

    async fn still_stored(&self, room: &RoomId, offset: u64) -> bool {
        NatsBus::still_stored(self, room, offset).await
    }

    fn never_dropped(&self, stored: u64) -> bool {
        NatsBus::never_dropped(self, stored)
    }
}

/// Reads the stored messages of `room` oldest first and hands each to
/// `each`, until it returns false or a message at or after offset `reach`
/// (one known to be stored, or a bound) was handed over. The read starts
/// at `start`; after a message already read, every request answers that
/// message first, proving it is still stored.
/// `batch` messages per direct get (plus the repeated one); `max_bytes`
/// caps what a direct answer carries (payload bytes, roughly).
///
/// Direct gets in batches; an answer that ends short of `reach` (the
/// replica that answered holds nothing more) is continued from the
/// stream's leader, and then the first message of that stretch is checked
/// to be still stored at the end.
///
/// Errors: NATS unreachable or a request failed.
pub(super) async fn scan<S: StreamReads>(
    src: &S,
    room: &RoomId,
    start: Start,
    reach: u64,
    batch: usize,
    max_bytes: usize,
    mut each: impl FnMut(Stored) -> bool + Send,
) -> Result<ScanEnd, BusError> {
    let (mut last, from) = match start {
        Start::After(seq) => (Some(seq), seq),
        Start::At(seq) => (None, seq),
    };
    let mut read = 0usize;
    let mut last_len = 0usize;
    // Room for the repeated message (subject and headers included) on a
    // continuation; doubled when an answer brought nothing new.
    let mut slack = 4096usize;
    loop {
        if last.is_some_and(|l| l >= reach) {
            return Ok(ScanEnd::Reached);
        }
        let again = last;
        let start = last.unwrap_or(from);
        let cap = max_bytes
            .saturating_sub(read)
            .saturating_add(if again.is_some() { last_len + slack } else { 0 });
        let (mut pending_again, mut broken, mut done, mut fresh) = (again, false, false, false);
        let answer = src
            .direct_from(room, start, batch.max(1) + usize::from(again.is_some()), cap, |m| {
                if let Some(a) = pending_again.take() {
                    if m.seq == a {
                        return true;
                    }
                    broken = true;
                    return false;
                }
                fresh = true;
                read += m.payload.len();
                last_len = m.payload.len();
                let seq = m.seq;
                last = Some(seq);
                if !each(m) || seq >= reach {
                    done = true;
                    return false;
                }
                true
            })
            .await?;
        if broken {
            return Ok(ScanEnd::Broken);
        }
        if done {
            return Ok(ScanEnd::Reached);
        }
        match answer {
            Answer::Cut if fresh => {}
            Answer::Cut => slack = slack.saturating_mul(2),
            Answer::Exhausted | Answer::Stopped => break,
        }
    }
    // The replica that answered is behind the leader (or the rest left
    // the stream): the leader decides.
    metrics::counter!("gateway_bus_stale_reads_total").increment(1);
    tracing::debug!(%room, last, reach, "direct read ended short of a stored offset; reading on from the leader");
    // Between single reads, only messages that left the stream (oldest
    // first) can go unseen: if the first message of this stretch is still
    // stored at the end, none did.
    let mut check = last;
    let mut next = last.map_or(from, |l| l + 1);
    let end = loop {
        let Some(m) = src.leader_next(room, next).await? else {
            break ScanEnd::Exhausted;
        };
        let seq = m.seq;
        check.get_or_insert(seq);
        next = seq + 1;
        if !each(m) || seq >= reach {
            break ScanEnd::Reached;
        }
    };
    if let Some(c) = check
        && !src.still_stored(room, c).await
    {
        return Ok(ScanEnd::Broken);
    }
    Ok(end)
}

impl NatsBus {
    /// The first stored message of `room` at or after offset `from`, asked of
    /// the stream's leader (`None`: there is none).
    pub(super) async fn leader_next(&self, room: &RoomId, from: u64) -> Result<Option<Stored>, BusError> {
        metrics::counter!("gateway_bus_reads_total").increment(1);
        match self
            .stream_of(room)
            .get_first_raw_message_by_subject(self.store_subject(room), from)
            .await
        {
            Ok(m) => Ok(Some(Stored {
                seq: m.sequence,
                pending: None,
                payload: m.payload,
            })),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BusError::nats(UnavailableKind::LeaderRead)(e)),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeSet;

    use parking_lot::Mutex;

    use super::*;

    /// One room's stream as its leader holds it, and a replica behind the
    /// leader that answers every direct get: it holds the leader's messages
    /// up to `replica_upto` only (a prefix: replicas apply in order). What
    /// the chaos run met after a partition healed (issue 16).
    pub(in crate::broker::nats) struct Lagging {
        leader: Mutex<BTreeSet<u64>>,
        replica_upto: u64,
        /// Once the leader hands this one out, it and every older message
        /// leave the stream (rooms lose their oldest first).
        expires_when_read: Option<u64>,
        /// What the stream's limits say: a room with this few messages
        /// never dropped one (no max age, under the per-room limit).
        pub(in crate::broker::nats) never_dropped_below: u64,
        leader_reads: Mutex<Vec<u64>>,
    }

    impl Lagging {
        pub(in crate::broker::nats) fn new(stored: &[u64], replica_upto: u64) -> Self {
            Lagging {
                leader: Mutex::new(stored.iter().copied().collect()),
                replica_upto,
                expires_when_read: None,
                never_dropped_below: 0,
                leader_reads: Mutex::new(Vec::new()),
            }
        }

        fn stored(seq: u64, pending: Option<u64>) -> Stored {
            let env = Envelope {
                from: "alice".into(),
                ts_ms: seq,
                data: bytes::Bytes::from_static(b"{}"),
            };
            Stored {
                seq,
                pending,
                payload: env.encode_to_vec().into(),
            }
        }
    }

    impl StreamReads for Lagging {
        async fn direct_from(
            &self,
            _room: &RoomId,
            from: u64,
            batch: usize,
            _max_bytes: usize,
            mut each: impl FnMut(Stored) -> bool + Send,
        ) -> Result<Answer, BusError> {
            let held: Vec<u64> = self
                .leader
                .lock()
                .iter()
                .copied()
                .filter(|&seq| from <= seq && seq <= self.replica_upto)
                .collect();
            for (i, &seq) in held.iter().take(batch).enumerate() {
                let pending = (held.len() - i - 1) as u64;
                if !each(Self::stored(seq, Some(pending))) {
                    return Ok(Answer::Stopped);
                }
            }
            Ok(if held.len() > batch {
                Answer::Cut
            } else {
                Answer::Exhausted
            })
        }

        async fn leader_next(&self, _room: &RoomId, from: u64) -> Result<Option<Stored>, BusError> {
            let mut leader = self.leader.lock();
            let next = leader.range(from..).next().copied();
            if let Some(seq) = next {
                self.leader_reads.lock().push(seq);
                if self.expires_when_read == Some(seq) {
                    leader.retain(|&kept| kept > seq);
                }
            }
            Ok(next.map(|seq| Self::stored(seq, None)))
        }

        async fn still_stored(&self, _room: &RoomId, offset: u64) -> bool {
            self.leader.lock().contains(&offset)
        }

        fn never_dropped(&self, stored: u64) -> bool {
            stored < self.never_dropped_below
        }
    }

    pub(in crate::broker::nats) fn room() -> RoomId {
        RoomId::parse("lag").unwrap()
    }

    async fn read(src: &Lagging, start: Start, reach: u64, batch: usize) -> (Vec<u64>, ScanEnd) {
        let mut got = Vec::new();
        let end = scan(src, &room(), start, reach, batch, usize::MAX, |m| {
            got.push(m.seq);
            true
        })
        .await
        .unwrap();
        (got, end)
    }

    /// The room's offsets are not contiguous (its stream holds other rooms).
    const STORED: [u64; 7] = [3, 5, 8, 13, 21, 34, 55];

    #[tokio::test]
    async fn an_answer_a_replica_behind_ends_early_is_read_on_from_the_leader() {
        // The replica has everything up to 13; a read to 55 must not stop
        // there (it used to: the rest counted as gone, so a catch-up said
        // recovered:false and a history page came back short).
        let src = Lagging::new(&STORED, 13);
        let (got, end) = read(&src, Start::After(3), 55, 2).await;
        assert_eq!(got, [5, 8, 13, 21, 34, 55]);
        assert!(matches!(end, ScanEnd::Reached));
        assert_eq!(*src.leader_reads.lock(), [21, 34, 55], "only what the replica lacks");
    }

    #[tokio::test]
    async fn a_replica_with_nothing_from_the_start_on_hands_the_whole_read_to_the_leader() {
        let src = Lagging::new(&STORED, 4);
        let (got, end) = read(&src, Start::At(5), 34, 8).await;
        assert_eq!(got, [5, 8, 13, 21, 34]);
        assert!(matches!(end, ScanEnd::Reached));
    }

    #[tokio::test]
    async fn a_replica_that_is_current_answers_everything_without_the_leader() {
        let src = Lagging::new(&STORED, u64::MAX);
        let (got, end) = read(&src, Start::After(3), 55, 2).await;
        assert_eq!(got, [5, 8, 13, 21, 34, 55]);
        assert!(matches!(end, ScanEnd::Reached));
        assert!(src.leader_reads.lock().is_empty());
    }

    #[tokio::test]
    async fn a_bound_past_the_leaders_last_message_ends_exhausted() {
        let src = Lagging::new(&STORED, 13);
        let (got, end) = read(&src, Start::After(3), 60, 4).await;
        assert_eq!(got, [5, 8, 13, 21, 34, 55]);
        assert!(matches!(end, ScanEnd::Exhausted));
    }

    #[tokio::test]
    async fn a_read_after_a_message_that_left_the_stream_is_broken() {
        // The read goes on after 4, which is not (or no longer) stored:
        // messages after it may have left unseen.
        let src = Lagging::new(&STORED, u64::MAX);
        let (got, end) = read(&src, Start::After(4), 55, 2).await;
        assert!(got.is_empty(), "{got:?}");
        assert!(matches!(end, ScanEnd::Broken));
    }

    #[tokio::test]
    async fn a_leader_stretch_whose_first_message_left_meanwhile_is_broken() {
        // Single reads from the leader cannot prove that nothing between
        // them left the stream; the message the stretch went on from still
        // being stored at the end does. Here the room's messages up to 13
        // expire while the leader is read.
        let mut src = Lagging::new(&STORED, 8);
        src.expires_when_read = Some(13);
        let (got, end) = read(&src, Start::After(3), 55, 8).await;
        assert_eq!(got, [5, 8, 13, 21, 34, 55]);
        assert!(matches!(end, ScanEnd::Broken));
    }
}
