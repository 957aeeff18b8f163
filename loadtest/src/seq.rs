//! Loss and duplicate counting by sequence number.
//!
//! Each subscriber keeps one [`SeqTracker`] per publisher. A tracker is an
//! exact set of the sequence numbers seen so far, stored as a bitmap whose
//! fully received prefix is dropped as it fills, so memory stays at a few words
//! while nothing is lost and grows only with the span of outstanding gaps.
//! Loss is never guessed from gaps (a subscriber in some rooms legitimately
//! sees gaps): it is `expected - unique`, where the caller knows `expected`
//! from what the publishers sent. Duplicates are exact: a sequence number seen
//! twice, however late.

/// What one observed sequence number was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// Beyond the tracker's span limit; counted apart so it cannot hide.
    OutOfRange,
}

/// The set of sequence numbers received from one publisher.
#[derive(Debug, Default)]
pub struct SeqTracker {
    /// Every sequence number below `base` has been received.
    base: u64,
    /// Bit `i` of word `w` is sequence `base + 64 * w + i`.
    words: std::collections::VecDeque<u64>,
    unique: u64,
    duplicates: u64,
}

/// The widest gap a tracker holds (2^28 sequence numbers = 32 MiB of bitmap).
const MAX_SPAN: u64 = 1 << 28;

impl SeqTracker {
    pub fn observe(&mut self, seq: u64) -> Seen {
        if seq < self.base {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        let off = seq - self.base;
        if off >= MAX_SPAN {
            return Seen::OutOfRange;
        }
        let (w, bit) = ((off / 64) as usize, 1u64 << (off % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        if self.words[w] & bit != 0 {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        self.words[w] |= bit;
        self.unique += 1;
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 64;
        }
        Seen::New
    }

    pub fn unique(&self) -> u64 {
        self.unique
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Sequence numbers below `end` that were never received.
    #[cfg(test)]
    pub fn missing_below(&self, end: u64) -> u64 {
        if end <= self.base {
            return 0;
        }
        let span = end - self.base;
        let mut have = 0u64;
        for (w, word) in self.words.iter().enumerate() {
            let lo = w as u64 * 64;
            if lo >= span {
                break;
            }
            let take = (span - lo).min(64);
            let mask = if take == 64 { u64::MAX } else { (1u64 << take) - 1 };
            have += u64::from((word & mask).count_ones());
        }
        span - have
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_no_loss_and_constant_memory() {
        let mut t = SeqTracker::default();
        for s in 0..100_000 {
            assert_eq!(t.observe(s), Seen::New);
        }
        assert_eq!((t.unique(), t.duplicates(), t.missing_below(100_000)), (100_000, 0, 0));
        assert!(t.words.len() <= 1, "prefix not dropped: {} words", t.words.len());
    }

    #[test]
    fn gaps_count_as_missing_until_filled() {
        let mut t = SeqTracker::default();
        for s in (0..1_000).filter(|s| s % 10 != 3) {
            t.observe(s);
        }
        assert_eq!(t.missing_below(1_000), 100);
        assert_eq!(t.missing_below(14), 2);
        // Late arrivals (reordering) fill the gaps and are not duplicates.
        for s in (0..1_000).filter(|s| s % 10 == 3) {
            assert_eq!(t.observe(s), Seen::New);
        }
        assert_eq!((t.unique(), t.duplicates(), t.missing_below(1_000)), (1_000, 0, 0));
    }

    #[test]
    fn duplicates_are_exact_before_and_after_the_dropped_prefix() {
        let mut t = SeqTracker::default();
        for s in 0..200 {
            t.observe(s);
        }
        t.observe(500);
        assert_eq!(t.observe(5), Seen::Duplicate); // below base: prefix dropped
        assert_eq!(t.observe(500), Seen::Duplicate); // inside the bitmap
        assert_eq!(t.observe(199), Seen::Duplicate);
        assert_eq!(t.observe(201), Seen::New);
        assert_eq!((t.unique(), t.duplicates()), (202, 3));
        assert_eq!(t.missing_below(501), 501 - 202);
    }

    #[test]
    fn missing_below_counts_a_tail_never_received() {
        let mut t = SeqTracker::default();
        for s in 0..70 {
            t.observe(s);
        }
        assert_eq!(t.missing_below(70), 0);
        assert_eq!(t.missing_below(100), 30);
        assert_eq!(SeqTracker::default().missing_below(3), 3);
    }

    #[test]
    fn absurd_sequence_numbers_are_reported_not_allocated() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(MAX_SPAN + 1), Seen::OutOfRange);
        assert!(t.words.is_empty());
    }
}
