//! The scaling decision, as pure functions: how many pods a SipPbx wants,
//! with the scale-down stabilization window, and which pods to drain first.

use std::time::{Duration, Instant};

use crate::crd::SipPbxSpec;

/// One pod as the scaling decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCalls {
    pub name: String,
    /// Active calls it reported; `None` when it could not be asked.
    pub active_calls: Option<i64>,
    /// The operator has marked it for draining.
    pub draining: bool,
    /// The pod itself reports that it is draining.
    pub reports_draining: bool,
}

/// Pods wanted for `total_active` calls: ceil(total / target), within min..=max.
pub fn recommend(total_active: i64, target_per_pod: i32, min: i32, max: i32) -> i32 {
    let target = i64::from(target_per_pod.max(1));
    let wanted = (total_active.max(0) + target - 1) / target;
    let wanted = i32::try_from(wanted).unwrap_or(i32::MAX);
    wanted.clamp(min, max.max(min))
}

/// Past recommendations of one SipPbx, for the scale-down stabilization window.
#[derive(Clone, Debug, Default)]
pub struct History {
    entries: Vec<(Instant, i32)>,
}

impl History {
    /// A history that starts with `replicas` at `now`: an operator that just
    /// started (or took over) waits a full window before scaling in.
    pub fn starting(now: Instant, replicas: i32) -> Self {
        History {
            entries: vec![(now, replicas)],
        }
    }

    /// Records `recommendation` at `now` and returns the replicas to use: the
    /// highest recommendation inside the last `window` (so scale-up is
    /// immediate and scale-down waits until the window has seen only lower
    /// values).
    pub fn stabilize(&mut self, now: Instant, window: Duration, recommendation: i32) -> i32 {
        self.entries
            .retain(|(at, _)| now.saturating_duration_since(*at) <= window);
        self.entries.push((now, recommendation));
        self.entries
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommendation)
    }
}

/// Replicas `spec` asks for: its own policy on the pods' calls when
/// autoscaling is on (stabilized through `history`), otherwise spec.replicas.
/// While some pod's calls are unknown the policy does not go below `current`:
/// a pod that did not answer is not a pod without calls.
pub fn desired_replicas(
    spec: &SipPbxSpec,
    pods: &[PodCalls],
    history: &mut History,
    now: Instant,
    current: i32,
) -> i32 {
    let a = &spec.autoscaling;
    if !a.enabled {
        return spec.replicas;
    }
    let total: i64 = pods.iter().filter_map(|p| p.active_calls).sum();
    let recommendation = recommend(
        total,
        a.target_active_calls_per_pod,
        a.min_replicas,
        a.max_replicas,
    );
    let window =
        Duration::from_secs(u64::try_from(a.scale_down_stabilization_seconds).unwrap_or(0));
    let stabilized = history.stabilize(now, window, recommendation);
    if pods.iter().any(|p| p.active_calls.is_none()) {
        stabilized.max(current)
    } else {
        stabilized
    }
}

