//! The operator's own `/metrics` (Prometheus text) and `/health` endpoints.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

/// Counters the operator exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub drains_started: AtomicU64,
    pub scale_changes: AtomicU64,
    pub leader: AtomicBool,
}

impl Metrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition of all metrics.
    pub fn render(&self) -> String {
        let counters = [
            (
                "sip_pbx_operator_reconciles_total",
                "Reconciliations run.",
                &self.reconciles,
            ),
            (
                "sip_pbx_operator_reconcile_errors_total",
                "Reconciliations that failed.",
                &self.reconcile_errors,
            ),
            (
                "sip_pbx_operator_drains_started_total",
                "Pods told to drain for a scale-in.",
                &self.drains_started,
            ),
            (
                "sip_pbx_operator_scale_changes_total",
                "Changes of a Deployment's replicas.",
                &self.scale_changes,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in counters {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# HELP sip_pbx_operator_leader 1 while this replica holds the leader Lease.\n\
             # TYPE sip_pbx_operator_leader gauge\nsip_pbx_operator_leader {}\n",
            u8::from(self.leader.load(Ordering::Relaxed))
        ));
        out
    }
}

/// Serves `/metrics` and `/health` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.render() }),
        )
        .with_state(metrics);
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_leader() {
        let m = Metrics::default();
        Metrics::inc(&m.reconciles);
        Metrics::inc(&m.reconciles);
        m.leader.store(true, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("sip_pbx_operator_reconciles_total 2\n"));
        assert!(text.contains("sip_pbx_operator_reconcile_errors_total 0\n"));
        assert!(text.contains("sip_pbx_operator_leader 1\n"));
    }
}
