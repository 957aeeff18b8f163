//! A room's local members and the encode-once broadcast to them.
//!
//! Owns membership of one group (one room on one node, one codec). Does not
//! own locking: the caller wraps a `MemberSet` in whatever lock orders its
//! deliveries, and calls every method under it.
//!
//! Two paths: inline (a small group: the broadcast queues the item into every
//! member's outbox on the caller's thread) and split (a group above the tree
//! threshold: [`crate::tree`] shards, run on all worker threads). A group is
//! split by the first broadcast that finds it above the threshold and merged
//! back when it shrank below half of it and no message is on its way.
//!
//! Invariants: a key is a member at most once; a member gets every item
//! broadcast after its insert and before its removal, in broadcast order
//! (on both paths and across a split or a merge); an inline `broadcast`
//! never waits and costs one reference-count bump and one queue push per
//! member, a split one the same per shard.

use std::sync::Arc;

use crate::outbox::{Outbox, PushError, Pushed, Wire};
use crate::tree::{At, Tree, TreeTier};

/// Where a member sits in its [`MemberSet`]: returned by
/// [`MemberSet::insert`], handed back to [`MemberSet::remove`]. The member's
/// owner keeps it (a connection keeps one per room), so the set needs no
/// index of its own. A slot stays valid across a split and a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot(u32);

impl Slot {
    /// The position, for owners that pack it with other bits.
    pub fn get(self) -> u32 {
        self.0
    }

    /// A slot from [`Slot::get`].
    pub fn from_raw(raw: u32) -> Self {
        Self(raw)
    }
}

/// One slot: a member served inline, a member of a shard (where), or free.
enum Entry<K, T> {
    Free,
    Inline(K, Arc<Outbox<T>>),
    Split(K, At),
}

impl<K: Copy + Eq, T> Entry<K, T> {
    fn key(&self) -> Option<K> {
        match self {
            Entry::Free => None,
            Entry::Inline(k, _) | Entry::Split(k, _) => Some(*k),
        }
    }
}

/// Members of one group, in slots: a join takes a free slot (or appends), a
/// leave empties its slot. No hashing and no index: a 2,000-room login
/// inserts here once per room, and the hash index this replaced was a fifth
/// of a join's cost and 20+ bytes per membership.
///
/// Free slots are reused before the vector grows, and free slots at the end
/// are dropped, so the vector never exceeds the group's peak size; an inline
/// broadcast skips the free slots in between. While split, a slot says
/// where in the shards its member is.
pub struct MemberSet<K, T> {
    entries: Vec<Entry<K, T>>,
    /// Free slots to reuse (some may be past the end after a trim: skipped).
    free: Vec<u32>,
    len: usize,
    /// The shards while split (boxed: most groups never split, and an
    /// empty set stays a few words); their members are keyed by (key, slot)
    /// so a member that moves inside a shard is found again.
    tree: Option<Box<Tree<(K, Slot), T>>>,
    /// Items broadcast so far (numbers the split path's messages).
    seq: u64,
}

impl<K, T> Default for MemberSet<K, T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            tree: None,
            seq: 0,
        }
    }
}

impl<K: Copy + Eq + Send + 'static, T: Clone + Wire + Send + Sync + 'static> MemberSet<K, T> {
    /// Adds a member and returns its slot. The caller makes sure `key` is not
    /// a member already (it holds the slot of every membership it has).
    ///
    /// # Panics
    /// With more than `u32::MAX` members.
    pub fn insert(&mut self, key: K, outbox: Arc<Outbox<T>>) -> Slot {
        self.len += 1;
        let mut slot = None;
        while let Some(i) = self.free.pop() {
            if matches!(self.entries.get(i as usize), Some(Entry::Free)) {
                slot = Some(Slot(i));
                break;
            }
        }
        let slot = slot.unwrap_or_else(|| {
            let i = u32::try_from(self.entries.len()).expect("at most u32::MAX members");
            self.entries.push(Entry::Free);
            Slot(i)
        });
        self.entries[slot.0 as usize] = match self.tree.as_mut() {
            Some(tree) => Entry::Split(key, tree.insert((key, slot), outbox, self.seq)),
            None => Entry::Inline(key, outbox),
        };
        slot
    }

