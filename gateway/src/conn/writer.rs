//! The writer of a connection's socket: drains the outbox in batches, one
//! vectored write per batch, coalesces pushes for busy connections, turns
//! notify-mode counts into `activity` pushes, and notices a client that
//! stopped reading.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fanout_tree::Drained;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, sleep, sleep_until};

use crate::error::CloseReason;
use crate::protocol::{Codec, ServerMsg};
use crate::rooms::{Activity, ConnOutbox, Frame};
use crate::transport::deflate::Deflate;
use crate::transport::ws;

/// Write coalescing window for busy connections.
pub(super) const COALESCE: Duration = Duration::from_millis(2);

/// Batches this large are written without waiting.
pub(super) const COALESCE_BELOW: usize = 64;

/// Timing of the writer.
#[derive(Debug, Clone, Copy)]
pub(super) struct WriterTimes {
    pub(super) write_timeout: Duration,
    /// At most one `activity` push per room per this interval.
    pub(super) activity_interval: Duration,
    /// The connection's sub-protocol (for its `activity` pushes).
    pub(super) codec: Codec,
    /// Its `permessage-deflate` parameters, if negotiated.
    pub(super) deflate: Option<Deflate>,
}

/// The only writer of the socket: drains the outbox in batches, one
/// vectored write per batch, and notices a client that stopped reading.
pub(super) async fn write_loop<W>(
    writer: &mut W,
    outbox: &ConnOutbox,
    activity: &OnceLock<Arc<Activity>>,
    batch: &mut VecDeque<Frame>,
    times: WriterTimes,
) -> CloseReason
where
    W: AsyncWrite + Unpin,
{
    let WriterTimes {
        write_timeout,
        activity_interval,
        codec,
        deflate,
    } = times;
    let mut last_write: Option<Instant> = None;
    // Notify-mode counts are flushed one interval after the first message of
    // a burst (trailing edge: a burst becomes one push per room); an idle
    // connection arms no timer at all.
    loop {
        tokio::select! {
            d = outbox.drain(batch) => match d {
                Drained::Frames => {
                    // A connection written to moments ago is busy: wait out the
                    // rest of a short window so one write(2) carries several
                    // frames. A quiet connection writes at once.
                    if let Some(at) = last_write
                        && batch.len() < COALESCE_BELOW
                        && at.elapsed() < COALESCE
                        && !batch.iter().any(Frame::is_reply)
                    {
                        sleep_until(at + COALESCE).await;
                        outbox.try_drain(batch);
                    }
                }
                Drained::Overflowed => return CloseReason::SlowConsumer,
                Drained::Closed => return CloseReason::ClientGone,
            },
            a = async {
                // Boxed and only for connections with notify-mode rooms (the
                // subscribe reply that follows the first one starts a new
                // round of this loop, which sees it). The deadline is kept by
                // `activity`, so a restart of this branch (other frames won
                // the select) does not postpone it.
                match activity.get() {
                    Some(a) => {
                        Box::pin(async {
                            let first = a.pending().await;
                            sleep_until(first + activity_interval).await;
                        })
                        .await;
                        a
                    }
                    None => std::future::pending().await,
                }
            } => {
                // Through the outbox: whoever writes it now (this task or a
                // flusher) writes these too, in order. A full outbox shows up
                // as overflowed on the next drain.
                for (room, offset, count) in a.take() {
                    let push = ServerMsg::Activity {
                        room: &room,
                        offset,
                        count,
                    };
                    let _ = outbox.try_push(codec.encode(&push).deflated_or_plain(deflate));
                }
                continue;
            },
        }
        last_write = Some(Instant::now());
        let last_batch = batch.len();
        // A client that stops reading leaves this write pending; notice it
        // through the overflowing outbox or the write timeout.
        tokio::select! {
            r = ws::write_all(writer, batch) => {
                if r.is_err() {
                    return CloseReason::ClientGone;
                }
            }
            () = outbox.overflowed() => return CloseReason::SlowConsumer,
            () = sleep(write_timeout) => return CloseReason::SlowConsumer,
        }
        // A quiet connection keeps no queue memory between writes (a busy
        // one, whose batches carry several frames, keeps its buffer).
        if batch.capacity() > 1024 || last_batch < 4 {
            *batch = VecDeque::new();
        }
    }
}
