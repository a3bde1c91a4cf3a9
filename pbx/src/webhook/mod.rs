//! Webhook dispatcher: owns the delivery of every event as a JSON POST to
//! each `events.webhook_urls` endpoint, signed with HMAC-SHA256 when a
//! secret is set. Each event is first spooled to disk (per endpoint, in
//! order) and removed once delivered, so nothing is lost across restarts.
//!
//! Each endpoint has one ordered queue and one delivery task: events of a
//! call arrive in order, and a receiver that is down or hangs only holds
//! back its own queue. A failing event is retried `webhook_retries` times
//! with exponential backoff and jitter; after that it stays spooled and is
//! retried every `backoff_cap` (never dropped). A receiver that refuses an
//! event for good (4xx other than 408 and 429) gets the next one instead.

mod spool;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::EventsConfig;
use crate::events::{Envelope, Event, Subscription};
use crate::metrics::{DeliveryResult, Metrics};
use crate::observers::{on_blocking, stopped};
pub use spool::Item;
use spool::Spool;

/// The environment variable that overrides `events.webhook_secret`.
pub const SECRET_ENV: &str = "SIP_PBX_WEBHOOK_SECRET";

/// The signature header: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-SipPbx-Signature";

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("events.spool_dir: cannot use {path} for {url}: {source}")]
    Spool {
        path: PathBuf,
        url: String,
        source: std::io::Error,
    },
    #[error("webhooks: cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// What the configuration does not say; retry timing is here so that tests
/// can be quick.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Each pod spools under `spool_dir/<pod>/`, so that pods sharing a
    /// volume never deliver (or overwrite) each other's events.
    pub pod: String,
    /// Delay before the first retry; doubled for each next one.
    pub backoff_base: Duration,
    /// The longest delay between two attempts, and the pace of attempts
    /// once the configured retries are used up.
    pub backoff_cap: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            pod: crate::cdr::pod_name(),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
        }
    }
}

/// The secret in force: the environment (a mounted Secret) wins over the
/// file; empty means unsigned.
pub fn resolve_secret(config_value: &str, env_value: Option<String>) -> Option<String> {
    env_value
        .filter(|s| !s.is_empty())
        .or_else(|| Some(config_value.to_string()).filter(|s| !s.is_empty()))
}

/// The value of the signature header for a body.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The JSON body of an event.
pub fn payload(envelope: &Envelope) -> Value {
    let (call, data) = match &envelope.event {
        Event::CallStarted { call } => (Some(call), json!({})),
        Event::CallRinging { call, code } => (Some(call), json!({ "code": code })),
        Event::CallAnswered { call, codec } => (Some(call), json!({ "codec": codec })),
        Event::CallEnded { call, summary } => (
            Some(call),
            serde_json::to_value(summary).unwrap_or_else(|_| json!({})),
        ),
        Event::RegistrationCreated {
            aor,
            contact,
            expires,
            source,
        } => (
            None,
            json!({ "aor": aor, "contact": contact, "expires": expires, "source": source }),
        ),
        Event::RegistrationExpired { aor, contact } => (
            None,
            json!({ "aor": aor, "contact": contact, "expires": 0, "source": null }),
        ),
    };
    json!({
        "id": envelope.id,
        "type": envelope.event.type_name(),
        "timestamp": envelope.timestamp,
        "call_id": call.map(|c| &c.call_id),
        "caller": call.map(|c| &c.caller),
        "callee": call.map(|c| &c.callee),
        "data": data,
    })
}

/// One receiver.
struct Endpoint {
    url: String,
    client: reqwest::Client,
    secret: Option<String>,
    retries: u32,
    options: WebhookOptions,
    metrics: Metrics,
}

enum Attempt {
    Delivered,
    Rejected(reqwest::StatusCode),
    Failed(String),
}

impl Endpoint {
    async fn attempt(&self, body: &[u8]) -> Attempt {
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(secret) = &self.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, body));
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    Attempt::Delivered
                } else if status.is_client_error()
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                {
                    Attempt::Rejected(status)
                } else {
                    Attempt::Failed(format!("answered {status}"))
                }
            }
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exponential = self
            .options
            .backoff_base
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1)));
        let delay = exponential.min(self.options.backoff_cap);
        // Jitter spreads the retries of many pods after a receiver outage.
        delay.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Delivers one event, retrying until the receiver takes or refuses it.
    async fn deliver(&self, body: &[u8]) {
        let mut failures = 0u32;
        loop {
            match self.attempt(body).await {
                Attempt::Delivered => {
                    self.metrics.webhook_delivery(DeliveryResult::Delivered);
                    return;
                }
                Attempt::Rejected(status) => {
                    self.metrics.webhook_delivery(DeliveryResult::Rejected);
                    tracing::warn!(url = %self.url, %status, "webhook: receiver refused an event; skipping it");
                    return;
                }
                Attempt::Failed(reason) => {
                    self.metrics.webhook_delivery(DeliveryResult::Failed);
                    failures += 1;
                    if failures == self.retries + 1 {
                        tracing::warn!(url = %self.url, %reason, retries = self.retries, "webhook: retries used up; event kept in the spool and retried every {:?}", self.options.backoff_cap);
                    } else {
                        tracing::debug!(url = %self.url, %reason, failures, "webhook: delivery failed");
                    }
                    tokio::time::sleep(self.backoff(failures)).await;
                }
            }
        }
    }

    async fn run(
        self,
        mut queue: std::collections::VecDeque<Item>,
        mut incoming: mpsc::UnboundedReceiver<Item>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let item = match queue.pop_front() {
                Some(item) => item,
                None => tokio::select! {
                    received = incoming.recv() => match received {
                        Some(item) => item,
                        None => return,
                    },
                    _ = stopped(&mut shutdown) => return,
                },
            };
            let body: Arc<[u8]> = match &item {
                Item::InMemory(body) => Arc::clone(body),
                Item::Spooled(path) => match tokio::fs::read(path).await {
                    Ok(body) => body.into(),
                    Err(e) => {
                        self.metrics.error("webhook_spool");
                        tracing::error!(path = %path.display(), error = %e, "webhook: cannot read a spooled event; skipping it");
                        continue;
                    }
                },
            };
            tokio::select! {
                () = self.deliver(&body) => {}
                // The event stays spooled and is sent again after a restart;
                // its id lets the receiver drop a duplicate.
                _ = stopped(&mut shutdown) => return,
            }
            if let Item::Spooled(path) = item {
                if let Err(e) = tokio::fs::remove_file(&path).await {
                    tracing::warn!(path = %path.display(), error = %e, "webhook: cannot remove a delivered event from the spool");
                }
            }
        }
    }
}