    /// Removes the member `key` at `slot`; returns false (and changes
    /// nothing) if that slot does not hold `key`. A member of a split group
    /// gets nothing more, even a message already queued in its shard.
    pub fn remove(&mut self, slot: Slot, key: K) -> bool {
        let i = slot.0 as usize;
        if self.entries.get(i).and_then(Entry::key) != Some(key) {
            return false;
        }
        if let Entry::Split(_, at) = std::mem::replace(&mut self.entries[i], Entry::Free) {
            let tree = self.tree.as_mut().expect("split members live in the tree");
            if let Some((moved, moved_slot)) = tree.remove(at) {
                self.entries[moved_slot.0 as usize] = Entry::Split(moved, at);
            }
        }
        self.len -= 1;
        if self.len == 0 {
            // Nobody left whose order matters: the shards go at once, even
            // with messages still queued (their tasks find no member).
            self.tree = None;
            self.entries.clear();
            self.free.clear();
        } else if i + 1 == self.entries.len() {
            // Free slots past the new end stay in `free` until an insert
            // pops and skips them: each is there at most once per leave, so
            // `free` never outgrows the group's peak by more than that.
            while matches!(self.entries.last(), Some(Entry::Free)) {
                self.entries.pop();
            }
        } else {
            self.free.push(slot.0);
        }
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
            self.free.shrink_to(self.entries.len() * 2);
        }
        if self.tree.is_some() {
            self.merge_if_small();
        }
        true
    }

    /// Whether `slot` holds the member `key`.
    pub fn holds(&self, slot: Slot, key: K) -> bool {
        self.entries.get(slot.0 as usize).and_then(Entry::key) == Some(key)
    }

    /// Back to the inline path once the group is below half the threshold
    /// and no message is on its way to a member (so none can overtake).
    fn merge_if_small(&mut self) {
        let Some(tree) = self.tree.as_ref() else {
            return;
        };
        if !tree.config().limits.unsharded(self.len) || !tree.idle() {
            return;
        }
        let tree = self.tree.take().expect("checked");
        for ((key, slot), outbox) in (*tree).into_members() {
            self.entries[slot.0 as usize] = Entry::Inline(key, outbox);
        }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The members' keys, in slot order (inline or split alike).
    pub fn keys(&self) -> impl Iterator<Item = K> + '_ {
        self.entries.iter().filter_map(Entry::key)
    }

    /// Whether every item broadcast so far has been queued into the
    /// members' outboxes (always true inline).
    pub fn idle(&self) -> bool {
        self.tree.as_ref().is_none_or(|t| t.idle())
    }

    /// Whether the group is split into shards; their sizes.
    pub fn shard_sizes(&self) -> Option<&[usize]> {
        self.tree.as_ref().map(|t| t.sizes())
    }

    /// The inline members, in slot order.
    fn inline(&self) -> impl Iterator<Item = (K, &Arc<Outbox<T>>)> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Inline(k, o) => Some((*k, o)),
            _ => None,
        })
    }

    /// Closes every member as a slow consumer (their writers send the close);
    /// returns how many there were.
    pub fn abort_all(&self) -> usize {
        if let Some(tree) = &self.tree {
            return tree.abort_all();
        }
        for (_, outbox) in self.inline() {
            outbox.abort();
        }
        self.len
    }

    /// Offers `item` to every member without waiting, inline.
    ///
    /// Members whose outbox was full are appended to `slow` (their outbox is
    /// now overflowed and their writer has been woken to close them).
    /// Returns the number of members the item was queued for. Outboxes that
    /// need a flusher now (idle, with a sink) are appended to `schedule`:
    /// hand them to [`crate::Flushers`]. A split group (see
    /// [`MemberSet::broadcast_tiered`]) is served the split way.
    pub fn broadcast(&mut self, item: &T, slow: &mut Vec<K>, schedule: &mut Vec<Arc<Outbox<T>>>) -> usize {
        self.seq += 1;
        if let Some(tree) = &self.tree {
            tree.broadcast(self.seq, item);
            return self.len;
        }
        let mut delivered = 0;
        for (key, outbox) in self.inline() {
            match outbox.try_push_direct(item.clone()) {
                Ok(Pushed::Queued) => delivered += 1,
                Ok(Pushed::Schedule) => {
                    delivered += 1;
                    schedule.push(outbox.clone());
                }
                Err(PushError::Full) => slow.push(key),
                Err(PushError::Closed) => {}
            }
        }
        delivered
    }

    /// [`MemberSet::broadcast`], splitting the group first when it is above
    /// `tier`'s threshold (and merging it when it shrank and is idle). Split,
    /// the item is queued once per shard; the shards queue it into their
    /// members' outboxes and write them on the runtime's worker threads, so
    /// the count returned is the members it was handed to and `slow` and
    /// `schedule` get nothing.
    pub fn broadcast_tiered(
        &mut self,
        item: &T,
        tier: &TreeTier,
        slow: &mut Vec<K>,
        schedule: &mut Vec<Arc<Outbox<T>>>,
    ) -> usize {
        if self.tree.is_none() && tier.config.limits.sharded(self.len) {
            let mut members = Vec::with_capacity(self.len);
            for (i, e) in self.entries.iter_mut().enumerate() {
                if let Entry::Inline(key, outbox) = std::mem::replace(e, Entry::Free) {
                    members.push(((key, Slot(i as u32)), outbox));
                }
            }
            let (tree, placed) = Tree::split(members, self.seq, tier.config, tier.stats.clone());
            for ((key, slot), at) in placed {
                self.entries[slot.0 as usize] = Entry::Split(key, at);
            }
            self.tree = Some(Box::new(tree));
        } else {
            self.merge_if_small();
        }
        self.broadcast(item, slow, schedule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxLimits;
    use bytes::Bytes;

    #[test]
    fn slots_are_reused_and_the_tail_is_trimmed() {
        let mut set: MemberSet<u64, Bytes> = MemberSet::default();
        let boxes: Vec<_> = (0..100)
            .map(|_| Arc::new(Outbox::new(OutboxLimits::default())))
            .collect();
        let slots: Vec<Slot> = boxes
            .iter()
            .enumerate()
            .map(|(i, b)| set.insert(i as u64, b.clone()))
            .collect();
        for i in (0..100).step_by(3) {
            assert!(set.remove(slots[i], i as u64));
            assert!(!set.remove(slots[i], i as u64), "removed once");
        }
        assert!(!set.remove(slots[1], 2), "a slot only removes its own key");
        assert_eq!(set.len(), 66);
        for (i, s) in slots.iter().enumerate() {
            assert_eq!(set.holds(*s, i as u64), i % 3 != 0);
        }
        let mut slow = Vec::new();
        assert_eq!(set.broadcast(&Bytes::from_static(b"m"), &mut slow, &mut Vec::new()), 66);
        assert!(slow.is_empty());
        for (i, b) in boxes.iter().enumerate() {
            assert_eq!(b.queued().0, usize::from(i % 3 != 0));
        }
        // A new member takes an empty slot before the vector grows.
        let s = set.insert(1000, boxes[0].clone());
        assert!(s.get() < 100);
        // Leaving from the end trims the empty slots behind it.
        for (i, s) in slots.iter().enumerate().rev() {
            set.remove(*s, i as u64);
        }
        assert_eq!(set.len(), 1);
        assert!(set.entries.len() <= 100 && set.free.len() <= 100);
        assert!(set.remove(s, 1000));
        assert!(set.entries.is_empty() && set.free.is_empty());
    }

    #[test]
    fn broadcast_reports_full_members_once() {
        let mut set: MemberSet<u64, Bytes> = MemberSet::default();
        let tight = Arc::new(Outbox::new(OutboxLimits {
            max_bytes: 1,
            max_frames: 1,
        }));
        let roomy = Arc::new(Outbox::new(OutboxLimits::default()));
        set.insert(1, tight);
        set.insert(2, roomy.clone());
        let mut slow = Vec::new();
        set.broadcast(&Bytes::from_static(b"a"), &mut slow, &mut Vec::new());
        set.broadcast(&Bytes::from_static(b"b"), &mut slow, &mut Vec::new());
        set.broadcast(&Bytes::from_static(b"c"), &mut slow, &mut Vec::new());
        assert_eq!(slow, vec![1]);
        assert_eq!(roomy.queued().0, 3);
    }
}
