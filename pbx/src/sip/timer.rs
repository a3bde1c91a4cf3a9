//! A deadline queue for protocol timers. Timers are never cancelled: a
//! fired timer whose owner has moved on is ignored by the owner, which is
//! cheaper than bookkeeping for cancellation on every message.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Debug)]
pub struct TimerQueue<T: Ord> {
    heap: BinaryHeap<Reverse<(Instant, u64, T)>>,
    seq: u64,
}

impl<T: Ord> Default for TimerQueue<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T: Ord> TimerQueue<T> {
    pub fn schedule(&mut self, at: Instant, what: T) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, what)));
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next timer due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_deadline()? <= now {
            self.heap.pop().map(|Reverse((_, _, what))| what)
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let t0 = Instant::now();
        let mut q = TimerQueue::default();
        q.schedule(t0 + Duration::from_millis(20), 'b');
        q.schedule(t0 + Duration::from_millis(10), 'a');
        assert_eq!(q.pop_due(t0), None);
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(25)), Some('a'));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(25)), Some('b'));
        assert!(q.is_empty());
    }
}
