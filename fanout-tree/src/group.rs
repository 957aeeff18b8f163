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

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::outbox::{Outbox, PushError, Pushed, Wire};
use crate::tree::{At, Tree, TreeTier};

/// Where a member is: its index in the inline list, or its shard.
#[derive(Clone, Copy)]
enum Place {
    Inline(usize),
    Split(At),
}

/// Members of one group: dense for iteration, indexed for O(1) removal.
pub struct MemberSet<K, T> {
    /// Inline members (empty while split).
    members: Vec<(K, Arc<Outbox<T>>)>,
    /// foldhash (seeded per process): joins of a 2,000-room login insert
    /// here once per room, and SipHash was a tenth of their cost.
    index: HashMap<K, Place, foldhash::fast::RandomState>,
    /// The shards while split.
    tree: Option<Tree<K, T>>,
    /// Items broadcast so far (numbers the split path's messages).
    seq: u64,
}

impl<K, T> Default for MemberSet<K, T> {
    fn default() -> Self {
        Self {
            members: Vec::new(),
            index: HashMap::default(),
            tree: None,
            seq: 0,
        }
    }
}

impl<K: Copy + Eq + Hash + Send + 'static, T: Clone + Wire + Send + Sync + 'static> MemberSet<K, T> {
    /// Adds a member; returns false if it was already there.
    pub fn insert(&mut self, key: K, outbox: Arc<Outbox<T>>) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        let place = match self.tree.as_mut() {
            Some(tree) => Place::Split(tree.insert(key, outbox, self.seq)),
            None => {
                self.members.push((key, outbox));
                Place::Inline(self.members.len() - 1)
            }
        };
        self.index.insert(key, place);
        true
    }

    /// Removes a member; returns false if it was not there. A member of a
    /// split group gets nothing more, even a message already queued in its
    /// shard.
    pub fn remove(&mut self, key: K) -> bool {
        let Some(place) = self.index.remove(&key) else {
            return false;
        };
        match place {
            Place::Inline(pos) => {
                self.members.swap_remove(pos);
                if let Some((moved, _)) = self.members.get(pos) {
                    self.index.insert(*moved, Place::Inline(pos));
                }
                if self.members.capacity() > 64 && self.members.len() < self.members.capacity() / 4 {
                    self.members.shrink_to(self.members.len() * 2);
                    self.index.shrink_to(self.members.len() * 2);
                }
            }
            Place::Split(at) => {
                let tree = self.tree.as_mut().expect("split members live in the tree");
                if let Some(moved) = tree.remove(at) {
                    self.index.insert(moved, Place::Split(at));
                }
                self.merge_if_small();
            }
        }
        true
    }

    /// Back to the inline path once the group is below half the threshold
    /// and no message is on its way to a member (so none can overtake).
    fn merge_if_small(&mut self) {
        let Some(tree) = self.tree.as_ref() else {
            return;
        };
        if !tree.config().limits.unsharded(self.index.len()) || !tree.idle() {
            return;
        }
        let tree = self.tree.take().expect("checked");
        self.members = tree.into_members();
        for (pos, (key, _)) in self.members.iter().enumerate() {
            self.index.insert(*key, Place::Inline(pos));
        }
    }

    /// Whether `key` is a member.
    pub fn contains(&self, key: K) -> bool {
        self.index.contains_key(&key)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether every item broadcast so far has been queued into the
    /// members' outboxes (always true inline).
    pub fn idle(&self) -> bool {
        self.tree.as_ref().is_none_or(Tree::idle)
    }

    /// Whether the group is split into shards; their sizes.
    pub fn shard_sizes(&self) -> Option<&[usize]> {
        self.tree.as_ref().map(|t| t.sizes())
    }

    /// Closes every member as a slow consumer (their writers send the close);
    /// returns how many there were.
    pub fn abort_all(&self) -> usize {
        if let Some(tree) = &self.tree {
            return tree.abort_all();
        }
        for (_, outbox) in &self.members {
            outbox.abort();
        }
        self.members.len()
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
            return self.index.len();
        }
        let mut delivered = 0;
        for (key, outbox) in &self.members {
            match outbox.try_push_direct(item.clone()) {
                Ok(Pushed::Queued) => delivered += 1,
                Ok(Pushed::Schedule) => {
                    delivered += 1;
                    schedule.push(outbox.clone());
                }
                Err(PushError::Full) => slow.push(*key),
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
        if self.tree.is_none() && tier.config.limits.sharded(self.index.len()) {
            let members = std::mem::take(&mut self.members);
            let (tree, placed) = Tree::split(members, self.seq, tier.config, tier.stats.clone());
            for (key, at) in placed {
                self.index.insert(key, Place::Split(at));
            }
            self.tree = Some(tree);
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
    fn insert_remove_keeps_index_consistent() {
        let mut set: MemberSet<u64, Bytes> = MemberSet::default();
        let boxes: Vec<_> = (0..100)
            .map(|_| Arc::new(Outbox::new(OutboxLimits::default())))
            .collect();
        for (i, b) in boxes.iter().enumerate() {
            assert!(set.insert(i as u64, b.clone()));
        }
        assert!(!set.insert(5, boxes[5].clone()));
        for i in (0..100).step_by(3) {
            assert!(set.remove(i));
            assert!(!set.remove(i));
        }
        assert_eq!(set.len(), 66);
        for i in 0..100u64 {
            assert_eq!(set.contains(i), i % 3 != 0);
        }
        let mut slow = Vec::new();
        assert_eq!(set.broadcast(&Bytes::from_static(b"m"), &mut slow, &mut Vec::new()), 66);
        assert!(slow.is_empty());
        for (i, b) in boxes.iter().enumerate() {
            assert_eq!(b.queued().0, usize::from(i % 3 != 0));
        }
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
