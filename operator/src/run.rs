//! `sip-pbx-operator run`: the controller, behind leader election, with its
//! own metrics and health endpoints.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client};

use crate::apply::pdb_resource;
use crate::crd::SipPbx;
use crate::leader::Elector;
use crate::metrics::{self, Metrics};
use crate::reconcile::{error_policy, reconcile, Context};
use crate::stats::StatsClient;

/// Settings of `run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    pub metrics_addr: SocketAddr,
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub stats_interval: Duration,
    pub stats_timeout: Duration,
}

/// Runs until SIGTERM/SIGINT, or fails when leadership is lost.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", opts.metrics_addr))?;
    let server = metrics::serve(listener, metrics.clone());
    tokio::spawn(async move {
        if let Err(err) = server.await {
            tracing::error!(error = %err, "metrics server stopped");
        }
    });

    let elector = Elector::new(
        Api::namespaced(client.clone(), &opts.lease_namespace),
        opts.lease_name.clone(),
        opts.identity.clone(),
        opts.lease_duration,
    );
    tokio::select! {
        acquired = acquire(&elector) => acquired?,
        () = shutdown_signal() => return Ok(()),
    }
    metrics.leader.store(true, Ordering::Relaxed);
    tracing::info!(identity = %opts.identity, lease = %opts.lease_name, "leading");

    let result = tokio::select! {
        done = controller(client, &opts, metrics.clone()) => done,
        lost = keep_leading(&elector, opts.lease_duration) => lost,
        () = shutdown_signal() => Ok(()),
    };
    metrics.leader.store(false, Ordering::Relaxed);
    if let Err(err) = elector.release().await {
        tracing::warn!(error = %err, "cannot release the lease");
    }
    result
}

async fn acquire(elector: &Elector) -> anyhow::Result<()> {
    loop {
        match elector.try_acquire().await {
            Ok(true) => return Ok(()),
            Ok(false) => tracing::debug!("lease held by another replica"),
            Err(err) => tracing::warn!(error = %err, "lease"),
        }
        tokio::time::sleep(elector.retry_period()).await;
    }
}

/// Renews the lease; returns an error once it is lost.
async fn keep_leading(elector: &Elector, duration: Duration) -> anyhow::Result<()> {
    let mut last_renewed = Instant::now();
    loop {
        tokio::time::sleep(elector.retry_period()).await;
        match elector.try_acquire().await {
            Ok(true) => last_renewed = Instant::now(),
            Ok(false) => anyhow::bail!("another replica took the lease"),
            Err(err) if last_renewed.elapsed() > duration => {
                return Err(err).context("lease not renewed in time");
            }
            Err(err) => tracing::warn!(error = %err, "lease renewal failed, retrying"),
        }
    }
}

async fn controller(
    client: Client,
    opts: &RunOptions,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let pdb = pdb_resource(&client)
        .await
        .context("cannot discover the policy API group")?;
    let stats = StatsClient::new(opts.stats_timeout).context("cannot build the HTTP client")?;
    let reporter = Reporter {
        controller: "sip-pbx-operator".into(),
        instance: Some(opts.identity.clone()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(Context::new(
        client.clone(),
        recorder,
        pdb,
        stats,
        metrics,
        opts.stats_interval,
    ));
    let (pbxes, deployments, config_maps, services) = match &opts.namespace {
        Some(ns) => (
            Api::<SipPbx>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let owned =
        || watcher::Config::default().labels("app.kubernetes.io/managed-by=sip-pbx-operator");
    Controller::new(pbxes, watcher::Config::default())
        .owns(deployments, owned())
        .owns(config_maps, owned())
        .owns(services, owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(sippbx = %obj.name, "reconciled"),
                Err(err) => tracing::debug!(error = %err, "reconcile error"),
            }
        })
        .await;
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}
