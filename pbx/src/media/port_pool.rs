//! The relay's UDP port pool (`media.port_pool`): even RTP ports, each with
//! the next odd port for RTCP (RFC 3550 §11), handed out and taken back by
//! pair. It keeps `PbxStatus.ports_in_use`/`ports_capacity` current. Shared
//! between the signalling side, which allocates, and the relay threads,
//! which give ports back once their sockets are closed.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::PortRange;
use crate::status::PbxStatus;

#[derive(Debug)]
pub struct PortPool {
    /// Even ports of free pairs, longest free first: released pairs go to
    /// the back, so that a port just closed is not reused at once (late
    /// packets of the old call).
    free: Mutex<VecDeque<u16>>,
    capacity: usize,
    /// From the first even port to the last port.
    range: PortRange,
    status: Arc<PbxStatus>,
}

impl PortPool {
    /// Every even port `p` with `start <= p` and `p + 1 <= end`.
    pub fn new(range: PortRange, status: Arc<PbxStatus>) -> Self {
        let first = range.start.saturating_add(range.start % 2);
        let free: VecDeque<u16> = (u32::from(first)..u32::from(range.end))
            .step_by(2)
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        let capacity = free.len();
        status.ports_capacity.store(capacity * 2, Ordering::Relaxed);
        Self {
            free: Mutex::new(free),
            capacity,
            range: PortRange {
                start: first,
                end: range.end,
            },
            status,
        }
    }

    /// Pairs the pool holds in all.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The ports of the pool's pairs: from the first (even) RTP port to
    /// the end of `media.port_pool`.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Pairs free now.
    pub fn available(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The even port of a free pair, drawn at random from the half that has
    /// been free longest, so that the next call's ports cannot be guessed.
    pub fn allocate(&self) -> Option<u16> {
        self.allocate_where(|_| true)
    }

    /// As [`PortPool::allocate`], of the pairs whose even port `fits`; from
    /// the half free longest if it holds one.
    pub fn allocate_where(&self, fits: impl Fn(u16) -> bool) -> Option<u16> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest = free.len().div_ceil(2).max(1);
        let from = rand::random_range(0..oldest);
        let at = (0..oldest)
            .map(|i| (from + i) % oldest)
            .chain(oldest..free.len())
            .find(|&i| free.get(i).is_some_and(|&port| fits(port)))?;
        let port = free.remove(at)?;
        drop(free);
        self.status.ports_in_use.fetch_add(2, Ordering::Relaxed);
        Some(port)
    }

    /// Gives a pair back.
    pub fn release(&self, port: u16) {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(port);
        self.status.ports_in_use.fetch_sub(2, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(start: u16, end: u16) -> (PortPool, Arc<PbxStatus>) {
        let status = Arc::new(PbxStatus::default());
        (
            PortPool::new(PortRange { start, end }, status.clone()),
            status,
        )
    }

    #[test]
    fn pairs_are_even_and_fit_the_range() {
        let (pool, status) = pool(10001, 10006);
        assert_eq!(pool.capacity(), 2);
        assert_eq!(status.ports_capacity.load(Ordering::Relaxed), 4);
        let mut got = [pool.allocate(), pool.allocate()];
        got.sort();
        assert_eq!(got, [Some(10002), Some(10004)]);
        assert_eq!(pool.allocate(), None);
        assert_eq!(status.ports_in_use.load(Ordering::Relaxed), 4);
        pool.release(10002);
        assert_eq!(status.ports_in_use.load(Ordering::Relaxed), 2);
        assert_eq!(pool.available(), 1);
        assert_eq!(pool.allocate(), Some(10002));
    }

    #[test]
    fn pairs_that_fit_are_drawn_until_none_is_left() {
        let (pool, _) = pool(20001, 20199);
        assert_eq!(
            pool.range(),
            PortRange {
                start: 20002,
                end: 20199
            }
        );
        let fourth = |port: u16| (port - 20002) / 2 % 4 == 1;
        let got: Vec<u16> = std::iter::from_fn(|| pool.allocate_where(fourth)).collect();
        assert_eq!(got.len(), 25, "99 pairs, every fourth from the second");
        assert!(got.iter().all(|&p| fourth(p)), "{got:?}");
        assert_eq!(pool.available(), 99 - 25);
        pool.release(got[0]);
        assert_eq!(
            pool.allocate_where(fourth),
            Some(got[0]),
            "from the younger half when needed"
        );
    }

    #[test]
    fn top_of_the_port_space_does_not_overflow() {
        let (pool, _) = pool(65532, 65535);
        assert_eq!(pool.capacity(), 2);
        let mut got = [pool.allocate(), pool.allocate()];
        got.sort();
        assert_eq!(got, [Some(65532), Some(65534)]);
    }

    #[test]
    fn ports_just_released_wait_and_the_rest_come_in_no_fixed_order() {
        let (pool, _) = pool(20000, 20199);
        let first: Vec<u16> = (0..10).filter_map(|_| pool.allocate()).collect();
        assert_ne!(first, (0..10).map(|i| 20000 + 2 * i).collect::<Vec<u16>>());
        for &port in &first {
            pool.release(port);
        }
        let next: Vec<u16> = (0..40).filter_map(|_| pool.allocate()).collect();
        assert!(next.iter().all(|p| !first.contains(p)), "{next:?}");
    }
}
