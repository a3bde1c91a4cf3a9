use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use chrono::Utc;
use prometheus_parse::{Scrape, Value};
use reqwest::StatusCode;
use serde_json::Value as Json;

use super::*;
use crate::config::Config;
use crate::events::Event;
use crate::test_support::{answered, busy, eventually, parties, TempDir};

struct Pbx {
    observers: Observers,
    bus: EventBus,
    status: Arc<PbxStatus>,
    stop: watch::Sender<bool>,
    _dir: TempDir,
}

impl Pbx {
    async fn start(admin_token: Option<&str>) -> Self {
        let dir = TempDir::new("observers");
        let mut config = Config::default();
        config.monitoring.health_check_port = 0;
        config.monitoring.prometheus_port = 0;
        config.cdr.output_dir = dir.path().join("cdr").display().to_string();
        if let Some(token) = admin_token {
            let path = dir.path().join("token");
            std::fs::write(&path, format!("{token}\n")).expect("token file");
            config.monitoring.admin_token_file = path.display().to_string();
        }
        let mut bus = EventBus::default();
        let status = Arc::new(PbxStatus::default());
        let (stop, shutdown) = watch::channel(false);
        let options = StartOptions {
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            cdr: CdrWriterOptions {
                pod: "test-0".into(),
                ..CdrWriterOptions::default()
            },
            webhook: WebhookOptions::default(),
            webhook_secret_env: None,
        };
        let observers = start_with(&config, &mut bus, Arc::clone(&status), shutdown, options)
            .await
            .expect("observers start");
        Self {
            observers,
            bus,
            status,
            stop,
            _dir: dir,
        }
    }

    fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.observers.api_addr)
    }

    async fn get(&self, path: &str) -> (StatusCode, Json) {
        let response = reqwest::get(self.api(path)).await.expect("request");
        let status = response.status();
        (status, response.json().await.expect("json body"))
    }

    async fn drain(&self, token: Option<&str>) -> (StatusCode, Json) {
        let mut request = reqwest::Client::new().post(self.api("/api/drain"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.expect("json body"))
    }

    async fn scrape(&self) -> Scrape {
        let url = format!("http://{}/metrics", self.observers.metrics_addr);
        let response = reqwest::get(url).await.expect("scrape");
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("text");
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("prometheus text")
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        self.observers.join().await;
    }
}

/// The value of a counter, gauge or untyped sample with one label (or none).
fn value(scrape: &Scrape, metric: &str, label: Option<(&str, &str)>) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .and_then(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[tokio::test]
async fn metrics_are_scraped_and_move_with_calls() {
    let pbx = Pbx::start(None).await;
    let before = pbx.scrape().await;
    for metric in [
        "sip_pbx_active_calls",
        "sip_pbx_total_calls",
        "sip_pbx_call_duration_seconds_count",
        "sip_pbx_media_packets_total",
    ] {
        assert_eq!(value(&before, metric, None), Some(0.0), "{metric}");
    }
    assert_eq!(
        value(&before, "sip_pbx_errors_total", Some(("kind", "transport"))),
        Some(0.0)
    );

    let metrics = &pbx.observers.metrics;
    for id in ["m1", "m2", "m3"] {
        pbx.bus.publish(Event::CallStarted { call: parties(id) });
    }
    pbx.bus.publish(answered("m1", Utc::now(), 42));
    pbx.bus.publish(busy("m2", Utc::now()));
    metrics.media_packets(100);
    metrics.error("transport");
    metrics.sip_request("INVITE");
    metrics.sip_request("invite");
    metrics.sip_request("BOGUS");
    metrics.sip_response(486);
    metrics.set_transactions(4);
    metrics.auth_failure();
    pbx.status.registrations.store(7, Ordering::Relaxed);
    pbx.status.ports_capacity.store(10000, Ordering::Relaxed);
    pbx.status.ports_in_use.store(4, Ordering::Relaxed);

    let after = eventually("call metrics to follow the events", 5, || async {
        let scrape = pbx.scrape().await;
        (value(&scrape, "sip_pbx_total_calls", None) == Some(3.0)
            && value(&scrape, "sip_pbx_active_calls", None) == Some(1.0))
        .then_some(scrape)
    })
    .await;
    let at = |metric, label| value(&after, metric, label);
    assert_eq!(at("sip_pbx_call_duration_seconds_count", None), Some(1.0));
    assert_eq!(at("sip_pbx_call_duration_seconds_sum", None), Some(42.0));
    assert_eq!(at("sip_pbx_media_packets_total", None), Some(100.0));
    assert_eq!(
        at("sip_pbx_errors_total", Some(("kind", "transport"))),
        Some(1.0)
    );
    assert_eq!(
        at("sip_pbx_sip_requests_total", Some(("method", "INVITE"))),
        Some(2.0)
    );
    assert_eq!(
        at("sip_pbx_sip_requests_total", Some(("method", "other"))),
        Some(1.0)
    );
    assert_eq!(
        at("sip_pbx_sip_responses_total", Some(("code", "486"))),
        Some(1.0)
    );
    assert_eq!(at("sip_pbx_transactions", None), Some(4.0));
    assert_eq!(at("sip_pbx_auth_failures_total", None), Some(1.0));
    assert_eq!(at("sip_pbx_registrations", None), Some(7.0));
    assert_eq!(at("sip_pbx_rtp_ports_in_use", None), Some(4.0));
    assert_eq!(at("sip_pbx_rtp_ports_capacity", None), Some(10000.0));
    assert_eq!(at("sip_pbx_draining", None), Some(0.0));
    assert_eq!(at("sip_pbx_cdr_write_errors_total", None), Some(0.0));
    assert_eq!(
        at(
            "sip_pbx_webhook_deliveries_total",
            Some(("result", "failed"))
        ),
        Some(0.0)
    );
    let histogram = after
        .samples
        .iter()
        .find(|s| s.metric == "sip_pbx_call_duration_seconds")
        .expect("histogram");
    assert!(matches!(&histogram.value, Value::Histogram(buckets) if !buckets.is_empty()));
    pbx.stop().await;
}

#[tokio::test]
async fn health_ready_stats_and_unknown_paths() {
    let pbx = Pbx::start(None).await;
    let (code, body) = pbx.get("/health").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["status"], "healthy");
    let (code, body) = pbx.get("/ready").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"ready": true, "draining": false}));

    pbx.status.active_calls.store(3, Ordering::Relaxed);
    pbx.status.total_calls.store(11, Ordering::Relaxed);
    pbx.status.ports_capacity.store(100, Ordering::Relaxed);
    let (code, body) = pbx.get("/api/stats").await;
    assert_eq!(code, StatusCode::OK);
    let stats: http::Stats = serde_json::from_value(body).expect("stats shape");
    assert_eq!(stats.active_calls, 3);
    assert_eq!(stats.total_calls, 11);
    assert_eq!(stats.ports_capacity, 100);
    assert_eq!(stats.max_concurrent_calls, 100);
    assert!(!stats.draining);

    let (code, body) = pbx.get("/no/such/path").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    let (code, body) = pbx.get("/api/drain").await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_string());
    let (code, _) = pbx.drain(Some("anything")).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "no token configured");
    assert!(!pbx.status.draining());
    pbx.stop().await;
}

