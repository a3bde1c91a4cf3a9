//! Scale-in without cutting calls: reads the pods' calls, drains the chosen
//! victims, deletes them once empty, and tells the reconciler when the
//! Deployment may shrink.
//!
//! The drain start time lives in a pod annotation, so a restarted or newly
//! elected operator continues a scale-in where the last one stopped.

use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::scaling::{pick_victims, PodCalls};
use crate::stats::{PodStats, StatsClient};

/// Pod annotation: when the operator told the pod to drain (RFC 3339).
pub const DRAIN_STARTED_ANNOTATION: &str = "sip.pbx.dev/drain-started";
/// Pod annotation the ReplicaSet controller (1.22+) uses to pick which pod to delete.
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// A pod of a SipPbx as the scale-in sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub name: String,
    pub ip: Option<String>,
    pub drain_started: Option<Timestamp>,
    pub annotated: bool,
}

impl PodInfo {
    /// The view of `pod`; `None` for pods already being deleted.
    pub fn of(pod: &Pod) -> Option<PodInfo> {
        if pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let status = pod.status.as_ref();
        let annotations = pod.annotations();
        Some(PodInfo {
            name: pod.name_any(),
            ip: status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty()),
            drain_started: annotations
                .get(DRAIN_STARTED_ANNOTATION)
                .and_then(|t| t.parse().ok()),
            annotated: annotations.contains_key(DRAIN_STARTED_ANNOTATION)
                || annotations.contains_key(DELETION_COST_ANNOTATION),
        })
    }
}

/// Where a scale-in stands after one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleIn {
    /// The victims have no calls (or their drain timed out): shrink now.
    Done { victims: Vec<String> },
    /// These pods are still draining calls.
    Waiting {
        draining: Vec<String>,
        started: Vec<String>,
    },
}

/// Pods and their calls, for one SipPbx.
pub struct Pods {
    api: Api<Pod>,
    stats: StatsClient,
    port: i32,
    token: String,
}

/// A pod API call failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} pods of {selector}: {source}")]
pub struct PodError {
    action: &'static str,
    selector: String,
    source: kube::Error,
}

impl Pods {
    /// Pods reached through `api`, their HTTP API on `port`, told to drain
    /// with the admin `token`.
    pub fn new(api: Api<Pod>, stats: StatsClient, port: i32, token: String) -> Self {
        Pods {
            api,
            stats,
            port,
            token,
        }
    }

    /// The live pods matching `selector`.
    pub async fn list(&self, selector: &str) -> Result<Vec<PodInfo>, PodError> {
        let pods = self
            .api
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(|source| PodError {
                action: "list",
                selector: selector.to_string(),
                source,
            })?;
        Ok(pods.iter().filter_map(PodInfo::of).collect())
    }

    /// Asks every pod for its calls. A pod without an address has none; a
    /// pod that does not answer is `None` (never assumed empty).
    pub async fn calls(&self, pods: &[PodInfo]) -> Vec<PodCalls> {
        join_all(pods.iter().map(|p| async move {
            let stats = match &p.ip {
                None => Some(PodStats {
                    active_calls: 0,
                    draining: false,
                }),
                Some(ip) => match self.stats.stats(ip, self.port).await {
                    Ok(s) => Some(s),
                    Err(err) => {
                        tracing::warn!(pod = %p.name, error = %err, "pod stats unavailable");
                        None
                    }
                },
            };
            PodCalls {
                name: p.name.clone(),
                active_calls: stats.map(|s| s.active_calls),
                draining: p.drain_started.is_some(),
                reports_draining: stats.is_some_and(|s| s.draining),
            }
        }))
        .await
    }

