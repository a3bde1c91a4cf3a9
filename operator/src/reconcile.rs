//! One reconciliation of a SipPbx: validate, decide replicas (draining pods
//! before a scale-in), apply the desired objects, report status and Events;
//! and the error policy with backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::apply::{Applier, ApplyError};
use crate::crd::SipPbx;
use crate::drain::{PodError, PodInfo, Pods, ScaleIn};
use crate::metrics::Metrics;
use crate::objects::{self, config_hash, selector_string, ConfigError};
use crate::scaling::{desired_replicas, History, PodCalls};
use crate::stats::StatsClient;
use crate::status::{self, types, Observed};
use crate::validate::{blocks_apply, summary, validate};

/// Requeue while pods drain.
const DRAIN_POLL: Duration = Duration::from_secs(2);
/// Requeue when nothing needs watching but the resource itself.
const IDLE_RESYNC: Duration = Duration::from_secs(300);
/// First retry after a failure; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A reconciliation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Pods(#[from] PodError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("SipPbx {0} has no namespace")]
    NoNamespace(String),
    #[error("status of SipPbx {name}: {source}")]
    Status { name: String, source: kube::Error },
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub pdb: ApiResource,
    pub stats: StatsClient,
    pub metrics: Arc<Metrics>,
    /// How often pods' calls are read while autoscaling is on.
    pub stats_interval: Duration,
    histories: Mutex<HashMap<String, History>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        pdb: ApiResource,
        stats: StatsClient,
        metrics: Arc<Metrics>,
        stats_interval: Duration,
    ) -> Self {
        Context {
            client,
            recorder,
            pdb,
            stats,
            metrics,
            stats_interval,
            histories: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    async fn event(&self, pbx: &SipPbx, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(note, EVENT_NOTE_MAX)),
            action: reason.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &pbx.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "cannot publish event");
        }
    }
}

/// Longest note the API server accepts on an Event.
const EVENT_NOTE_MAX: usize = 1024;

/// `text` cut to at most `max` bytes (on a character boundary), marked with "...".
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

fn key(pbx: &SipPbx) -> String {
    format!("{}/{}", pbx.namespace().unwrap_or_default(), pbx.name_any())
}

/// Reconciles one SipPbx.
pub async fn reconcile(pbx: Arc<SipPbx>, ctx: Arc<Context>) -> Result<Action, Error> {
    Metrics::inc(&ctx.metrics.reconciles);
    let ns = pbx
        .namespace()
        .ok_or_else(|| Error::NoNamespace(pbx.name_any()))?;
    let applier = Applier::new(ctx.client.clone(), ns.clone(), ctx.pdb.clone());
    let problems = validate(&pbx.spec);
    let existing = applier.deployment(&pbx).await?;
    let current = existing
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    let mut obs = Observed {
        generation: pbx.metadata.generation,
        selector: selector_string(&pbx),
        problems,
        ..Observed::default()
    };
    observe_deployment(&mut obs, existing.as_ref());

    if blocks_apply(&obs.problems) {
        obs.desired = pbx.spec.replicas;
        if previous_reason(&pbx, types::DEGRADED) != Some("InvalidSpec") {
            let note = summary(&obs.problems);
            ctx.event(&pbx, EventType::Warning, "InvalidSpec", note)
                .await;
        }
        write_status(&ctx, &pbx, &obs).await?;
        reset_failures(&ctx, &pbx);
        return Ok(Action::requeue(IDLE_RESYNC));
    }

    let token = applier.admin_token(&pbx).await?;
    let pods = Pods::new(
        Api::namespaced(ctx.client.clone(), &ns),
        ctx.stats.clone(),
        pbx.spec.config.monitoring.health_check_port,
        token,
    );
    let infos = pods.list(&obs.selector).await?;
    let calls = pods.calls(&infos).await;
    obs.active_calls = calls.iter().filter_map(|c| c.active_calls).sum();
    obs.desired = {
        let now = Instant::now();
        let mut histories = ctx.histories.lock().unwrap_or_else(|e| e.into_inner());
        let history = histories
            .entry(key(&pbx))
            .or_insert_with(|| History::starting(now, current.unwrap_or(pbx.spec.replicas)));
        desired_replicas(&pbx.spec, &calls, history, now, current.unwrap_or(0))
    };
    tracing::debug!(sippbx = %key(&pbx), ?current, desired = obs.desired, ?calls, "scaling decision");

    let replicas = replicas_to_apply(&ctx, &pbx, &pods, &infos, &calls, current, &mut obs).await?;
    obs.deployment_replicas = replicas;
    obs.scaled = current.is_some_and(|c| c != replicas);

    let desired = objects::desired(&pbx, replicas)?;
    let applied = match applier.apply(&pbx, &desired).await {
        Ok(applied) => applied,
        Err(err) => {
            obs.apply_error = Some(err.to_string());
            ctx.event(&pbx, EventType::Warning, "ApplyFailed", err.to_string())
                .await;
            write_status(&ctx, &pbx, &obs).await?;
            return Err(err.into());
        }
    };
    report_changes(&ctx, &pbx, existing.as_ref(), &desired.deployment, replicas).await;
    observe_deployment(&mut obs, Some(&applied));
    write_status(&ctx, &pbx, &obs).await?;
    reset_failures(&ctx, &pbx);

    Ok(Action::requeue(if !obs.draining.is_empty() {
        DRAIN_POLL
    } else if pbx.spec.autoscaling.enabled {
        ctx.stats_interval
    } else {
        IDLE_RESYNC
    }))
}

