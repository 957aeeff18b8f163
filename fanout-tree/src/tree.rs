//! The node tier of the tiered fan-out: a big room's members in shards of
//! bounded size, each shard a FIFO of messages that any worker thread runs.
//!
//! Owns the shards of one member set ([`Tree`]) and the task that works
//! through a shard's queue ([`Shard`]). Does not own membership rules or
//! locking of the room: [`crate::MemberSet`] decides when a room is split
//! (above [`TreeConfig::limits`]'s threshold) and calls in under the room's
//! lock; sizing comes from [`crate::plan::Limits`].
//!
//! Why: inline, one message to 10,000 members is ~30 ms of one core, queued
//! under the room's lock. Split, the room's lock only appends the (already
//! encoded, shared) frame to each shard's queue; every shard then queues it
//! into its members' outboxes and writes their sockets on whichever worker
//! thread picks the shard up, all shards in parallel.
//!
//! Invariants:
//! - Per-member order: a member is in exactly one shard and never moves while
//!   the room is split; a shard is run by at most one task at a time
//!   (`running`), which takes messages in the order they were queued. So two
//!   messages of the room, even when different threads run different shards,
//!   reach each member in order.
//! - Exactly the messages after the join: every message carries the room's
//!   broadcast sequence number; a member records the number at its join and
//!   gets only later ones (a message queued before the join, still waiting in
//!   the shard, is not for it: its catch-up covered it).
//! - A leaver gets nothing more: it leaves its shard at once, under the
//!   shard's member lock, which the running task holds for a whole batch.
//! - Bounded: a shard holds at most [`crate::plan::Limits::shard_capacity`]
//!   members and at most [`TreeConfig::max_queue`] waiting messages; a shard
//!   that falls further behind closes its members as slow consumers (they
//!   resume with `since`) and drops its queue.
//!
//! Concurrency: per shard one mutex for its members (taken by joins and
//! leaves under the room's lock, and by the task for one batch) and one for
//! its queue (taken briefly by the broadcast and the task); outbox locks
//! are taken under the member lock, never the other way round. Without a
//! tokio runtime (unit tests) the broadcast runs each shard inline.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::outbox::{Outbox, PushError, Pushed, Weighted, Wire};
use crate::plan::Limits;

/// Settings of the node tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeConfig {
    /// When a room is split and how big a shard gets.
    pub limits: Limits,
    /// Most messages waiting in one shard; past it the shard's members are
    /// closed as slow consumers. The outbox frame cap is a good value: a
    /// member that far behind would overflow its outbox anyway.
    pub max_queue: usize,
}

impl Default for TreeConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_queue: 8192,
        }
    }
}

/// What the node tier has done since the start (for metrics).
#[derive(Debug, Default)]
pub struct TreeStats {
    /// Shard runs: a task took a batch of messages of one shard.
    pub batches: AtomicU64,
    /// Messages queued into member outboxes by shards.
    pub deliveries: AtomicU64,
    /// Shards that fell more than `max_queue` messages behind.
    pub overruns: AtomicU64,
    /// Shards that exist now (every split room's, empty ones included).
    pub shards: AtomicU64,
}

/// The node tier of a whole node: its settings and its counters, shared by
/// every room's [`crate::MemberSet`].
#[derive(Debug, Default)]
pub struct TreeTier {
    pub config: TreeConfig,
    pub stats: Arc<TreeStats>,
}

impl TreeTier {
    pub fn new(config: TreeConfig) -> Self {
        Self {
            config,
            stats: Arc::default(),
        }
    }
}

/// One member of a shard.
struct Slot<K, T> {
    key: K,
    outbox: Arc<Outbox<T>>,
    /// The room's broadcast number at the join: later ones are for it.
    from: u64,
}

struct Queue<T> {
    items: VecDeque<(u64, T)>,
    /// A task is working through this shard (it owns the next pop).
    running: bool,
}

/// One shard: members and the messages waiting for them.
pub struct Shard<K, T> {
    members: Mutex<Vec<Slot<K, T>>>,
    queue: Mutex<Queue<T>>,
}

impl<K, T> Shard<K, T> {
    fn new() -> Self {
        Self {
            members: Mutex::new(Vec::new()),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                running: false,
            }),
        }
    }

    /// Nothing waiting and no task on it.
    fn idle(&self) -> bool {
        let q = self.queue.lock();
        !q.running && q.items.is_empty()
    }
}

impl<K: Send + 'static, T: Clone + Wire + Send + Sync + 'static> Shard<K, T> {
    /// Queues message `seq`; true when the caller must start a task for the shard.
    fn enqueue(&self, seq: u64, item: T, max_queue: usize, stats: &TreeStats) -> bool {
        let mut q = self.queue.lock();
        if q.items.len() >= max_queue {
            // Too far behind: its members resume with `since`.
            q.items.clear();
            drop(q);
            stats.overruns.fetch_add(1, Ordering::Relaxed);
            for slot in self.members.lock().iter() {
                slot.outbox.abort();
            }
            return false;
        }
        q.items.push_back((seq, item));
        !std::mem::replace(&mut q.running, true)
    }

