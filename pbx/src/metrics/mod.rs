//! Prometheus metrics: owns the registry, the `Metrics` handle that the core
//! and the other observers increment, the call metrics fed from the event
//! stream, and the `/metrics` endpoint. Gauges that mirror `PbxStatus`
//! (registrations, RTP ports, draining) are read at scrape time, so they can
//! never drift from what `/api/stats` reports.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::events::{Event, Subscription};
use crate::status::PbxStatus;

/// SIP methods that get their own label value; anything else a peer sends
/// is counted as "other" so that a hostile peer cannot grow the label set.
const KNOWN_METHODS: [&str; 14] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "UPDATE",
    "PRACK",
    "OPTIONS",
    "REGISTER",
    "INFO",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
];

/// The `kind` values of `sip_pbx_errors_total`, exported at zero from the
/// start so that alerts on `rate()` work before the first error.
pub const ERROR_KINDS: [&str; 7] = [
    "sip_parse",
    "transport",
    "transaction_timeout",
    "media",
    "registrar",
    "internal",
    "webhook_spool",
];

/// Upper bounds of the call duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// Outcome of one webhook delivery attempt, the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryResult {
    /// The receiver answered 2xx.
    Delivered,
    /// Connection error, timeout or a retryable status; the event stays spooled.
    Failed,
    /// The receiver refused the event for good (4xx other than 408/429).
    Rejected,
}

impl DeliveryResult {
    fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }
}

/// Cheap-to-clone handle on every metric of the PBX.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    status: Arc<PbxStatus>,
    active_calls: IntGauge,
    total_calls: IntCounter,
    call_duration: Histogram,
    media_packets: IntCounter,
    errors: IntCounterVec,
    sip_requests: IntCounterVec,
    sip_responses: IntCounterVec,
    transactions: IntGauge,
    registrations: IntGauge,
    auth_failures: IntCounter,
    rtp_ports_in_use: IntGauge,
    rtp_ports_capacity: IntGauge,
    webhook_deliveries: IntCounterVec,
    cdr_write_errors: IntCounter,
    draining: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    // Names are constants of this module and unique, so registration cannot
    // fail at run time; a clash would be caught by the tests.
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).expect("valid metric name"),
    )
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid metric name"),
    )
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric name"),
    )
}

