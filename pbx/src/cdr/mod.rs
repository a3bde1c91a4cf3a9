//! Call detail records: owns the CDR files of this pod (one JSON line per
//! ended call, daily files named by the call's end date in UTC, a pod name
//! in every file name so that pods can share one volume), their crash
//! safety (flush per record, fsync every second, torn tails repaired),
//! retention, and the in-memory ring of recent records behind
//! `GET /api/cdr/recent`.

mod files;
mod writer;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::events::{CallParties, CallSummary, Envelope, Event};

pub use files::{apply_retention, pod_name, repair_torn_tail, sanitize_pod, CdrFiles};
pub use writer::{spawn, CdrWriterOptions};

/// Where "now" comes from, so that rotation and retention can be tested
/// without waiting for midnight.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// One line of a CDR file: the call's parties and summary, side by side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CdrRecord {
    #[serde(flatten)]
    pub call: CallParties,
    #[serde(flatten)]
    pub summary: CallSummary,
}

impl CdrRecord {
    /// The record of a `call.ended` event; other events make none.
    pub fn from_envelope(envelope: &Envelope) -> Option<Self> {
        match &envelope.event {
            Event::CallEnded { call, summary } => Some(Self {
                call: call.clone(),
                summary: summary.clone(),
            }),
            _ => None,
        }
    }
}

/// Why the CDR writer could not start or write.
#[derive(Debug, thiserror::Error)]
pub enum CdrError {
    #[error("config: cdr.filename_pattern: {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("cdr: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CdrError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// The most recent records, newest last, shared with the HTTP API.
#[derive(Debug, Clone)]
pub struct RecentCdrs {
    ring: Arc<Mutex<VecDeque<CdrRecord>>>,
    capacity: usize,
}

/// The most `GET /api/cdr/recent` may ask for, and so what the ring keeps.
pub const RECENT_CAPACITY: usize = 1000;

impl Default for RecentCdrs {
    fn default() -> Self {
        Self::new(RECENT_CAPACITY)
    }
}

impl RecentCdrs {
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<CdrRecord>> {
        // The ring holds plain data; a panic elsewhere cannot leave it
        // half-updated in a way that matters to readers.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, record: CdrRecord) {
        let mut ring = self.lock();
        while ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(record);
    }

    /// Up to `limit` records, newest first.
    pub fn latest(&self, limit: usize) -> Vec<CdrRecord> {
        self.lock().iter().rev().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests;