    /// Runs one batch (everything queued now); false when the queue was empty
    /// (the shard is idle again and this task must stop).
    fn run_batch(&self, batch: &mut Vec<(u64, T)>, schedule: &mut Vec<Arc<Outbox<T>>>, stats: &TreeStats) -> bool {
        {
            let mut q = self.queue.lock();
            if q.items.is_empty() {
                q.running = false;
                return false;
            }
            batch.extend(q.items.drain(..));
        }
        let mut delivered = 0u64;
        {
            let members = self.members.lock();
            for slot in members.iter() {
                for (seq, item) in batch.iter() {
                    if *seq <= slot.from {
                        continue;
                    }
                    match slot.outbox.try_push_direct(item.clone()) {
                        Ok(Pushed::Queued) => delivered += 1,
                        Ok(Pushed::Schedule) => {
                            delivered += 1;
                            schedule.push(slot.outbox.clone());
                        }
                        // Overflowed (its writer closes it) or closed.
                        Err(PushError::Full | PushError::Closed) => break,
                    }
                }
            }
        }
        batch.clear();
        // This task is the flusher of the outboxes it made busy.
        for outbox in schedule.drain(..) {
            outbox.flush_direct();
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.deliveries.fetch_add(delivered, Ordering::Relaxed);
        true
    }

    /// Works through the queue until it is empty.
    async fn run(self: Arc<Self>, stats: Arc<TreeStats>) {
        let (mut batch, mut schedule) = (Vec::new(), Vec::new());
        while self.run_batch(&mut batch, &mut schedule, &stats) {
            // Let other rooms' shards and the readers in between batches.
            tokio::task::yield_now().await;
        }
    }

    /// The same without a runtime: on the caller's thread.
    fn run_inline(&self, stats: &TreeStats) {
        let (mut batch, mut schedule) = (Vec::new(), Vec::new());
        while self.run_batch(&mut batch, &mut schedule, stats) {}
    }
}

/// Where a member of a split room is: shard and position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct At {
    pub shard: u32,
    pub pos: u32,
}

/// The shards of one split member set.
pub(crate) struct Tree<K, T> {
    shards: Vec<Arc<Shard<K, T>>>,
    /// Members per shard (the room-side count, changed under the room's lock).
    sizes: Vec<usize>,
    /// Shards with room for a joiner, each once; the last one is filled first.
    open: Vec<u32>,
    config: TreeConfig,
    stats: Arc<TreeStats>,
}

impl<K: Copy + Send + 'static, T: Clone + Wire + Weighted + Send + Sync + 'static> Tree<K, T> {
    /// Splits `members`, which have had every message up to `seq`, into
    /// shards of at most the capacity, in order. Returns where each went.
    pub fn split(
        members: Vec<(K, Arc<Outbox<T>>)>,
        seq: u64,
        config: TreeConfig,
        stats: Arc<TreeStats>,
    ) -> (Self, Vec<(K, At)>) {
        let cap = config.limits.shard_capacity();
        let mut tree = Tree {
            shards: Vec::new(),
            sizes: Vec::new(),
            open: Vec::new(),
            config,
            stats,
        };
        let mut placed = Vec::with_capacity(members.len());
        let n = members.len().div_ceil(cap).max(1);
        let (base, extra) = (members.len() / n, members.len() % n);
        let mut it = members.into_iter();
        for i in 0..n {
            let len = base + usize::from(i < extra);
            let slots: Vec<Slot<K, T>> = it
                .by_ref()
                .take(len)
                .map(|(key, outbox)| Slot { key, outbox, from: seq })
                .collect();
            for (pos, s) in slots.iter().enumerate() {
                placed.push((
                    s.key,
                    At {
                        shard: i as u32,
                        pos: pos as u32,
                    },
                ));
            }
            let shard = Shard::new();
            *shard.members.lock() = slots;
            tree.shards.push(Arc::new(shard));
            tree.sizes.push(len);
            if len < cap {
                tree.open.push(i as u32);
            }
        }
        tree.stats.shards.fetch_add(n as u64, Ordering::Relaxed);
        (tree, placed)
    }