/// The Deployment's replicas for this reconcile: `obs.desired` at once when
/// scaling up, or after the pods to remove are drained when scaling in
/// (until then the current count, with `obs.draining` set).
async fn replicas_to_apply(
    ctx: &Context,
    pbx: &SipPbx,
    pods: &Pods,
    infos: &[PodInfo],
    calls: &[PodCalls],
    current: Option<i32>,
    obs: &mut Observed,
) -> Result<i32, Error> {
    Ok(match current {
        Some(current) if obs.desired < current => {
            let excess = usize::try_from(current - obs.desired).unwrap_or(0);
            let timeout =
                Duration::from_secs(u64::try_from(pbx.spec.drain.timeout_seconds).unwrap_or(0));
            match pods
                .scale_in_step(infos, calls, excess, timeout, Timestamp::now())
                .await?
            {
                ScaleIn::Done { victims } => {
                    let note = format!(
                        "drained {}; scaling in to {}",
                        victims.join(", "),
                        obs.desired
                    );
                    ctx.event(pbx, EventType::Normal, "ScaledIn", note).await;
                    obs.desired
                }
                ScaleIn::Waiting { draining, started } => {
                    if !started.is_empty() {
                        for _ in &started {
                            Metrics::inc(&ctx.metrics.drains_started);
                        }
                        let note = format!(
                            "draining {} before scaling in to {}",
                            started.join(", "),
                            obs.desired
                        );
                        ctx.event(pbx, EventType::Normal, "DrainStarted", note)
                            .await;
                    }
                    obs.draining = draining;
                    current
                }
            }
        }
        _ => {
            if infos.len() <= usize::try_from(obs.desired).unwrap_or(0) {
                pods.clear_marks(infos).await?;
            }
            obs.desired
        }
    })
}

/// Events for what this reconcile changed on the Deployment.
async fn report_changes(
    ctx: &Context,
    pbx: &SipPbx,
    before: Option<&Deployment>,
    after: &Deployment,
    replicas: i32,
) {
    let Some(before) = before else {
        let note = format!("created the PBX objects with {replicas} pods");
        ctx.event(pbx, EventType::Normal, "Created", note).await;
        return;
    };
    let before_replicas = before.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    if before_replicas != replicas {
        Metrics::inc(&ctx.metrics.scale_changes);
        let note = format!("scaled the Deployment from {before_replicas} to {replicas} pods");
        ctx.event(pbx, EventType::Normal, "Scaled", note).await;
    }
    if config_hash(before) != config_hash(after) {
        let note = "configuration changed: rolling the pods".to_string();
        ctx.event(pbx, EventType::Normal, "ConfigChanged", note)
            .await;
    }
}

fn observe_deployment(obs: &mut Observed, deployment: Option<&Deployment>) {
    if let Some(d) = deployment {
        obs.deployment_replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        if let Some(s) = &d.status {
            obs.replicas = s.replicas.unwrap_or(0);
            obs.ready = s.ready_replicas.unwrap_or(0);
            obs.updated = s.updated_replicas.unwrap_or(0);
        }
    }
}

fn previous_reason<'a>(pbx: &'a SipPbx, type_: &str) -> Option<&'a str> {
    pbx.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| c.reason.as_str())
}

async fn write_status(ctx: &Context, pbx: &SipPbx, obs: &Observed) -> Result<(), Error> {
    let new = status::status(pbx.status.as_ref(), obs, Time(Timestamp::now()));
    if pbx.status.as_ref() == Some(&new) {
        return Ok(());
    }
    let api: Api<SipPbx> =
        Api::namespaced(ctx.client.clone(), &pbx.namespace().unwrap_or_default());
    let patch = Patch::Merge(json!({ "status": new }));
    match api
        .patch_status(&pbx.name_any(), &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => Ok(()),
        // Deleted while reconciling: nothing left to report on.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::Status {
            name: pbx.name_any(),
            source,
        }),
    }
}

fn reset_failures(ctx: &Context, pbx: &SipPbx) {
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key(pbx));
}

/// Backoff after a failed reconcile: 1 s, doubling per consecutive failure, at
/// most 5 minutes.
pub fn error_policy(pbx: Arc<SipPbx>, err: &Error, ctx: Arc<Context>) -> Action {
    Metrics::inc(&ctx.metrics.reconcile_errors);
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let count = failures.entry(key(&pbx)).or_insert(0);
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    tracing::warn!(sippbx = %key(&pbx), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_the_limit() {
        assert_eq!(truncate("short".into(), 1024), "short");
        let long = "é".repeat(600);
        let cut = truncate(long, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with("..."), "{}", cut.len());
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let secs: Vec<u64> = [1, 2, 3, 4, 9, 10, 50]
            .iter()
            .map(|n| backoff(*n).as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 256, 300, 300]);
    }
}
