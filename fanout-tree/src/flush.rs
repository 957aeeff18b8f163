//! Flushers: the tasks that write fan-out frames to sockets.
//!
//! Owns the list of outboxes with frames to write, per shard. Does not own
//! the sockets (each outbox holds its [`crate::outbox::DirectWrite`] sink).
//!
//! Why: with a task per connection, every delivery wakes that task, which
//! polls its futures and makes one write. A flusher instead walks the
//! outboxes a broadcast scheduled and writes each one without waiting: the
//! per-delivery cost is the write itself. And it batches on its own under
//! load: while a flusher works through a list, newer messages are appended
//! to the outboxes it has not reached yet, so their next write carries
//! several frames; a quiet node writes each frame at once.
//!
//! A flusher yields to the runtime every [`YIELD_EVERY`] outboxes, so the
//! tasks that read publishes (and the I/O driver) run while it works.
//! Outboxes are spread over shards by [`Outbox::shard`]; with one flusher
//! per core, a big room's writes spread over the cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::outbox::{Outbox, Wire};

/// Outboxes written between two yields to the runtime.
pub const YIELD_EVERY: usize = 64;

/// One flusher's work list.
pub struct Flusher<T> {
    dirty: Mutex<Vec<Arc<Outbox<T>>>>,
    ready: Notify,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    frames: AtomicU64,
    handoffs: AtomicU64,
}

/// What the flushers have done since the start (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Write calls that took bytes.
    pub writes: u64,
    /// Frames written (frames / writes is the batching factor).
    pub frames: u64,
    /// Sockets that took no more, so the connection's task took over.
    pub handoffs: u64,
}

impl<T: Wire + Send + 'static> Flusher<T> {
    fn new() -> Self {
        Self {
            dirty: Mutex::new(Vec::new()),
            ready: Notify::new(),
            stats: Counters::default(),
        }
    }

    fn schedule(&self, outboxes: impl Iterator<Item = Arc<Outbox<T>>>) {
        let mut dirty = self.dirty.lock();
        let was_empty = dirty.is_empty();
        dirty.extend(outboxes);
        let wake = was_empty && !dirty.is_empty();
        drop(dirty);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Writes scheduled outboxes, forever.
    pub async fn run(&self) {
        let mut work: Vec<Arc<Outbox<T>>> = Vec::new();
        loop {
            std::mem::swap(&mut *self.dirty.lock(), &mut work);
            if work.is_empty() {
                self.ready.notified().await;
                continue;
            }
            let (mut writes, mut frames, mut handoffs) = (0, 0, 0);
            for (i, outbox) in work.drain(..).enumerate() {
                let done = outbox.flush_direct();
                writes += done.writes;
                frames += done.frames;
                handoffs += u64::from(done.handed_off);
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    self.count(&mut writes, &mut frames, &mut handoffs);
                    tokio::task::yield_now().await;
                }
            }
            self.count(&mut writes, &mut frames, &mut handoffs);
            // A burst's list is kept for the next one, a huge one is not.
            if work.capacity() > 1 << 16 {
                work = Vec::new();
            }
        }
    }
}

impl<T> Flusher<T> {
    /// Adds a batch's counts to the totals and resets them.
    fn count(&self, writes: &mut u64, frames: &mut u64, handoffs: &mut u64) {
        let c = &self.stats;
        c.writes.fetch_add(std::mem::take(writes), Ordering::Relaxed);
        c.frames.fetch_add(std::mem::take(frames), Ordering::Relaxed);
        c.handoffs.fetch_add(std::mem::take(handoffs), Ordering::Relaxed);
    }
}

/// The flushers of a node, one per shard.
pub struct Flushers<T> {
    shards: Vec<Arc<Flusher<T>>>,
}