#[tokio::test]
async fn recent_cdrs_honour_the_limit() {
    let pbx = Pbx::start(None).await;
    for i in 0..60 {
        pbx.bus.publish(busy(&format!("r{i}"), Utc::now()));
    }
    let (_, body) = eventually("60 recent records", 5, || async {
        let (code, body) = pbx.get("/api/cdr/recent?limit=1000").await;
        (body["count"] == 60).then_some((code, body))
    })
    .await;
    assert_eq!(body["records"][0]["call_id"], "r59", "newest first");
    let (code, body) = pbx.get("/api/cdr/recent").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["count"], 50);
    let (_, body) = pbx.get("/api/cdr/recent?limit=2").await;
    assert_eq!(body["records"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["records"][1]["disposition"], "busy");
    for bad in ["0", "1001", "-1", "abc", "", "1e3"] {
        let (code, body) = pbx.get(&format!("/api/cdr/recent?limit={bad}")).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "limit={bad}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("limit")));
    }
    pbx.stop().await;
}

#[tokio::test]
async fn drain_needs_the_token_and_keeps_the_pod_ready() {
    let pbx = Pbx::start(Some("t0ken")).await;
    for token in [None, Some("wrong"), Some("t0ke")] {
        let (code, body) = pbx.drain(token).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}");
        assert!(body["error"].is_string());
    }
    assert!(!pbx.status.draining());
    let (code, body) = pbx.drain(Some("t0ken")).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!(body["draining"], true);
    assert!(pbx.status.draining());
    let (_, stats) = pbx.get("/api/stats").await;
    assert_eq!(stats["draining"], true);
    let (code, ready) = pbx.get("/ready").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(ready["draining"], true);
    let scrape = pbx.scrape().await;
    assert_eq!(value(&scrape, "sip_pbx_draining", None), Some(1.0));
    let (code, _) = pbx.drain(Some("t0ken")).await;
    assert_eq!(code, StatusCode::ACCEPTED, "draining again is harmless");
    pbx.stop().await;
}

#[tokio::test]
async fn a_port_in_use_is_a_typed_error_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut config = Config::default();
    config.monitoring.health_check_port = port;
    config.cdr.enabled = false;
    let options = StartOptions {
        listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        ..StartOptions::default()
    };
    let (_stop, shutdown) = watch::channel(false);
    let err = start_with(
        &config,
        &mut EventBus::default(),
        Arc::new(PbxStatus::default()),
        shutdown,
        options,
    )
    .await
    .expect_err("port is taken");
    assert!(matches!(
        err,
        StartError::Bind {
            key: "health_check_port",
            ..
        }
    ));
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}
