//! Starting and stopping the observers of the call-event stream (CDR
//! writer, webhook dispatcher, call metrics) and the two HTTP servers
//! (API and `/metrics`): the one entry point `main` calls.
//!
//! ```no_run
//! # async fn wiring(config: sip_pbx::config::Config) -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use sip_pbx::{events::EventBus, observers, status::PbxStatus};
//!
//! let status = Arc::new(PbxStatus::default());
//! let mut bus = EventBus::default();
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! // Before the bus is cloned into the core: clones made earlier would not
//! // reach the observers.
//! let observers = observers::start(&config, &mut bus, Arc::clone(&status), shutdown).await?;
//! let metrics = observers.metrics.clone(); // for the core and the media relay
//! // ... run the core with bus.clone(), status and metrics until it exits,
//! // having published the events (and so the CDRs) of the calls it ended ...
//! stop.send_replace(true);
//! observers.join().await; // CDRs fsynced, pending webhook events spooled
//! # Ok(()) }
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cdr::{self, CdrError, CdrWriterOptions, RecentCdrs};
use crate::config::Config;
use crate::events::EventBus;
use crate::http::{self, AdminToken, ApiState, TokenError};
use crate::metrics::{self, Metrics};
use crate::status::PbxStatus;
use crate::webhook::{self, WebhookDispatcher, WebhookError, WebhookOptions};

/// Why the observers could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("monitoring.{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cdr(#[from] CdrError),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error(transparent)]
    AdminToken(#[from] TokenError),
}

/// What the configuration does not say; the defaults are production's.
#[derive(Clone)]
pub struct StartOptions {
    /// Address the API and metrics servers listen on.
    pub listen_ip: IpAddr,
    pub cdr: CdrWriterOptions,
    pub webhook: WebhookOptions,
    /// `SIP_PBX_WEBHOOK_SECRET`, which overrides `events.webhook_secret`.
    pub webhook_secret_env: Option<String>,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            listen_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            cdr: CdrWriterOptions::default(),
            webhook: WebhookOptions::default(),
            webhook_secret_env: std::env::var(webhook::SECRET_ENV).ok(),
        }
    }
}

/// The running observers.
#[derive(Debug)]
pub struct Observers {
    /// Handle for the core and the media relay to count with.
    pub metrics: Metrics,
    pub recent_cdrs: RecentCdrs,
    /// Where the API and `/metrics` actually listen (useful with port 0).
    pub api_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    cdr: Option<JoinHandle<()>>,
    webhooks: Option<WebhookDispatcher>,
    servers: Vec<JoinHandle<()>>,
    call_metrics: JoinHandle<()>,
}

/// Resolves once `shutdown` turns true or its sender is gone.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender was dropped, which also means "stop".
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs a step on shared state on the blocking pool, for file I/O that
/// must not stall the runtime. `None` if the step panicked.
pub async fn on_blocking<T, R, F>(state: &Arc<Mutex<T>>, step: F) -> Option<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: FnOnce(&mut T) -> R + Send + 'static,
{
    let state = Arc::clone(state);
    let done = tokio::task::spawn_blocking(move || {
        // State behind this lock stays usable after a panic in a step:
        // every step leaves it consistent before any call that may fail.
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        step(&mut state)
    })
    .await;
    done.map_err(|e| tracing::error!(error = %e, "observer step failed"))
        .ok()
}

async fn bind(key: &'static str, ip: IpAddr, port: u16) -> Result<TcpListener, StartError> {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let addr = listener.local_addr().ok();
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stopped(&mut shutdown).await });
        if let Err(e) = server.await {
            tracing::error!(?addr, error = %e, "http server failed");
        }
    })
}

/// [`start_with`] with the production options.
pub async fn start(
    config: &Config,
    bus: &mut EventBus,
    status: Arc<PbxStatus>,
    shutdown: watch::Receiver<bool>,
) -> Result<Observers, StartError> {
    start_with(config, bus, status, shutdown, StartOptions::default()).await
}

/// Subscribes the observers to `bus` (so call it before cloning the bus
/// into the core) and starts them. Setting `shutdown` to true (or dropping
/// its sender) stops them; then [`Observers::join`] waits for the last
/// CDRs to be synced and the last events to be spooled.
pub async fn start_with(
    config: &Config,
    bus: &mut EventBus,
    status: Arc<PbxStatus>,
    shutdown: watch::Receiver<bool>,
    options: StartOptions,
) -> Result<Observers, StartError> {
    let monitoring = &config.monitoring;
    let admin_token = AdminToken::from_config(&monitoring.admin_token_file)?;
    let api_listener = bind(
        "health_check_port",
        options.listen_ip,
        monitoring.health_check_port,
    )
    .await?;
    let metrics_listener = bind(
        "prometheus_port",
        options.listen_ip,
        monitoring.prometheus_port,
    )
    .await?;
    let local = |l: &TcpListener, key, port| {
        l.local_addr().map_err(|source| StartError::Bind {
            key,
            addr: SocketAddr::new(options.listen_ip, port),
            source,
        })
    };
    let api_addr = local(
        &api_listener,
        "health_check_port",
        monitoring.health_check_port,
    )?;
    let metrics_addr = local(
        &metrics_listener,
        "prometheus_port",
        monitoring.prometheus_port,
    )?;

    let metrics = Metrics::new(Arc::clone(&status));
    let (cdr, recent_cdrs) = if config.cdr.enabled {
        let (task, recent) = cdr::spawn(
            &config.cdr,
            options.cdr,
            metrics.clone(),
            bus.subscribe(),
            shutdown.clone(),
        )?;
        (Some(task), recent)
    } else {
        (None, RecentCdrs::default())
    };
    let webhooks = if config.events.webhook_urls.is_empty() {
        None
    } else {
        let secret =
            webhook::resolve_secret(&config.events.webhook_secret, options.webhook_secret_env);
        Some(WebhookDispatcher::spawn(
            &config.events,
            secret,
            options.webhook,
            metrics.clone(),
            bus.subscribe(),
            shutdown.clone(),
        )?)
    };
    let call_metrics = tokio::spawn(metrics::run_call_metrics(metrics.clone(), bus.subscribe()));
    let api = http::router(ApiState {
        status,
        recent: recent_cdrs.clone(),
        admin_token,
        max_concurrent_calls: config.sip.max_concurrent_calls,
    });
    let servers = vec![
        serve(api_listener, api, shutdown.clone()),
        serve(metrics_listener, metrics.router(), shutdown),
    ];
    tracing::info!(%api_addr, %metrics_addr, "observers started");
    Ok(Observers {
        metrics,
        recent_cdrs,
        api_addr,
        metrics_addr,
        cdr,
        webhooks,
        servers,
        call_metrics,
    })
}

impl Observers {
    /// Waits for the observers to finish after shutdown was signalled: CDRs
    /// written and fsynced, events spooled, servers closed.
    pub async fn join(self) {
        if let Some(cdr) = self.cdr {
            if let Err(e) = cdr.await {
                tracing::error!(error = %e, "cdr writer failed");
            }
        }
        if let Some(webhooks) = self.webhooks {
            webhooks.join().await;
        }
        for server in self.servers {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "http server task failed");
            }
        }
        // Call metrics hold nothing worth flushing.
        self.call_metrics.abort();
    }
}

#[cfg(test)]
mod tests;