    /// Adds a member that gets the messages after `seq`.
    pub fn insert(&mut self, key: K, outbox: Arc<Outbox<T>>, seq: u64) -> At {
        let cap = self.config.limits.shard_capacity();
        let shard = match self.open.last() {
            Some(&s) => s,
            None => {
                self.shards.push(Arc::new(Shard::new()));
                self.sizes.push(0);
                self.stats.shards.fetch_add(1, Ordering::Relaxed);
                let s = (self.shards.len() - 1) as u32;
                self.open.push(s);
                s
            }
        };
        let i = shard as usize;
        let mut members = self.shards[i].members.lock();
        members.push(Slot { key, outbox, from: seq });
        let pos = (members.len() - 1) as u32;
        drop(members);
        self.sizes[i] += 1;
        if self.sizes[i] >= cap {
            self.open.pop();
        }
        At { shard, pos }
    }

    /// Removes the member at `at`; returns the key that moved into its
    /// place (to re-index), if any.
    pub fn remove(&mut self, at: At) -> Option<K> {
        let i = at.shard as usize;
        let mut members = self.shards[i].members.lock();
        members.swap_remove(at.pos as usize);
        let moved = members.get(at.pos as usize).map(|s| s.key);
        if members.capacity() > 64 && members.len() < members.capacity() / 4 {
            let len = members.len();
            members.shrink_to(len * 2);
        }
        drop(members);
        if self.sizes[i] == self.config.limits.shard_capacity() {
            self.open.push(at.shard);
        }
        self.sizes[i] -= 1;
        moved
    }

    /// Queues message `seq` in every shard with members and starts the
    /// shards that were idle.
    pub fn broadcast(&self, seq: u64, item: &T) {
        let runtime = tokio::runtime::Handle::try_current().ok();
        for (shard, &size) in self.shards.iter().zip(&self.sizes) {
            if size == 0 || !shard.enqueue(seq, item.clone(), self.config.max_queue, &self.stats) {
                continue;
            }
            match &runtime {
                Some(rt) => {
                    rt.spawn(shard.clone().run(self.stats.clone()));
                }
                None => shard.run_inline(&self.stats),
            }
        }
    }

    /// Whether every shard has written everything it was given (no message
    /// of this room is on its way to a member).
    pub fn idle(&self) -> bool {
        self.shards.iter().all(|s| s.idle())
    }

    /// Every member, shard by shard (to merge back into the inline path).
    pub fn into_members(mut self) -> Vec<(K, Arc<Outbox<T>>)> {
        let mut out = Vec::with_capacity(self.sizes.iter().sum());
        let shards = std::mem::take(&mut self.shards);
        self.stats.shards.fetch_sub(shards.len() as u64, Ordering::Relaxed);
        for shard in shards {
            out.extend(shard.members.lock().drain(..).map(|s| (s.key, s.outbox)));
        }
        out
    }

    /// Marks every member's outbox overflowed; returns how many there were.
    pub fn abort_all(&self) -> usize {
        let mut n = 0;
        for shard in &self.shards {
            for slot in shard.members.lock().iter() {
                slot.outbox.abort();
                n += 1;
            }
        }
        n
    }

    pub fn config(&self) -> &TreeConfig {
        &self.config
    }

    /// Members per shard.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }
}

