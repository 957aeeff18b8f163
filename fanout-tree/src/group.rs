//! A room's local members and the encode-once broadcast to them.
//!
//! Owns membership of one group (one room on one node). Does not own locking:
//! the caller wraps a `MemberSet` in whatever lock orders its deliveries.
//!
//! Invariants: a key is a member at most once; `broadcast` never waits and
//! costs one reference-count bump and one queue push per member.

use std::sync::Arc;

use crate::outbox::{Outbox, PushError, Pushed, Weighted};

/// Where a member sits in its [`MemberSet`]: returned by
/// [`MemberSet::insert`], handed back to [`MemberSet::remove`]. The member's
/// owner keeps it (a connection keeps one per room), so the set needs no
/// index of its own.
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

/// Members of one group, in slots: a join takes a free slot (or appends), a
/// leave empties its slot. No hashing and no index: a 2,000-room login
/// inserts here once per room, and the hash index it replaces was a fifth of
/// a join's cost and 20+ bytes per membership.
///
/// Empty slots are reused before the vector grows, and empty slots at the
/// end are dropped, so the vector never exceeds the group's peak size; a
/// broadcast skips the empty slots in between.
pub struct MemberSet<K, T> {
    slots: Vec<Option<(K, Arc<Outbox<T>>)>>,
    /// Empty slots to reuse (some may be past the end after a trim: skipped).
    free: Vec<u32>,
    len: usize,
}

impl<K, T> Default for MemberSet<K, T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<K: Copy + Eq, T: Clone + Weighted> MemberSet<K, T> {
    /// Adds a member and returns its slot. The caller makes sure `key` is not
    /// a member already (it holds the slot of every membership it has).
    ///
    /// # Panics
    /// With more than `u32::MAX` members.
    pub fn insert(&mut self, key: K, outbox: Arc<Outbox<T>>) -> Slot {
        self.len += 1;
        while let Some(i) = self.free.pop() {
            if let Some(slot @ None) = self.slots.get_mut(i as usize) {
                *slot = Some((key, outbox));
                return Slot(i);
            }
        }
        let i = u32::try_from(self.slots.len()).expect("at most u32::MAX members");
        self.slots.push(Some((key, outbox)));
        Slot(i)
    }

    /// Removes the member `key` at `slot`; returns false (and changes
    /// nothing) if that slot does not hold `key`.
    pub fn remove(&mut self, slot: Slot, key: K) -> bool {
        let i = slot.0 as usize;
        match self.slots.get(i) {
            Some(Some((k, _))) if *k == key => {}
            _ => return false,
        }
        self.slots[i] = None;
        self.len -= 1;
        if self.len == 0 {
            self.slots.clear();
            self.free.clear();
        } else if i + 1 == self.slots.len() {
            // Free slots past the new end stay in `free` until an insert
            // pops and skips them: each slot is in `free` at most once per
            // leave, so it never outgrows the group's peak by more than that.
            while matches!(self.slots.last(), Some(None)) {
                self.slots.pop();
            }
        } else {
            self.free.push(slot.0);
        }
        if self.slots.capacity() > 64 && self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to(self.slots.len() * 2);
            self.free.shrink_to(self.slots.len() * 2);
        }
        true
    }

    /// Whether `slot` holds the member `key`.
    pub fn holds(&self, slot: Slot, key: K) -> bool {
        matches!(self.slots.get(slot.0 as usize), Some(Some((k, _))) if *k == key)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The members, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &(K, Arc<Outbox<T>>)> {
        self.slots.iter().flatten()
    }

    /// Closes every member as a slow consumer (their writers send the close);
    /// returns how many there were.
    pub fn abort_all(&self) -> usize {
        for (_, outbox) in self.iter() {
            outbox.abort();
        }
        self.len
    }

    /// Offers `item` to every member without waiting. Members whose outbox was
    /// full are appended to `slow` (their outbox is now overflowed and their
    /// writer has been woken to close them). Returns the number of members the
    /// item was queued for. Outboxes that need a flusher now (idle, with a
    /// sink) are appended to `schedule`: hand them to [`crate::Flushers`].
    pub fn broadcast(&self, item: &T, slow: &mut Vec<K>, schedule: &mut Vec<Arc<Outbox<T>>>) -> usize {
        let mut delivered = 0;
        for (key, outbox) in self.iter() {
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
        assert!(set.slots.len() <= 100 && set.free.len() <= 100);
        assert!(set.remove(s, 1000));
        assert!(set.slots.is_empty() && set.free.is_empty());
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