/// The running dispatcher.
#[derive(Debug)]
pub struct WebhookDispatcher {
    intake: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
}

impl WebhookDispatcher {
    /// Opens the spool of every endpoint and starts delivering, beginning
    /// with what an earlier run left undelivered.
    pub fn spawn(
        config: &EventsConfig,
        secret: Option<String>,
        options: WebhookOptions,
        metrics: Metrics,
        events: Subscription,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, WebhookError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.webhook_timeout.max(1)))
            .build()?;
        let root = PathBuf::from(&config.spool_dir).join(crate::cdr::sanitize_pod(&options.pod));
        let mut spools = Vec::new();
        let mut senders = Vec::new();
        let mut workers = Vec::new();
        for url in &config.webhook_urls {
            let (spool, left) = Spool::open(&root, url).map_err(|source| WebhookError::Spool {
                path: root.clone(),
                url: url.clone(),
                source,
            })?;
            if !left.is_empty() {
                tracing::info!(%url, count = left.len(), "webhook: delivering events spooled by an earlier run");
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let endpoint = Endpoint {
                url: url.clone(),
                client: client.clone(),
                secret: secret.clone(),
                retries: config.webhook_retries,
                options: options.clone(),
                metrics: metrics.clone(),
            };
            workers.push(tokio::spawn(endpoint.run(
                left.into(),
                rx,
                shutdown.clone(),
            )));
            spools.push(spool);
            senders.push(tx);
        }
        let intake = tokio::spawn(intake(
            Arc::new(Mutex::new(spools)),
            senders,
            metrics,
            events,
            shutdown,
        ));
        Ok(Self { intake, workers })
    }

    /// Waits until every event received before shutdown is spooled and the
    /// delivery tasks have stopped.
    pub async fn join(self) {
        if let Err(e) = self.intake.await {
            tracing::error!(error = %e, "webhook: intake task failed");
        }
        for worker in self.workers {
            if let Err(e) = worker.await {
                tracing::error!(error = %e, "webhook: delivery task failed");
            }
        }
    }
}

/// Spools a batch of events for every endpoint, then queues them.
async fn spool_batch(
    spools: &Arc<Mutex<Vec<Spool>>>,
    senders: &[mpsc::UnboundedSender<Item>],
    metrics: &Metrics,
    batch: Vec<Arc<Envelope>>,
) {
    let bodies: Vec<Arc<[u8]>> = batch
        .iter()
        .filter_map(|envelope| serde_json::to_vec(&payload(envelope)).ok())
        .map(Arc::from)
        .collect();
    let queued = on_blocking(spools, move |spools| {
        spools
            .iter_mut()
            .map(|spool| {
                let (items, error) = spool.append_all(&bodies);
                if let Some(e) = error {
                    tracing::error!(dir = %spool.dir().display(), error = %e, "webhook: cannot spool events; delivering them from memory");
                }
                items
            })
            .collect::<Vec<_>>()
    })
    .await;
    for (items, sender) in queued.unwrap_or_default().into_iter().zip(senders) {
        for item in items {
            if matches!(item, Item::InMemory(_)) {
                metrics.error("webhook_spool");
            }
            // A delivery task only ends at shutdown; the item stays spooled.
            let _ = sender.send(item);
        }
    }
}

async fn intake(
    spools: Arc<Mutex<Vec<Spool>>>,
    senders: Vec<mpsc::UnboundedSender<Item>>,
    metrics: Metrics,
    mut events: Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            received = events.recv() => {
                let Some(first) = received else { break };
                let mut batch = vec![first];
                while let Ok(next) = events.try_recv() {
                    batch.push(next);
                }
                spool_batch(&spools, &senders, &metrics, batch).await;
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
    let mut rest = Vec::new();
    while let Ok(next) = events.try_recv() {
        rest.push(next);
    }
    if !rest.is_empty() {
        spool_batch(&spools, &senders, &metrics, rest).await;
    }
}

#[cfg(test)]
mod tests;
