//! The linger pool: delayed unsubscribes of rooms whose last local member
//! left, so a quick leave-and-rejoin (a reconnect) does not churn the NATS
//! subscription.
//!
//! Owns the deadlines only; what "unsubscribe" means (forget the room if it
//! is still empty, drop its link) is the callback given to [`LingerPool::run`].
//!
//! Bounds: one task for the whole node (not one sleeping task per room);
//! requests reach it through a bounded channel and [`Linger::schedule`] never
//! waits (`try_send`). The pending deadlines hold at most one entry per room
//! (a second leave of the same room moves its deadline), so they are bounded
//! by the rooms of the node.
//!
//! Concurrency: the pool decides nothing about membership. The callback runs
//! at the deadline and must check that the room is still empty (a rejoin
//! within the linger keeps the room).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::RoomId;

/// Requests queued for the pool task at most; beyond it the caller acts at
/// once. Allocated lazily by the channel, so a large bound costs nothing idle.
pub(super) const LINGER_QUEUE: usize = 16_384;

/// The sending side: cheap, never waits.
pub(super) struct Linger {
    tx: mpsc::Sender<RoomId>,
}

/// The pool task's side; run it once with [`LingerPool::run`].
pub(super) struct LingerPool {
    rx: mpsc::Receiver<RoomId>,
    linger: Duration,
}

/// A bounded linger pool: `capacity` requests in flight, each room
/// unsubscribed `linger` after its last scheduling.
pub(super) fn linger_pool(linger: Duration, capacity: usize) -> (Linger, LingerPool) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (Linger { tx }, LingerPool { rx, linger })
}

impl Linger {
    /// Schedules `room` for an unsubscribe after the linger. False when the
    /// pool is full (or stopped): the caller decides what to do now.
    pub(super) fn schedule(&self, room: RoomId) -> bool {
        self.tx.try_send(room).is_ok()
    }
}

impl LingerPool {
    /// Calls `expire(room)` once each scheduled room's linger has passed
    /// since it was last scheduled, until `stop` is cancelled or every
    /// [`Linger`] is dropped. Rooms still lingering at `stop` are left as they
    /// are (the node is shutting down and drops every subscription).
    pub(super) async fn run(mut self, stop: CancellationToken, mut expire: impl FnMut(RoomId)) {
        // Deadline heap plus the latest deadline per room: a heap entry whose
        // deadline is not the room's latest is stale and skipped.
        let mut heap: BinaryHeap<Reverse<(Instant, RoomId)>> = BinaryHeap::new();
        let mut due: HashMap<RoomId, Instant> = HashMap::new();
        loop {
            let next = heap.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = sleep_until(next), if next.is_some() => {
                    let now = Instant::now();
                    while let Some(Reverse((at, _))) = heap.peek() {
                        if *at > now {
                            break;
                        }
                        let Some(Reverse((at, room))) = heap.pop() else { break };
                        if due.get(&room) == Some(&at) {
                            due.remove(&room);
                            expire(room);
                        }
                    }
                    if heap.capacity() > 1024 && heap.len() < heap.capacity() / 4 {
                        heap.shrink_to_fit();
                        due.shrink_to_fit();
                    }
                }
                room = self.rx.recv() => {
                    let Some(room) = room else { return };
                    let at = Instant::now() + self.linger;
                    due.insert(room.clone(), at);
                    heap.push(Reverse((at, room)));
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap()
    }

    /// A stand-in for the room index: the rooms with members, and the rooms
    /// unsubscribed (the callback forgets a room only if it is empty, as
    /// `NatsBus` does).
    #[derive(Default, Clone)]
    struct Fake {
        members: Arc<Mutex<HashSet<RoomId>>>,
        unsubscribed: Arc<Mutex<Vec<RoomId>>>,
    }

    fn start(linger: Duration, capacity: usize) -> (Linger, Fake, CancellationToken) {
        let (tx, pool) = linger_pool(linger, capacity);
        let fake = Fake::default();
        let stop = CancellationToken::new();
        let f = fake.clone();
        tokio::spawn(pool.run(stop.clone(), move |room| {
            if !f.members.lock().contains(&room) {
                f.unsubscribed.lock().push(room);
            }
        }));
        (tx, fake, stop)
    }

    async fn advance(d: Duration) {
        tokio::time::sleep(d).await;
        // Let the pool task see the new time.
        tokio::task::yield_now().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_room_is_unsubscribed_after_the_linger_not_before() {
        let (linger, fake, stop) = start(Duration::from_secs(5), 8);
        assert!(linger.schedule(room("a")));
        advance(Duration::from_millis(4_900)).await;
        assert!(fake.unsubscribed.lock().is_empty());
        advance(Duration::from_millis(200)).await;
        assert_eq!(*fake.unsubscribed.lock(), vec![room("a")]);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejoin_within_the_linger_keeps_the_room() {
        let (linger, fake, stop) = start(Duration::from_secs(5), 8);
        assert!(linger.schedule(room("a")));
        assert!(linger.schedule(room("b")));
        advance(Duration::from_secs(2)).await;
        // A member comes back to "a" before the linger ends.
        fake.members.lock().insert(room("a"));
        advance(Duration::from_secs(4)).await;
        assert_eq!(*fake.unsubscribed.lock(), vec![room("b")]);
        // It leaves again: a new full linger from now, not from the first leave.
        fake.members.lock().remove(&room("a"));
        assert!(linger.schedule(room("a")));
        advance(Duration::from_secs(4)).await;
        assert_eq!(fake.unsubscribed.lock().len(), 1);
        advance(Duration::from_secs(2)).await;
        assert_eq!(*fake.unsubscribed.lock(), vec![room("b"), room("a")]);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_twice_moves_the_deadline_and_unsubscribes_once() {
        let (linger, fake, stop) = start(Duration::from_secs(5), 8);
        assert!(linger.schedule(room("a")));
        advance(Duration::from_secs(3)).await;
        assert!(linger.schedule(room("a")));
        advance(Duration::from_secs(3)).await;
        assert!(fake.unsubscribed.lock().is_empty(), "the first deadline is stale");
        advance(Duration::from_secs(3)).await;
        assert_eq!(*fake.unsubscribed.lock(), vec![room("a")]);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_is_bounded_and_refuses_without_waiting() {
        // No task drains this pool: the channel's bound is all there is.
        let (linger, _pool) = linger_pool(Duration::from_secs(5), 2);
        assert!(linger.schedule(room("a")));
        assert!(linger.schedule(room("b")));
        assert!(!linger.schedule(room("c")), "a full pool refuses at once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_task_ends_at_stop() {
        let (tx, pool) = linger_pool(Duration::from_secs(5), 8);
        let stop = CancellationToken::new();
        let task = tokio::spawn(pool.run(stop.clone(), |_| {}));
        assert!(tx.schedule(room("a")));
        tokio::task::yield_now().await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }
}
