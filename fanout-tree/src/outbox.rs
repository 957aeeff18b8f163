//! A connection's outbound queue, bounded by bytes and by frame count.
//!
//! Owns the frames that are waiting for one connection's writer. Does not own
//! the socket: the writer task drains the queue and writes.
//!
//! Invariants:
//! - Producers never wait. [`Outbox::try_push`] either queues the frame or
//!   reports [`PushError::Full`]; a full outbox marks itself *overflowed*,
//!   refuses everything after that and wakes the writer, which closes the
//!   connection as a slow consumer.
//! - One bound for everything a connection is owed: live pushes, replies,
//!   catch-up, history pages and the batch its writer is writing right now
//!   (in flight until the writer comes back for more) all count against
//!   [`OutboxLimits`]. Memory per outbox therefore never exceeds its caps plus
//!   one frame, whatever a client asks for and however slowly it reads.
//! - Frames come out in the order they went in, with one exception that the
//!   caller asks for: while the outbox is *held*, pushes go to a side queue, and
//!   [`Outbox::release`] puts the caller's own frames (a reply and its catch-up
//!   messages) in front of them. That is how a `subscribe` reply is guaranteed to
//!   precede the live messages of the rooms it just joined.
//!
//! - One writer at a time, and it is told apart in the state: nobody (idle),
//!   a [`crate::Flusher`] (which writes through the outbox's [`DirectWrite`]
//!   sink without waiting, under the outbox lock), or the connection's own
//!   task (which waits for a socket that is not writable). A fan-out push to
//!   an idle outbox with a sink returns [`Pushed::Schedule`]: the caller hands
//!   the outbox to a flusher, and no task is woken per delivery. When the
//!   socket would block, the flusher hands the outbox to the task.
//!
//! Concurrency: one short `parking_lot` mutex per outbox, taken for a push,
//! a drain or a direct write (non-blocking), never across `.await`. The task
//! is woken through a `tokio::sync::Notify` only when it becomes the writer,
//! so a burst of pushes costs one wake-up.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Anything queued in an outbox reports its size, so the cap is in bytes.
pub trait Weighted {
    /// Bytes this item accounts for (payload; the queue slot is not counted).
    fn weight(&self) -> usize;
}

impl Weighted for bytes::Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// An item that is bytes on the wire, so a flusher can write it directly.
pub trait Wire: Weighted {
    /// The bytes still to be written.
    fn wire(&self) -> &[u8];
    /// Drops the first `n` bytes (a write ended inside the item).
    fn advance(&mut self, n: usize);
}

impl Wire for bytes::Bytes {
    fn wire(&self) -> &[u8] {
        self
    }

    fn advance(&mut self, n: usize) {
        bytes::Buf::advance(self, n);
    }
}

/// A socket a flusher writes to without waiting (implemented by the owner
/// of the socket).
pub trait DirectWrite: Send + Sync {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// What a fan-out push asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; a writer is already on it.
    Queued,
    /// Queued on an idle outbox with a sink: hand it to a flusher.
    Schedule,
}

/// Who writes the queue out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Idle,
    Flusher,
    Task,
}

/// What one [`Outbox::flush_direct`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Write calls that took bytes.
    pub writes: u64,
    /// Items written whole.
    pub frames: u64,
    /// The socket took no more: the connection's task became the writer.
    pub handed_off: bool,
}

/// Most items handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// Caps of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Most bytes queued at once, in-flight batch included.
    pub max_bytes: usize,
    /// Most frames queued at once, in-flight batch included.
    pub max_frames: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_frames: 8192,
        }
    }
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// Over the caps: the consumer is too slow. The outbox is now overflowed.
    Full,
    /// The outbox was closed or had overflowed before.
    Closed,
}

/// What the writer learns from one [`Outbox::drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Frames were moved into the caller's buffer.
    Frames,
    /// The outbox overflowed: close the connection as a slow consumer.
    Overflowed,
    /// The outbox was closed by its owner.
    Closed,
}

