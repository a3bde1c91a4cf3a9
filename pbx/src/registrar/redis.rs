//! Bindings in Redis (`registrar.store: redis`), shared by every PBX
//! instance and kept across restarts: one hash per AOR
//! (`sip-pbx:aor:<aor>`, field = contact, value = the binding as JSON)
//! that Redis expires with its last binding. Connects lazily and
//! reconnects by itself, so the PBX starts and keeps serving static
//! routes while Redis is down; every command has a deadline.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use super::store::{Binding, Store, StoreError, Swept};

const KEY_PREFIX: &str = "sip-pbx:aor:";
/// Longest a REGISTER or a lookup waits for Redis.
const DEADLINE: Duration = Duration::from_millis(1500);

pub struct RedisStore {
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
}

impl RedisStore {
    /// Checks the URL; no connection is made yet.
    pub fn new(url: &str) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        Ok(RedisStore {
            client,
            connection: Mutex::new(None),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEADLINE))
            .set_response_timeout(Some(DEADLINE))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            DEADLINE * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| StoreError::Unavailable("connecting to Redis timed out".into()))?
        .map_err(unavailable)?;
        tracing::info!("connected to Redis");
        *slot = Some(manager.clone());
        Ok(manager)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut con = self.connection().await?;
        tokio::time::timeout(DEADLINE, cmd.query_async(&mut con))
            .await
            .map_err(|_| StoreError::Unavailable("Redis did not answer in time".into()))?
            .map_err(unavailable)
    }

    async fn bindings(&self, key: &str) -> Result<Vec<Binding>, StoreError> {
        let fields: HashMap<String, String> = self.query(redis::cmd("HGETALL").arg(key)).await?;
        Ok(fields
            .values()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn key(aor: &str) -> String {
    format!("{KEY_PREFIX}{aor}")
}

impl Store for RedisStore {
    fn get<'a>(&'a self, aor: &'a str) -> BoxFuture<'a, Result<Vec<Binding>, StoreError>> {
        Box::pin(async move { self.bindings(&key(aor)).await })
    }

    fn put<'a>(
        &'a self,
        aor: &'a str,
        upserts: Vec<Binding>,
        removals: Vec<String>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let key = key(aor);
            let mut pipe = redis::pipe();
            pipe.atomic();
            if !removals.is_empty() {
                pipe.cmd("HDEL").arg(&key).arg(&removals).ignore();
            }
            for b in &upserts {
                let json = serde_json::to_string(b).map_err(unavailable)?;
                pipe.cmd("HSET")
                    .arg(&key)
                    .arg(&b.contact)
                    .arg(json)
                    .ignore();
            }
            let mut con = self.connection().await?;
            tokio::time::timeout(DEADLINE, pipe.query_async::<()>(&mut con))
                .await
                .map_err(|_| StoreError::Unavailable("Redis did not answer in time".into()))?
                .map_err(unavailable)?;
            // The hash lives as long as its longest binding.
            let last = self
                .bindings(&key)
                .await?
                .iter()
                .map(|b| b.expires_at)
                .max();
            if let Some(at) = last {
                self.query::<()>(redis::cmd("EXPIREAT").arg(&key).arg(at))
                    .await?;
            }
            Ok(())
        })
    }

    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<Swept, StoreError>> {
        Box::pin(async move {
            let mut swept = Swept::default();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .query(
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{KEY_PREFIX}*"))
                            .arg("COUNT")
                            .arg(500),
                    )
                    .await?;
                for key in keys {
                    let Some(aor) = key.strip_prefix(KEY_PREFIX) else {
                        continue;
                    };
                    for b in self.bindings(&key).await? {
                        if b.expires_at > now {
                            swept.live += 1;
                            continue;
                        }
                        // Of several instances sweeping, the one whose HDEL
                        // removed the field reports the expiry.
                        let removed: u32 = self
                            .query(redis::cmd("HDEL").arg(&key).arg(&b.contact))
                            .await?;
                        if removed > 0 {
                            swept.expired.push((aor.to_string(), b));
                        }
                    }
                }
                if next == 0 {
                    return Ok(swept);
                }
                cursor = next;
            }
        })
    }
}