impl<K, T> Drop for Tree<K, T> {
    fn drop(&mut self) {
        self.stats.shards.fetch_sub(self.shards.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;

    use super::*;
    use crate::MemberSet;
    use crate::outbox::OutboxLimits;

    fn tier(threshold: usize, degree: usize) -> TreeTier {
        TreeTier::new(TreeConfig {
            limits: Limits {
                tree_threshold: threshold,
                tree_degree: degree,
            },
            max_queue: 1000,
        })
    }

    fn outboxes(n: usize) -> Vec<Arc<Outbox<Bytes>>> {
        (0..n).map(|_| Arc::new(Outbox::new(OutboxLimits::default()))).collect()
    }

    fn msg(i: u32) -> Bytes {
        Bytes::from(i.to_be_bytes().to_vec())
    }

    /// Waits until every shard task is done, then reads what `ob` got.
    async fn received(set: &MemberSet<u64, Bytes>, ob: &Outbox<Bytes>) -> Vec<u32> {
        while !set.idle() {
            tokio::task::yield_now().await;
        }
        let mut out = VecDeque::new();
        ob.try_drain(&mut out);
        out.iter()
            .map(|b| u32::from_be_bytes(b[..4].try_into().unwrap()))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_split_room_delivers_every_message_once_in_order_on_all_workers() {
        let tier = tier(10, 4); // shards of at most 3
        let obs = outboxes(50);
        let mut set = MemberSet::default();
        for (i, ob) in obs.iter().enumerate() {
            set.insert(i as u64, ob.clone());
        }
        let (mut slow, mut schedule) = (Vec::new(), Vec::new());
        for i in 0..200 {
            assert_eq!(set.broadcast_tiered(&msg(i), &tier, &mut slow, &mut schedule), 50);
        }
        let sizes = set.shard_sizes().expect("split above the threshold").to_vec();
        assert_eq!(sizes.len(), 17);
        assert!(sizes.iter().all(|&n| n <= 3));
        assert!(schedule.is_empty() && slow.is_empty());
        for ob in &obs {
            assert_eq!(received(&set, ob).await, (0..200).collect::<Vec<_>>());
        }
        assert_eq!(tier.stats.deliveries.load(Ordering::Relaxed), 50 * 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn joiners_get_what_follows_their_join_and_leavers_nothing_more() {
        let tier = tier(4, 2); // shards of at most 2
        let obs = outboxes(12);
        let mut set = MemberSet::default();
        let mut slots = Vec::new();
        for (i, ob) in obs.iter().take(8).enumerate() {
            slots.push(set.insert(i as u64, ob.clone()));
        }
        let (mut slow, mut schedule) = (Vec::new(), Vec::new());
        for i in 0..10 {
            set.broadcast_tiered(&msg(i), &tier, &mut slow, &mut schedule);
        }
        // Joins while messages may still wait in the shards.
        for (i, ob) in obs.iter().enumerate().skip(8) {
            set.insert(i as u64, ob.clone());
        }
        assert!(set.remove(slots[0], 0));
        for i in 10..20 {
            set.broadcast_tiered(&msg(i), &tier, &mut slow, &mut schedule);
        }
        assert!(set.shard_sizes().unwrap().iter().all(|&n| n <= 2));
        let got0 = received(&set, &obs[0]).await;
        assert!(got0.iter().all(|&m| m < 10), "nothing after the leave: {got0:?}");
        assert_eq!(got0, (0..got0.len() as u32).collect::<Vec<_>>(), "a prefix, in order");
        for ob in &obs[1..8] {
            assert_eq!(received(&set, ob).await, (0..20).collect::<Vec<_>>());
        }
        for ob in &obs[8..] {
            assert_eq!(received(&set, ob).await, (10..20).collect::<Vec<_>>());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_room_that_shrinks_goes_back_inline_without_reordering() {
        let tier = tier(10, 2);
        let obs = outboxes(12);
        let mut set = MemberSet::default();
        let slots: Vec<_> = obs
            .iter()
            .enumerate()
            .map(|(i, ob)| set.insert(i as u64, ob.clone()))
            .collect();
        let (mut slow, mut schedule) = (Vec::new(), Vec::new());
        for i in 0..5 {
            set.broadcast_tiered(&msg(i), &tier, &mut slow, &mut schedule);
        }
        assert!(set.shard_sizes().is_some());
        for (i, slot) in slots.iter().enumerate().take(9) {
            assert!(set.remove(*slot, i as u64));
        }
        // Below half the threshold: merged at the first broadcast with
        // nothing in flight.
        while !set.idle() {
            tokio::task::yield_now().await;
        }
        set.broadcast_tiered(&msg(5), &tier, &mut slow, &mut schedule);
        assert!(set.shard_sizes().is_none(), "merged");
        set.broadcast_tiered(&msg(6), &tier, &mut slow, &mut schedule);
        assert_eq!(schedule.len(), 0, "no sinks here: nothing to schedule");
        for ob in &obs[9..] {
            assert_eq!(received(&set, ob).await, (0..=6).collect::<Vec<_>>());
        }
    }

    #[test]
    fn without_a_runtime_shards_run_inline() {
        let tier = tier(2, 2);
        let obs = outboxes(5);
        let mut set = MemberSet::default();
        for (i, ob) in obs.iter().enumerate() {
            set.insert(i as u64, ob.clone());
        }
        set.broadcast_tiered(&msg(7), &tier, &mut Vec::new(), &mut Vec::new());
        assert_eq!(set.shard_sizes(), Some(&[1, 1, 1, 1, 1][..]));
        for ob in &obs {
            assert_eq!(ob.queued().0, 1);
        }
    }

    #[test]
    fn a_shard_too_far_behind_closes_its_members() {
        let tier = TreeTier::new(TreeConfig {
            limits: Limits {
                tree_threshold: 2,
                tree_degree: 2,
            },
            max_queue: 3,
        });
        let obs = outboxes(3);
        let shard: Shard<u64, Bytes> = Shard::new();
        shard.members.lock().extend(obs.iter().enumerate().map(|(i, ob)| Slot {
            key: i as u64,
            outbox: ob.clone(),
            from: 0,
        }));
        // Nobody runs the shard: the queue fills up.
        assert!(shard.enqueue(1, msg(1), 3, &tier.stats));
        assert!(!shard.enqueue(2, msg(2), 3, &tier.stats));
        assert!(!shard.enqueue(3, msg(3), 3, &tier.stats));
        assert!(!shard.enqueue(4, msg(4), 3, &tier.stats));
        assert!(obs.iter().all(|ob| ob.is_overflowed()));
        assert_eq!(tier.stats.overruns.load(Ordering::Relaxed), 1);
    }
}
