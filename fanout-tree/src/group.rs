//! A room's local members and the encode-once broadcast to them.
//!
//! Owns membership of one group (one room on one node). Does not own locking:
//! the caller wraps a `MemberSet` in whatever lock orders its deliveries.
//!
//! Invariants: a key is a member at most once; `broadcast` never waits and
//! costs one reference-count bump and one queue push per member.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::outbox::{Outbox, PushError, Pushed, Weighted};

/// Members of one group: dense for iteration, indexed for O(1) removal.
pub struct MemberSet<K, T> {
    members: Vec<(K, Arc<Outbox<T>>)>,
    /// foldhash (seeded per process): joins of a 2,000-room login insert
    /// here once per room, and SipHash was a tenth of their cost.
    index: HashMap<K, usize, foldhash::fast::RandomState>,
}

impl<K, T> Default for MemberSet<K, T> {
    fn default() -> Self {
        Self {
            members: Vec::new(),
            index: HashMap::default(),
        }
    }
}

impl<K: Copy + Eq + Hash, T: Clone + Weighted> MemberSet<K, T> {
    /// Adds a member; returns false if it was already there.
    pub fn insert(&mut self, key: K, outbox: Arc<Outbox<T>>) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key, self.members.len());
        self.members.push((key, outbox));
        true
    }

    /// Removes a member; returns false if it was not there.
    pub fn remove(&mut self, key: K) -> bool {
        let Some(pos) = self.index.remove(&key) else {
            return false;
        };
        self.members.swap_remove(pos);
        if let Some((moved, _)) = self.members.get(pos) {
            self.index.insert(*moved, pos);
        }
        if self.members.capacity() > 64 && self.members.len() < self.members.capacity() / 4 {
            self.members.shrink_to(self.members.len() * 2);
            self.index.shrink_to(self.members.len() * 2);
        }
        true
    }

    /// Whether `key` is a member.
    pub fn contains(&self, key: K) -> bool {
        self.index.contains_key(&key)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Closes every member as a slow consumer (their writers send the close);
    /// returns how many there were.
    pub fn abort_all(&self) -> usize {
        for (_, outbox) in &self.members {
            outbox.abort();
        }
        self.members.len()
    }

    /// Offers `item` to every member without waiting. Members whose outbox was
    /// full are appended to `slow` (their outbox is now overflowed and their
    /// writer has been woken to close them). Returns the number of members the
    /// item was queued for. Outboxes that need a flusher now (idle, with a
    /// sink) are appended to `schedule`: hand them to [`crate::Flushers`].
    pub fn broadcast(&self, item: &T, slow: &mut Vec<K>, schedule: &mut Vec<Arc<Outbox<T>>>) -> usize {
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