    /// One step of scaling in by `excess` pods: starts draining the victims
    /// not yet draining, and says whether the Deployment may shrink.
    pub async fn scale_in_step(
        &self,
        pods: &[PodInfo],
        calls: &[PodCalls],
        excess: usize,
        timeout: Duration,
        now: Timestamp,
    ) -> Result<ScaleIn, PodError> {
        let victims = pick_victims(calls, excess);
        let mut started = Vec::new();
        let mut draining = Vec::new();
        for name in &victims {
            let Some(pod) = pods.iter().find(|p| &p.name == name) else {
                continue;
            };
            let seen = calls.iter().find(|c| &c.name == name);
            // Told again until it says it drains: a pod marked while it had no
            // address yet must not take new calls once it has one.
            if let (Some(ip), false) = (&pod.ip, seen.is_some_and(|c| c.reports_draining)) {
                if let Err(err) = self.stats.drain(ip, self.port, &self.token).await {
                    tracing::warn!(pod = %name, error = %err, "drain request failed");
                }
            }
            let since = match pod.drain_started {
                Some(since) => since,
                None => {
                    self.annotate(name, json!({ DRAIN_STARTED_ANNOTATION: now.to_string() }))
                        .await?;
                    started.push(name.clone());
                    now
                }
            };
            if !drained(seen.and_then(|c| c.active_calls), since, now, timeout) {
                draining.push(name.clone());
            }
        }
        if !draining.is_empty() || !started.is_empty() {
            return Ok(ScaleIn::Waiting { draining, started });
        }
        for name in &victims {
            self.annotate(name, json!({ DELETION_COST_ANNOTATION: "-1000" }))
                .await?;
            self.delete(name).await?;
        }
        Ok(ScaleIn::Done { victims })
    }

    /// Deletes a drained pod before the Deployment shrinks. Servers before
    /// 1.22 ignore the deletion cost, so the ReplicaSet could otherwise remove a
    /// busy pod; a replacement it may start meanwhile is Pending, and so the
    /// pod it removes when the replicas go down.
    async fn delete(&self, pod: &str) -> Result<(), PodError> {
        match self.api.delete(pod, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(source) => Err(PodError {
                action: "delete",
                selector: pod.to_string(),
                source,
            }),
        }
    }

    /// Removes drain marks from pods when no scale-in is under way (it was
    /// cancelled by a higher replica count).
    pub async fn clear_marks(&self, pods: &[PodInfo]) -> Result<(), PodError> {
        for pod in pods.iter().filter(|p| p.annotated) {
            self.annotate(
                &pod.name,
                json!({ DRAIN_STARTED_ANNOTATION: null, DELETION_COST_ANNOTATION: null }),
            )
            .await?;
        }
        Ok(())
    }

    async fn annotate(&self, pod: &str, annotations: serde_json::Value) -> Result<(), PodError> {
        let patch = json!({ "metadata": { "annotations": annotations } });
        self.api
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|source| PodError {
                action: "annotate",
                selector: pod.to_string(),
                source,
            })
    }
}

/// A victim may go once it reports no calls, or its drain has timed out.
fn drained(calls: Option<i64>, since: Timestamp, now: Timestamp, timeout: Duration) -> bool {
    let elapsed = now.duration_since(since).unsigned_abs();
    calls == Some(0) || elapsed >= timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_table() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        let at = |s: i64| Timestamp::from_second(1_000 + s).expect("time");
        let timeout = Duration::from_secs(60);
        // (calls, seconds since drain start, drained)
        let cases = [
            (Some(0), 0, true),
            (Some(3), 0, false),
            (Some(3), 59, false),
            (Some(3), 60, true),
            (None, 10, false),
            (None, 61, true),
        ];
        for (calls, secs, want) in cases {
            assert_eq!(
                drained(calls, t0, at(secs), timeout),
                want,
                "{calls:?} after {secs}s"
            );
        }
    }

    #[test]
    fn pod_info_reads_ip_and_marks() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p1", "annotations": {DRAIN_STARTED_ANNOTATION: "2026-01-01T00:00:00Z"}},
            "status": {"podIP": "10.1.2.3"}
        }))
        .expect("pod");
        let info = PodInfo::of(&pod).expect("live pod");
        assert!(info.annotated);
        assert_eq!(info.ip.as_deref(), Some("10.1.2.3"));
        assert_eq!(info.drain_started, "2026-01-01T00:00:00Z".parse().ok());
        let terminating: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p2", "deletionTimestamp": "2026-01-01T00:00:00Z"}
        }))
        .expect("pod");
        assert_eq!(PodInfo::of(&terminating), None);
    }
}
