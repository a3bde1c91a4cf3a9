//! Where bindings live: the store trait and the in-process store
//! (`registrar.store: memory`). Every call may wait (the Redis store
//! does), so the signalling core only ever calls a store from a spawned
//! job.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// One contact bound to an address of record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The Contact URI, as the phone wrote it (the binding's key).
    pub contact: String,
    /// Unix seconds when the binding lapses.
    pub expires_at: u64,
    pub call_id: String,
    pub cseq: u32,
    /// Where the REGISTER came from: the phone's NAT flow.
    pub source: SocketAddr,
    /// "udp" or "tcp": the transport of that flow.
    pub transport: String,
    /// The PBX instance ("ip:port") that holds the flow.
    pub instance: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("registrar store unavailable: {0}")]
    Unavailable(String),
}

/// What a sweep found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Bindings this sweep removed because they lapsed, with their AOR.
    pub expired: Vec<(String, Binding)>,
    /// Bindings still live in the store.
    pub live: usize,
}

pub trait Store: Send + Sync {
    /// The bindings of `aor` (lapsed ones may still be among them).
    fn get<'a>(&'a self, aor: &'a str) -> BoxFuture<'a, Result<Vec<Binding>, StoreError>>;

    /// Adds or replaces `upserts` (by contact) and removes `removals`.
    fn put<'a>(
        &'a self,
        aor: &'a str,
        upserts: Vec<Binding>,
        removals: Vec<String>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Removes the bindings lapsed by `now` (unix seconds).
    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<Swept, StoreError>>;
}

/// Bindings in this process only.
#[derive(Debug, Default)]
pub struct MemoryStore {
    aors: Mutex<HashMap<String, Vec<Binding>>>,
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, aor: &'a str) -> BoxFuture<'a, Result<Vec<Binding>, StoreError>> {
        let found = self
            .aors
            .lock()
            .map(|aors| aors.get(aor).cloned().unwrap_or_default())
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()));
        Box::pin(std::future::ready(found))
    }

    fn put<'a>(
        &'a self,
        aor: &'a str,
        upserts: Vec<Binding>,
        removals: Vec<String>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let done = self
            .aors
            .lock()
            .map(|mut aors| {
                let bindings = aors.entry(aor.to_string()).or_default();
                bindings.retain(|b| {
                    !removals.contains(&b.contact)
                        && !upserts.iter().any(|u| u.contact == b.contact)
                });
                bindings.extend(upserts);
                if bindings.is_empty() {
                    aors.remove(aor);
                }
            })
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()));
        Box::pin(std::future::ready(done))
    }

    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<Swept, StoreError>> {
        let swept = self
            .aors
            .lock()
            .map(|mut aors| {
                let mut swept = Swept::default();
                for (aor, bindings) in aors.iter_mut() {
                    let (gone, kept): (Vec<Binding>, Vec<Binding>) =
                        bindings.drain(..).partition(|b| b.expires_at <= now);
                    swept.live += kept.len();
                    swept
                        .expired
                        .extend(gone.into_iter().map(|b| (aor.clone(), b)));
                    *bindings = kept;
                }
                aors.retain(|_, b| !b.is_empty());
                swept
            })
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()));
        Box::pin(std::future::ready(swept))
    }
}
