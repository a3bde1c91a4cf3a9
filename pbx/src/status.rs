//! Live figures of the running PBX that the HTTP API and metrics read and
//! the signalling core and media relay keep current, plus the drain switch
//! shared by SIGTERM, `POST /api/drain` and the core.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::watch;

#[derive(Debug)]
pub struct PbxStatus {
    pub started: Instant,
    pub active_calls: AtomicUsize,
    pub total_calls: AtomicU64,
    pub registrations: AtomicUsize,
    pub ports_in_use: AtomicUsize,
    pub ports_capacity: AtomicUsize,
    draining: AtomicBool,
    drain_tx: watch::Sender<bool>,
}

impl Default for PbxStatus {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            active_calls: AtomicUsize::new(0),
            total_calls: AtomicU64::new(0),
            registrations: AtomicUsize::new(0),
            ports_in_use: AtomicUsize::new(0),
            ports_capacity: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            drain_tx: watch::channel(false).0,
        }
    }
}

impl PbxStatus {
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts a drain; later calls are no-ops. Returns whether this call started it.
    pub fn start_drain(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::SeqCst);
        if first {
            self.drain_tx.send_replace(true);
        }
        first
    }

    /// Resolves once a drain has started.
    pub fn drain_started(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }
}