struct State<T> {
    queue: VecDeque<T>,
    /// Bytes in `queue` and `held`.
    bytes: usize,
    /// Bytes and frames the task took with its last [`Outbox::drain`] and is
    /// still writing: they count against the caps until it drains again.
    in_flight_bytes: usize,
    in_flight_frames: usize,
    held: Option<VecDeque<T>>,
    overflowed: bool,
    closed: bool,
    writer: Writer,
    /// Present for sockets a flusher may write to directly; dropped on close.
    sink: Option<Arc<dyn DirectWrite>>,
    /// Highest byte count ever queued: lets tests assert on memory bounds.
    peak_bytes: usize,
}

impl<T: Wire> State<T> {
    /// Drops `written` bytes from the front of the queue; returns how many
    /// items left it whole.
    fn consume(&mut self, mut written: usize) -> u64 {
        let mut whole = 0;
        while written > 0 {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            let len = front.wire().len();
            if written >= len {
                let weight = front.weight();
                self.queue.pop_front();
                self.bytes -= weight;
                written -= len;
                whole += 1;
            } else {
                let before = front.weight();
                front.advance(written);
                self.bytes -= before - front.weight();
                written = 0;
            }
        }
        whole
    }
}

impl<T> State<T> {
    /// Frames counted against the caps (queued, held and in flight).
    fn frames(&self) -> usize {
        self.queue.len() + self.held.as_ref().map_or(0, VecDeque::len) + self.in_flight_frames
    }

    /// Bytes counted against the caps (queued, held and in flight).
    fn total_bytes(&self) -> usize {
        self.bytes + self.in_flight_bytes
    }
}

/// A byte-bounded multi-producer, single-consumer frame queue.
pub struct Outbox<T> {
    state: Mutex<State<T>>,
    ready: Notify,
    limits: OutboxLimits,
    /// Which flusher writes this outbox (see [`crate::Flushers`]).
    shard: u32,
}

impl<T: Weighted> Outbox<T> {
    /// An empty outbox that only its task writes; allocates nothing until
    /// the first push.
    pub fn new(limits: OutboxLimits) -> Self {
        Self::with_sink(limits, None, 0)
    }

