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

/// How a [`NatsBus::scan`] ended.
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

/// Where a [`NatsBus::scan`] starts.
#[derive(Clone, Copy)]
pub(super) enum Start {
    /// After this message, already read, which must still be stored.
    After(u64),
    /// At this offset.
    At(u64),
}

impl NatsBus {
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
    pub(super) async fn scan(
        &self,
        room: &RoomId,
        start: Start,
        reach: u64,
        batch: usize,
        max_bytes: usize,
        mut each: impl FnMut(Stored) -> bool,
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
            let body = self.forward_request(room, start, batch.max(1) + usize::from(again.is_some()), cap);
            let (mut pending_again, mut broken, mut done, mut fresh) = (again, false, false, false);
            let answer = self
                .direct(room, body, |m| {
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
            let Some(m) = self.leader_next(room, next).await? else {
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
            && !self.still_stored(room, c).await
        {
            return Ok(ScanEnd::Broken);
        }
        Ok(end)
    }

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