impl Metrics {
    pub fn new(status: Arc<PbxStatus>) -> Self {
        let r = Registry::new();
        let call_duration = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "sip_pbx_call_duration_seconds",
                    "Duration of answered calls, from answer to end",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
            )
            .expect("valid histogram"),
        );
        let errors = counter_vec(&r, "sip_pbx_errors_total", "Errors by kind", "kind");
        for kind in ERROR_KINDS {
            errors.with_label_values(&[kind]);
        }
        let webhook_deliveries = counter_vec(
            &r,
            "sip_pbx_webhook_deliveries_total",
            "Webhook delivery attempts, by result",
            "result",
        );
        for result in [
            DeliveryResult::Delivered,
            DeliveryResult::Failed,
            DeliveryResult::Rejected,
        ] {
            webhook_deliveries.with_label_values(&[result.label()]);
        }
        let inner = Inner {
            active_calls: gauge(&r, "sip_pbx_active_calls", "Calls in progress"),
            total_calls: counter(&r, "sip_pbx_total_calls", "Calls started"),
            call_duration,
            media_packets: counter(
                &r,
                "sip_pbx_media_packets_total",
                "RTP/RTCP packets relayed",
            ),
            errors,
            sip_requests: counter_vec(
                &r,
                "sip_pbx_sip_requests_total",
                "SIP requests received, by method",
                "method",
            ),
            sip_responses: counter_vec(
                &r,
                "sip_pbx_sip_responses_total",
                "SIP responses sent, by status code",
                "code",
            ),
            transactions: gauge(&r, "sip_pbx_transactions", "SIP transactions in progress"),
            registrations: gauge(&r, "sip_pbx_registrations", "Active registrations"),
            auth_failures: counter(
                &r,
                "sip_pbx_auth_failures_total",
                "Digest authentication failures",
            ),
            rtp_ports_in_use: gauge(&r, "sip_pbx_rtp_ports_in_use", "RTP relay ports allocated"),
            rtp_ports_capacity: gauge(
                &r,
                "sip_pbx_rtp_ports_capacity",
                "RTP relay ports in the pool",
            ),
            webhook_deliveries,
            cdr_write_errors: counter(
                &r,
                "sip_pbx_cdr_write_errors_total",
                "Failed attempts to write or sync CDR records",
            ),
            draining: gauge(&r, "sip_pbx_draining", "1 while the pod is draining"),
            registry: r,
            status,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// A SIP request received from the network (retransmissions included).
    pub fn sip_request(&self, method: &str) {
        let label = KNOWN_METHODS
            .iter()
            .find(|m| m.eq_ignore_ascii_case(method))
            .copied()
            .unwrap_or("other");
        self.inner.sip_requests.with_label_values(&[label]).inc();
    }

    /// A SIP response sent by the PBX, its own or relayed.
    pub fn sip_response(&self, code: u16) {
        let label = if (100..700).contains(&code) {
            code.to_string()
        } else {
            "other".to_string()
        };
        self.inner.sip_responses.with_label_values(&[&label]).inc();
    }

    /// Current size of the transaction table.
    pub fn set_transactions(&self, count: usize) {
        self.inner.transactions.set(saturating_i64(count));
    }

    /// An error worth alerting on; `kind` is one of [`ERROR_KINDS`] (another
    /// fixed string works but starts at 1 rather than 0).
    pub fn error(&self, kind: &'static str) {
        self.inner.errors.with_label_values(&[kind]).inc();
    }

    pub fn auth_failure(&self) {
        self.inner.auth_failures.inc();
    }

    /// Packets relayed by the media relay; call it per batch, not per packet,
    /// where the relay already counts.
    pub fn media_packets(&self, count: u64) {
        self.inner.media_packets.inc_by(count);
    }

    pub fn webhook_delivery(&self, result: DeliveryResult) {
        self.inner
            .webhook_deliveries
            .with_label_values(&[result.label()])
            .inc();
    }

    pub fn webhook_deliveries(&self, result: DeliveryResult) -> u64 {
        self.inner
            .webhook_deliveries
            .with_label_values(&[result.label()])
            .get()
    }

    pub fn cdr_write_error(&self) {
        self.inner.cdr_write_errors.inc();
    }

    pub fn cdr_write_errors(&self) -> u64 {
        self.inner.cdr_write_errors.get()
    }

    /// Applies one event to the call metrics.
    pub fn observe(&self, event: &Event) {
        match event {
            Event::CallStarted { .. } => {
                self.inner.total_calls.inc();
                self.inner.active_calls.inc();
            }
            Event::CallEnded { summary, .. } => {
                self.inner.active_calls.dec();
                if summary.answer_time.is_some() {
                    self.inner.call_duration.observe(summary.duration.max(0.0));
                }
            }
            _ => {}
        }
    }

    /// The Prometheus text exposition of every metric, status gauges fresh.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let status = &self.inner.status;
        let load = |v: &std::sync::atomic::AtomicUsize| saturating_i64(v.load(Ordering::Relaxed));
        self.inner.registrations.set(load(&status.registrations));
        self.inner.rtp_ports_in_use.set(load(&status.ports_in_use));
        self.inner
            .rtp_ports_capacity
            .set(load(&status.ports_capacity));
        self.inner.draining.set(i64::from(status.draining()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.inner.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    /// The router serving `GET /metrics`.
    pub fn router(&self) -> Router {
        crate::http::with_json_fallbacks(Router::new().route("/metrics", get(scrape)))
            .with_state(self.clone())
    }
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn scrape(State(metrics): State<Metrics>) -> Response {
    match metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics: cannot encode");
            crate::http::json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics")
        }
    }
}

/// Feeds the call metrics from the event stream until it ends.
pub async fn run_call_metrics(metrics: Metrics, mut events: Subscription) {
    while let Some(envelope) = events.recv().await {
        metrics.observe(&envelope.event);
    }
}