    /// An outbox whose fan-out pushes a flusher (`shard`) may write to `sink`.
    pub fn with_sink(limits: OutboxLimits, sink: Option<Arc<dyn DirectWrite>>, shard: u32) -> Self {
        Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                in_flight_bytes: 0,
                in_flight_frames: 0,
                held: None,
                overflowed: false,
                closed: false,
                writer: Writer::Idle,
                sink,
                peak_bytes: 0,
            }),
            ready: Notify::new(),
            limits,
            shard,
        }
    }

    /// The flusher this outbox belongs to.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Queues `item` without waiting and wakes the connection's task to
    /// write it (replies and other frames of the connection itself). On
    /// [`PushError::Full`] the outbox is overflowed and the writer is woken to
    /// close the connection.
    pub fn try_push(&self, item: T) -> Result<(), PushError> {
        self.push(item, false).map(|_| ())
    }

    /// Queues a fan-out `item` without waiting. An idle outbox with a sink
    /// answers [`Pushed::Schedule`]: give it to its flusher (no task is woken).
    pub fn try_push_direct(&self, item: T) -> Result<Pushed, PushError> {
        self.push(item, true)
    }

    fn push(&self, item: T, direct: bool) -> Result<Pushed, PushError> {
        let mut st = self.state.lock();
        if st.overflowed || st.closed {
            return Err(PushError::Closed);
        }
        let weight = item.weight();
        if st.total_bytes() + weight > self.limits.max_bytes || st.frames() >= self.limits.max_frames {
            st.overflowed = true;
            drop(st);
            self.ready.notify_one();
            return Err(PushError::Full);
        }
        st.bytes += weight;
        st.peak_bytes = st.peak_bytes.max(st.total_bytes());
        if let Some(held) = st.held.as_mut() {
            held.push_back(item);
            return Ok(Pushed::Queued);
        }
        st.queue.push_back(item);
        if st.writer != Writer::Idle {
            return Ok(Pushed::Queued);
        }
        if direct && st.sink.is_some() {
            st.writer = Writer::Flusher;
            return Ok(Pushed::Schedule);
        }
        st.writer = Writer::Task;
        drop(st);
        self.ready.notify_one();
        Ok(Pushed::Queued)
    }

    /// From now until [`Outbox::release`], pushes are set aside.
    pub fn hold(&self) {
        let mut st = self.state.lock();
        if st.held.is_none() {
            st.held = Some(VecDeque::new());
        }
    }

    /// Queues `reply`, then `catchup`, then everything pushed since
    /// [`Outbox::hold`], and ends the hold.
    ///
    /// Everything counts against the caps like any push: the caller sizes the
    /// catch-up to [`Outbox::room_left`] first. If the caps are passed anyway
    /// (live pushes raced in), the frames are still queued and the outbox is
    /// overflowed, so the writer closes the connection as a slow consumer;
    /// the answer is then [`PushError::Full`].
    pub fn release(&self, reply: Option<T>, catchup: impl IntoIterator<Item = T>) -> Result<(), PushError> {
        let mut st = self.state.lock();
        let held = st.held.take().unwrap_or_default();
        if st.overflowed || st.closed {
            return Err(PushError::Closed);
        }
        for item in reply.into_iter().chain(catchup) {
            st.bytes += item.weight();
            st.queue.push_back(item);
        }
        // The held frames were counted when they were pushed.
        st.queue.extend(held);
        st.peak_bytes = st.peak_bytes.max(st.total_bytes());
        if st.total_bytes() > self.limits.max_bytes || st.frames() > self.limits.max_frames {
            st.overflowed = true;
            drop(st);
            self.ready.notify_one();
            return Err(PushError::Full);
        }
        let wake = st.writer == Writer::Idle && !st.queue.is_empty();
        if wake {
            st.writer = Writer::Task;
        }
        drop(st);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves every queued frame into `into` (which should be empty), waiting
    /// until there is at least one and no flusher is writing, or until the
    /// outbox is closed or overflowed. Makes the task the writer until it
    /// finds the queue empty again.
    pub async fn drain(&self, into: &mut VecDeque<T>) -> Drained {
        loop {
            {
                let mut st = self.state.lock();
                if st.overflowed {
                    return Drained::Overflowed;
                }
                // The caller's buffer is empty: the batch of the previous
                // drain is written.
                debug_assert!(into.is_empty(), "drain into an empty buffer");
                st.in_flight_bytes = 0;
                st.in_flight_frames = 0;
                if st.writer != Writer::Flusher && !st.queue.is_empty() {
                    st.writer = Writer::Task;
                    std::mem::swap(&mut st.queue, into);
                    let moved = into.iter().map(Weighted::weight).sum::<usize>();
                    st.bytes -= moved;
                    st.in_flight_bytes = moved;
                    st.in_flight_frames = into.len();
                    // Keep memory of a quiet connection small after a burst.
                    if st.queue.capacity() > 256 {
                        st.queue = VecDeque::new();
                    }
                    return Drained::Frames;
                }
                if st.writer == Writer::Task {
                    // Everything handed out is written: the next push decides.
                    st.writer = Writer::Idle;
                }
                if st.closed {
                    return Drained::Closed;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Moves whatever is queued into `into` without waiting, and makes the
    /// task the writer (a flusher will not touch the queue after this);
    /// false if nothing was queued. Used for the last frames before a close.
    pub fn try_drain(&self, into: &mut VecDeque<T>) -> bool {
        let mut st = self.state.lock();
        st.writer = Writer::Task;
        if st.queue.is_empty() {
            return false;
        }
        let moved: usize = st.queue.iter().map(Weighted::weight).sum();
        st.in_flight_frames += st.queue.len();
        into.extend(st.queue.drain(..));
        st.bytes -= moved;
        st.in_flight_bytes += moved;
        true
    }

    /// Waits until the outbox overflows. The writer races this against a
    /// socket write that does not finish, so a client that stops reading is
    /// noticed even while a flush is pending.
    pub async fn overflowed(&self) {
        loop {
            if self.is_overflowed() {
                return;
            }
            self.ready.notified().await;
        }
    }

    /// Refuses further pushes, lets go of the sink and wakes the writer.
    pub fn close(&self) {
        let sink = {
            let mut st = self.state.lock();
            st.closed = true;
            st.sink.take()
        };
        drop(sink);
        self.ready.notify_one();
    }

    /// Marks the outbox overflowed: its writer closes the connection as a
    /// slow consumer (the client resumes with `since`).
    pub fn abort(&self) {
        self.state.lock().overflowed = true;
        self.ready.notify_one();
    }

    /// Writes the queue to the sink without waiting, if a flusher is the
    /// writer (called by the flusher). Frames leave the queue once written;
    /// a write that ends inside a frame advances it. When the socket takes
    /// no more, the task becomes the writer and is woken (it waits for the
    /// socket); when the queue is empty, nobody is.
    pub fn flush_direct(&self) -> Flushed
    where
        T: Wire,
    {
        let mut done = Flushed::default();
        let mut st = self.state.lock();
        if st.writer != Writer::Flusher {
            return done;
        }
        let Some(sink) = st.sink.clone() else {
            st.writer = Writer::Task;
            drop(st);
            self.ready.notify_one();
            done.handed_off = true;
            return done;
        };
        loop {
            if st.queue.is_empty() {
                st.writer = Writer::Idle;
                if st.queue.capacity() > 0 && st.bytes == 0 {
                    st.queue = VecDeque::new();
                }
                return done;
            }
            let result = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut n = 0;
                for (slot, item) in slices.iter_mut().zip(st.queue.iter()) {
                    *slot = IoSlice::new(item.wire());
                    n += 1;
                }
                sink.try_write_vectored(&slices[..n])
            };
            match result {
                Ok(written) if written > 0 => {
                    done.writes += 1;
                    done.frames += st.consume(written);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Would block, or failed: the task waits for the socket or
                // meets the error itself.
                _ => {
                    st.writer = Writer::Task;
                    drop(st);
                    self.ready.notify_one();
                    done.handed_off = true;
                    return done;
                }
            }
        }
    }

    /// Whether the outbox overflowed (the consumer was too slow).
    pub fn is_overflowed(&self) -> bool {
        self.state.lock().overflowed
    }

    /// Frames and bytes queued right now (held frames included, the batch
    /// in flight not).
    pub fn queued(&self) -> (usize, usize) {
        let st = self.state.lock();
        let held = st.held.as_ref().map_or(0, VecDeque::len);
        (st.queue.len() + held, st.bytes)
    }

    /// What can still be queued before the caps are reached: (frames, bytes).
    /// Zero for an overflowed or closed outbox.
    pub fn room_left(&self) -> (usize, usize) {
        let st = self.state.lock();
        if st.overflowed || st.closed {
            return (0, 0);
        }
        (
            self.limits.max_frames.saturating_sub(st.frames()),
            self.limits.max_bytes.saturating_sub(st.total_bytes()),
        )
    }

    /// Highest byte count ever queued.
    pub fn peak_bytes(&self) -> usize {
        self.state.lock().peak_bytes
    }

    /// The caps this outbox was built with.
    pub fn limits(&self) -> OutboxLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[tokio::test]
    async fn frames_come_out_in_order() {
        let ob = Outbox::new(OutboxLimits::default());
        for i in 0..10u8 {
            ob.try_push(Bytes::from(vec![i])).unwrap();
        }
        let mut out = VecDeque::new();
        assert_eq!(ob.drain(&mut out).await, Drained::Frames);
        let got: Vec<u8> = out.iter().map(|b| b[0]).collect();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert_eq!(ob.queued(), (0, 0));
    }

    #[test]
    fn byte_cap_overflows_and_refuses_everything_after() {
        let ob = Outbox::new(OutboxLimits {
            max_bytes: 1000,
            max_frames: 100,
        });
        for _ in 0..10 {
            ob.try_push(frame(100)).unwrap();
        }
        assert_eq!(ob.try_push(frame(1)), Err(PushError::Full));
        assert!(ob.is_overflowed());
        assert_eq!(ob.try_push(frame(1)), Err(PushError::Closed));
        assert_eq!(ob.queued(), (10, 1000));
        assert_eq!(ob.peak_bytes(), 1000);
    }

    #[test]
    fn frame_cap_overflows() {
        let ob = Outbox::new(OutboxLimits {
            max_bytes: 1 << 20,
            max_frames: 3,
        });
        for _ in 0..3 {
            ob.try_push(frame(1)).unwrap();
        }
        assert_eq!(ob.try_push(frame(1)), Err(PushError::Full));
    }

    #[tokio::test]
    async fn held_pushes_come_after_released_front() {
        let ob = Outbox::new(OutboxLimits::default());
        ob.try_push(Bytes::from_static(b"before")).unwrap();
        ob.hold();
        ob.try_push(Bytes::from_static(b"live")).unwrap();
        ob.release(Some(Bytes::from_static(b"reply")), [Bytes::from_static(b"catchup")])
            .unwrap();
        let mut out = VecDeque::new();
        ob.drain(&mut out).await;
        let got: Vec<&[u8]> = out.iter().map(|b| b.as_ref()).collect();
        assert_eq!(got, vec![&b"before"[..], b"reply", b"catchup", b"live"]);
    }

    #[tokio::test]
    async fn catchup_and_replies_count_against_the_one_bound() {
        let ob = Outbox::new(OutboxLimits {
            max_bytes: 1000,
            max_frames: 100,
        });
        ob.hold();
        ob.try_push(frame(100)).unwrap();
        assert_eq!(ob.room_left(), (99, 900));
        let catchup = (0..8).map(|_| frame(100));
        ob.release(Some(frame(10)), catchup).unwrap();
        assert_eq!(ob.room_left(), (90, 90));
        // Past the bound: overflowed, and the writer closes the connection.
        assert_eq!(ob.try_push(frame(91)), Err(PushError::Full));
        let mut out = VecDeque::new();
        assert_eq!(ob.drain(&mut out).await, Drained::Overflowed);
    }

    #[tokio::test]
    async fn a_catchup_released_past_the_bound_overflows() {
        let ob = Outbox::new(OutboxLimits {
            max_bytes: 100,
            max_frames: 10,
        });
        ob.hold();
        let catchup = (0..50).map(|_| frame(50));
        assert_eq!(ob.release(Some(frame(10)), catchup), Err(PushError::Full));
        assert!(ob.is_overflowed());
        assert_eq!(ob.room_left(), (0, 0));
    }

    #[tokio::test]
    async fn the_batch_in_flight_counts_until_the_writer_drains_again() {
        let ob = Outbox::new(OutboxLimits {
            max_bytes: 300,
            max_frames: 100,
        });
        for _ in 0..3 {
            ob.try_push(frame(100)).unwrap();
        }
        let mut out = VecDeque::new();
        assert_eq!(ob.drain(&mut out).await, Drained::Frames);
        // The writer is stuck writing these 300 bytes (the client does not
        // read): nothing more fits.
        assert_eq!(ob.queued(), (0, 0));
        assert_eq!(ob.room_left(), (97, 0));
        assert_eq!(ob.try_push(frame(1)), Err(PushError::Full));
    }

    #[tokio::test]
    async fn a_written_batch_frees_its_room() {
        let ob = Outbox::new(OutboxLimits {
            max_bytes: 300,
            max_frames: 100,
        });
        for _ in 0..3 {
            ob.try_push(frame(100)).unwrap();
        }
        let mut out = VecDeque::new();
        assert_eq!(ob.drain(&mut out).await, Drained::Frames);
        assert_eq!(ob.room_left(), (97, 0));
        // Written: the writer comes back for more (and waits, nothing is queued).
        out.clear();
        let again = tokio::time::timeout(std::time::Duration::from_millis(20), ob.drain(&mut out)).await;
        assert!(again.is_err());
        assert_eq!(ob.room_left(), (100, 300));
        for _ in 0..3 {
            ob.try_push(frame(100)).unwrap();
        }
    }

    #[tokio::test]
    async fn overflow_wakes_the_writer() {
        let ob = std::sync::Arc::new(Outbox::new(OutboxLimits {
            max_bytes: 10,
            max_frames: 10,
        }));
        let w = {
            let ob = ob.clone();
            tokio::spawn(async move {
                let mut out = VecDeque::new();
                loop {
                    match ob.drain(&mut out).await {
                        Drained::Frames => out.clear(),
                        other => return other,
                    }
                }
            })
        };
        tokio::task::yield_now().await;
        let _ = ob.try_push(frame(11));
        assert_eq!(w.await.unwrap(), Drained::Overflowed);
    }

    #[tokio::test]
    async fn close_ends_an_empty_drain() {
        let ob: Outbox<Bytes> = Outbox::new(OutboxLimits::default());
        ob.close();
        let mut out = VecDeque::new();
        assert_eq!(ob.drain(&mut out).await, Drained::Closed);
        assert_eq!(ob.try_push(frame(1)), Err(PushError::Closed));
    }
}