impl<T: Wire + Send + 'static> Flushers<T> {
    /// `shards` flushers (at least one); run each with [`Flusher::run`].
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Arc::new(Flusher::new())).collect(),
        }
    }

    pub fn shards(&self) -> &[Arc<Flusher<T>>] {
        &self.shards
    }

    /// Totals over every shard.
    pub fn stats(&self) -> FlushStats {
        let mut total = FlushStats::default();
        for shard in &self.shards {
            let c = &shard.stats;
            total.writes += c.writes.load(Ordering::Relaxed);
            total.frames += c.frames.load(Ordering::Relaxed);
            total.handoffs += c.handoffs.load(Ordering::Relaxed);
        }
        total
    }

    /// The shard for a new outbox with this `key` (a connection id).
    pub fn shard_for(&self, key: u64) -> u32 {
        (key % self.shards.len() as u64) as u32
    }

    /// Hands outboxes that [`Outbox::try_push_direct`] asked to schedule to
    /// their flushers, moving them out of `outboxes` (which keeps its
    /// capacity, so a caller can reuse one list for every broadcast).
    pub fn schedule(&self, outboxes: &mut Vec<Arc<Outbox<T>>>) {
        if outboxes.is_empty() {
            return;
        }
        let Some((first, rest)) = self.shards.split_first() else {
            return;
        };
        for (i, shard) in rest.iter().enumerate() {
            shard.schedule(outboxes.extract_if(.., |o| o.shard() as usize == i + 1));
        }
        first.schedule(outboxes.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::{self, IoSlice};

    use bytes::Bytes;

    use super::*;
    use crate::outbox::{DirectWrite, Drained, OutboxLimits, Pushed};

    /// A socket that takes at most `room` bytes, then would block.
    struct FakeSocket {
        taken: Mutex<Vec<u8>>,
        room: Mutex<usize>,
    }

    impl DirectWrite for FakeSocket {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut room = self.room.lock();
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            let mut taken = self.taken.lock();
            for b in bufs {
                let k = b.len().min(*room - n);
                taken.extend_from_slice(&b[..k]);
                n += k;
                if n == *room {
                    break;
                }
            }
            *room -= n;
            Ok(n)
        }
    }

    fn socket(room: usize) -> Arc<FakeSocket> {
        Arc::new(FakeSocket {
            taken: Mutex::new(Vec::new()),
            room: Mutex::new(room),
        })
    }

    fn outbox(sock: &Arc<FakeSocket>, shard: u32) -> Arc<Outbox<Bytes>> {
        let sink: Arc<dyn DirectWrite> = sock.clone();
        Arc::new(Outbox::with_sink(OutboxLimits::default(), Some(sink), shard))
    }

    #[tokio::test]
    async fn a_flusher_writes_scheduled_outboxes_in_order_and_batches_what_piles_up() {
        let flushers: Flushers<Bytes> = Flushers::new(1);
        let sock = socket(usize::MAX);
        let ob = outbox(&sock, 0);
        assert_eq!(ob.try_push_direct(Bytes::from_static(b"a")), Ok(Pushed::Schedule));
        // Already scheduled: later pushes only queue.
        assert_eq!(ob.try_push_direct(Bytes::from_static(b"b")), Ok(Pushed::Queued));
        flushers.schedule(&mut vec![ob.clone()]);
        let f = flushers.shards()[0].clone();
        let runner = tokio::spawn(async move { f.run().await });
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while sock.taken.lock().len() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(&*sock.taken.lock(), b"ab");
        assert_eq!(ob.queued(), (0, 0));
        // One write carried both frames.
        let stats = flushers.stats();
        assert_eq!((stats.writes, stats.frames, stats.handoffs), (1, 2, 0));
        // Idle again: the next push schedules again.
        assert_eq!(ob.try_push_direct(Bytes::from_static(b"c")), Ok(Pushed::Schedule));
        runner.abort();
    }

    #[tokio::test]
    async fn a_socket_that_would_block_hands_the_rest_to_the_task_mid_frame() {
        let sock = socket(5);
        let ob = outbox(&sock, 0);
        for f in ["abc", "defg", "hij"] {
            ob.try_push_direct(Bytes::from(f)).unwrap();
        }
        let done = ob.flush_direct();
        assert_eq!(&*sock.taken.lock(), b"abcde");
        assert_eq!((done.frames, done.handed_off), (1, true));
        // The task now owns the rest, starting inside the second frame.
        let mut batch = VecDeque::new();
        assert_eq!(ob.drain(&mut batch).await, Drained::Frames);
        assert_eq!(batch, VecDeque::from([Bytes::from("fg"), Bytes::from("hij")]));
        assert_eq!(ob.queued(), (0, 0));
        // While the task is the writer, fan-out pushes only queue.
        assert_eq!(ob.try_push_direct(Bytes::from_static(b"k")), Ok(Pushed::Queued));
        batch.clear();
        assert_eq!(ob.drain(&mut batch).await, Drained::Frames);
        // The task found the queue empty: the outbox is idle again.
        let idle = async {
            batch.clear();
            ob.drain(&mut batch).await
        };
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), idle)
                .await
                .is_err()
        );
        assert_eq!(ob.try_push_direct(Bytes::from_static(b"l")), Ok(Pushed::Schedule));
    }

    #[tokio::test]
    async fn the_task_does_not_drain_while_a_flusher_owns_the_queue() {
        let sock = socket(usize::MAX);
        let ob = outbox(&sock, 0);
        assert_eq!(ob.try_push_direct(Bytes::from_static(b"x")), Ok(Pushed::Schedule));
        // A reply pushed meanwhile goes behind it, for the flusher to write.
        ob.try_push(Bytes::from_static(b"reply")).unwrap();
        let mut batch = VecDeque::new();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), ob.drain(&mut batch)).await;
        assert!(
            waited.is_err(),
            "the task must not write while the flusher owns the queue"
        );
        ob.flush_direct();
        assert_eq!(&*sock.taken.lock(), b"xreply");
    }

    #[tokio::test]
    async fn closing_claims_the_queue_from_the_flusher() {
        let sock = socket(usize::MAX);
        let ob = outbox(&sock, 0);
        ob.try_push_direct(Bytes::from_static(b"x")).unwrap();
        let mut batch = VecDeque::new();
        ob.close();
        assert!(ob.try_drain(&mut batch));
        ob.flush_direct();
        assert!(
            sock.taken.lock().is_empty(),
            "a claimed queue is not written by the flusher"
        );
        assert_eq!(batch, VecDeque::from([Bytes::from_static(b"x")]));
    }

    #[tokio::test]
    async fn an_outbox_closed_while_scheduled_is_not_written_and_wakes_its_task() {
        let sock = socket(usize::MAX);
        let ob = outbox(&sock, 0);
        assert_eq!(ob.try_push_direct(Bytes::from_static(b"x")), Ok(Pushed::Schedule));
        // Closing lets go of the sink while the outbox waits in a flusher's list.
        ob.close();
        let done = ob.flush_direct();
        assert!(done.handed_off);
        assert_eq!((done.writes, done.frames), (0, 0));
        assert!(sock.taken.lock().is_empty());
        // The task (woken) finds the frame for its closing sequence.
        let mut batch = VecDeque::new();
        assert!(ob.try_drain(&mut batch));
        assert_eq!(batch, VecDeque::from([Bytes::from_static(b"x")]));
    }

    #[test]
    fn outboxes_go_to_their_shards() {
        let flushers: Flushers<Bytes> = Flushers::new(3);
        assert_eq!(flushers.shard_for(7), 1);
        let sock = socket(usize::MAX);
        let mut obs: Vec<_> = (0..6).map(|i| outbox(&sock, flushers.shard_for(i))).collect();
        flushers.schedule(&mut obs);
        assert!(obs.is_empty(), "moved, not copied");
        for (i, shard) in flushers.shards().iter().enumerate() {
            let dirty = shard.dirty.lock();
            assert_eq!(dirty.len(), 2);
            assert!(dirty.iter().all(|o| o.shard() as usize == i));
        }
    }
}