/// The `count` pods a scale-in removes: pods already draining first, then the
/// fewest active calls (pods that did not answer count as busiest), ties by
/// name so repeated decisions agree.
pub fn pick_victims(pods: &[PodCalls], count: usize) -> Vec<String> {
    let mut order: Vec<&PodCalls> = pods.iter().collect();
    order.sort_by(|a, b| {
        b.draining
            .cmp(&a.draining)
            .then(
                a.active_calls
                    .unwrap_or(i64::MAX)
                    .cmp(&b.active_calls.unwrap_or(i64::MAX)),
            )
            .then(a.name.cmp(&b.name))
    });
    order
        .into_iter()
        .take(count)
        .map(|p| p.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Autoscaling;

    fn pod(name: &str, calls: Option<i64>, draining: bool) -> PodCalls {
        PodCalls {
            name: name.into(),
            active_calls: calls,
            draining,
            reports_draining: draining,
        }
    }

    #[test]
    fn recommendation_table() {
        // (total calls, target per pod, min, max, want)
        let cases = [
            (0, 50, 1, 10, 1),
            (1, 50, 1, 10, 1),
            (50, 50, 1, 10, 1),
            (51, 50, 1, 10, 2),
            (100, 50, 1, 10, 2),
            (101, 50, 1, 10, 3),
            (10_000, 50, 1, 10, 10),
            (0, 50, 3, 10, 3),
            (30, 10, 2, 2, 2),
            (-5, 10, 1, 4, 1),
        ];
        for (total, target, min, max, want) in cases {
            assert_eq!(
                recommend(total, target, min, max),
                want,
                "total={total} target={target} min={min} max={max}"
            );
        }
    }

    #[test]
    fn stabilization_delays_scale_down_but_not_scale_up() {
        let t0 = Instant::now();
        let window = Duration::from_secs(300);
        let mut h = History::default();
        // (seconds after t0, recommendation, replicas used)
        let steps = [
            (0, 4, 4),
            (10, 2, 4),
            (200, 1, 4),
            (299, 6, 6),
            (400, 3, 6),
            (600, 2, 3),
            (700, 2, 3),
            (901, 2, 2),
        ];
        for (secs, recommendation, want) in steps {
            let got = h.stabilize(t0 + Duration::from_secs(secs), window, recommendation);
            assert_eq!(got, want, "at {secs}s recommendation {recommendation}");
        }
    }

    #[test]
    fn new_history_holds_current_replicas_for_a_window() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut h = History::starting(t0, 4);
        assert_eq!(h.stabilize(t0 + Duration::from_secs(30), window, 1), 4);
        assert_eq!(h.stabilize(t0 + Duration::from_secs(61), window, 1), 1);
    }

    #[test]
    fn zero_window_follows_recommendation() {
        let t0 = Instant::now();
        let mut h = History::default();
        assert_eq!(h.stabilize(t0, Duration::ZERO, 5), 5);
        assert_eq!(
            h.stabilize(t0 + Duration::from_secs(1), Duration::ZERO, 2),
            2
        );
    }

    #[test]
    fn desired_replicas_table() {
        let mut spec: SipPbxSpec = serde_json::from_str(r#"{"replicas": 3}"#).expect("spec");
        let now = Instant::now();
        let calls = |c: &[Option<i64>]| -> Vec<PodCalls> {
            c.iter()
                .enumerate()
                .map(|(i, c)| pod(&format!("p{i}"), *c, false))
                .collect()
        };
        // Autoscaling off: spec.replicas, whatever the calls.
        let mut h = History::default();
        assert_eq!(
            desired_replicas(&spec, &calls(&[Some(900)]), &mut h, now, 1),
            3
        );
        spec.autoscaling = Autoscaling {
            enabled: true,
            min_replicas: 1,
            max_replicas: 5,
            target_active_calls_per_pod: 50,
            scale_down_stabilization_seconds: 0,
        };
        // (pods' calls, current replicas, want)
        let cases: [(&[Option<i64>], i32, i32); 6] = [
            (&[Some(120), Some(30)], 2, 3),
            (&[Some(10), Some(0)], 3, 1),
            (&[Some(10), None], 3, 3),
            (&[Some(200), None], 2, 4),
            (&[Some(1000)], 1, 5),
            (&[], 2, 1),
        ];
        for (i, (pods, current, want)) in cases.into_iter().enumerate() {
            let mut h = History::default();
            let at = now + Duration::from_secs(u64::try_from(i).unwrap_or(0));
            let got = desired_replicas(&spec, &calls(pods), &mut h, at, current);
            assert_eq!(got, want, "calls {pods:?} current {current}");
        }
    }

    #[test]
    fn victims_table() {
        let pods = [
            pod("p-a", Some(7), false),
            pod("p-b", Some(0), false),
            pod("p-c", Some(3), false),
            pod("p-d", None, false),
            pod("p-e", Some(3), false),
        ];
        let cases: [(usize, &[&str]); 5] = [
            (0, &[]),
            (1, &["p-b"]),
            (2, &["p-b", "p-c"]),
            (3, &["p-b", "p-c", "p-e"]),
            (5, &["p-b", "p-c", "p-e", "p-a", "p-d"]),
        ];
        for (count, want) in cases {
            assert_eq!(pick_victims(&pods, count), want, "count={count}");
        }
    }

    #[test]
    fn draining_pods_stay_victims() {
        let pods = [
            pod("p-a", Some(0), false),
            pod("p-b", Some(9), true),
            pod("p-c", Some(2), false),
        ];
        assert_eq!(pick_victims(&pods, 1), ["p-b"]);
        assert_eq!(pick_victims(&pods, 2), ["p-b", "p-a"]);
    }
}
