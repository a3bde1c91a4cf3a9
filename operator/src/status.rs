//! The SipPbx status, computed from what the operator observed: replicas,
//! calls, problems and drains become `status` fields and conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::SipPbxStatus;
use crate::validate::{blocks_apply, summary, Problem};

/// What one reconcile saw and did.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub generation: Option<i64>,
    pub selector: String,
    /// Replicas the operator wants (spec or autoscaling).
    pub desired: i32,
    /// The Deployment's spec.replicas as applied (above `desired` while draining).
    pub deployment_replicas: i32,
    /// From the Deployment's status.
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    pub active_calls: i64,
    pub problems: Vec<Problem>,
    /// Applying the objects failed with this message.
    pub apply_error: Option<String>,
    /// Pods being drained for a scale-in.
    pub draining: Vec<String>,
    /// The Deployment's replicas changed in this reconcile.
    pub scaled: bool,
}

/// Names of the condition types.
pub mod types {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const DRAINING: &str = "Draining";
}

/// The new status; conditions keep their lastTransitionTime while their status
/// does not change.
pub fn status(previous: Option<&SipPbxStatus>, obs: &Observed, now: Time) -> SipPbxStatus {
    let generation = obs.generation.unwrap_or(0);
    let invalid = blocks_apply(&obs.problems);
    let conditions = vec![
        ready(obs),
        progressing(obs, invalid),
        degraded(obs),
        draining(obs),
    ];
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let conditions = conditions
        .into_iter()
        .map(|(type_, ok, reason, message)| {
            let last_transition_time = previous_conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == status_str(ok))
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: type_.into(),
                status: status_str(ok).into(),
                reason: reason.into(),
                message,
                observed_generation: Some(generation),
                last_transition_time,
            }
        })
        .collect();
    SipPbxStatus {
        observed_generation: obs.generation,
        replicas: obs.replicas,
        ready_replicas: obs.ready,
        desired_replicas: obs.desired,
        active_calls: obs.active_calls,
        selector: obs.selector.clone(),
        last_scale_time: if obs.scaled {
            Some(now)
        } else {
            previous.and_then(|s| s.last_scale_time.clone())
        },
        conditions,
    }
}

type Cond = (&'static str, bool, &'static str, String);

fn status_str(ok: bool) -> &'static str {
    if ok {
        "True"
    } else {
        "False"
    }
}

fn ready(obs: &Observed) -> Cond {
    let message = format!("{} of {} pods ready", obs.ready, obs.desired);
    if obs.ready >= obs.desired && obs.apply_error.is_none() {
        (types::READY, true, "PodsReady", message)
    } else {
        (types::READY, false, "PodsNotReady", message)
    }
}

fn progressing(obs: &Observed, invalid: bool) -> Cond {
    if invalid {
        let message = "the spec is invalid; see the Degraded condition".to_string();
        return (types::PROGRESSING, false, "InvalidSpec", message);
    }
    if !obs.draining.is_empty() {
        let message = format!(
            "scaling in to {} pods once the draining pods have no calls",
            obs.desired
        );
        return (types::PROGRESSING, true, "ScalingIn", message);
    }
    if obs.updated < obs.deployment_replicas || obs.replicas != obs.deployment_replicas {
        let message = format!(
            "{} of {} pods updated, {} running",
            obs.updated, obs.deployment_replicas, obs.replicas
        );
        return (types::PROGRESSING, true, "RollingOut", message);
    }
    let message = format!("{} pods up to date", obs.replicas);
    (types::PROGRESSING, false, "Complete", message)
}

fn degraded(obs: &Observed) -> Cond {
    if let Some(err) = &obs.apply_error {
        return (types::DEGRADED, true, "ApplyFailed", err.clone());
    }
    if obs.problems.is_empty() {
        let message = "the spec is valid and applied".to_string();
        return (types::DEGRADED, false, "AsExpected", message);
    }
    let message = summary(&obs.problems);
    let reason = if blocks_apply(&obs.problems) {
        "InvalidSpec"
    } else {
        "UnsupportedCombination"
    };
    (types::DEGRADED, true, reason, message)
}

fn draining(obs: &Observed) -> Cond {
    if obs.draining.is_empty() {
        let message = "no pod is draining".to_string();
        (types::DRAINING, false, "NoDrain", message)
    } else {
        let message = format!("draining {}", obs.draining.join(", "));
        (types::DRAINING, true, "ScaleIn", message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::Severity;
    use k8s_openapi::jiff::Timestamp;

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    fn find<'a>(s: &'a SipPbxStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition present")
    }

    fn steady() -> Observed {
        Observed {
            generation: Some(3),
            selector: "a=b".into(),
            desired: 2,
            deployment_replicas: 2,
            replicas: 2,
            ready: 2,
            updated: 2,
            active_calls: 7,
            ..Observed::default()
        }
    }

    #[test]
    fn steady_state_is_ready_and_not_degraded() {
        let s = status(None, &steady(), time(100));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.active_calls, 7);
        assert_eq!(find(&s, types::READY).status, "True");
        assert_eq!(find(&s, types::PROGRESSING).reason, "Complete");
        assert_eq!(find(&s, types::DEGRADED).status, "False");
        assert_eq!(find(&s, types::DRAINING).status, "False");
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let first = status(None, &steady(), time(100));
        let second = status(Some(&first), &steady(), time(200));
        assert_eq!(find(&second, types::READY).last_transition_time, time(100));
        let mut not_ready = steady();
        not_ready.ready = 1;
        let third = status(Some(&second), &not_ready, time(300));
        assert_eq!(find(&third, types::READY).last_transition_time, time(300));
        assert_eq!(find(&third, types::READY).message, "1 of 2 pods ready");
    }

    #[test]
    fn invalid_spec_is_degraded_with_messages() {
        let mut obs = steady();
        obs.problems = vec![Problem {
            severity: Severity::Invalid,
            message: "spec.autoscaling: minReplicas 5 is above maxReplicas 2".into(),
        }];
        let s = status(None, &obs, time(1));
        let d = find(&s, types::DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(d.message.contains("minReplicas 5"));
        assert_eq!(find(&s, types::PROGRESSING).reason, "InvalidSpec");
    }

    #[test]
    fn draining_shows_pods_and_scale_time() {
        let mut obs = steady();
        obs.desired = 1;
        obs.draining = vec!["pbx-1".into()];
        let s = status(None, &obs, time(1));
        assert_eq!(find(&s, types::DRAINING).message, "draining pbx-1");
        assert_eq!(find(&s, types::PROGRESSING).reason, "ScalingIn");
        assert_eq!(s.last_scale_time, None);
        obs.draining.clear();
        obs.scaled = true;
        let s = status(Some(&s), &obs, time(5));
        assert_eq!(s.last_scale_time, Some(time(5)));
    }
}
