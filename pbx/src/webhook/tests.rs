use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::*;
use crate::events::EventBus;
use crate::status::PbxStatus;
use crate::test_support::{answered, eventually, parties, utc, TempDir};

const SECRET: &str = "s3cret";

/// What a test receiver got: the signature header and the body.
type Received = Arc<Mutex<Vec<(Option<String>, Vec<u8>)>>>;

async fn record(State(got): State<Received>, headers: HeaderMap, body: Bytes) -> &'static str {
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    got.lock().expect("lock").push((signature, body.to_vec()));
    "ok"
}

/// A webhook receiver on `listener` that answers 200 to everything.
fn receiver(listener: TcpListener) -> Received {
    let got = Received::default();
    let app = Router::new()
        .route("/hook", post(record))
        .with_state(Arc::clone(&got));
    tokio::spawn(async move { axum::serve(listener, app).await });
    got
}

/// A receiver that takes requests and never answers.
async fn hanging_receiver() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().route("/hook", post(std::future::pending::<()>));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A loopback address nobody listens on (yet).
fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.local_addr().expect("addr")
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/hook")
}

struct Running {
    bus: EventBus,
    stop: watch::Sender<bool>,
    dispatcher: WebhookDispatcher,
    metrics: Metrics,
}

impl Running {
    async fn stop(self) {
        self.stop.send_replace(true);
        self.dispatcher.join().await;
    }
}

fn start(urls: &[String], spool: &Path) -> Running {
    let config = EventsConfig {
        webhook_urls: urls.to_vec(),
        webhook_timeout: 1,
        webhook_retries: 2,
        webhook_secret: String::new(),
        spool_dir: spool.display().to_string(),
    };
    let options = WebhookOptions {
        pod: "pbx-0".into(),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
    };
    let mut bus = EventBus::default();
    let metrics = Metrics::new(Arc::new(PbxStatus::default()));
    let (stop, shutdown) = watch::channel(false);
    let dispatcher = WebhookDispatcher::spawn(
        &config,
        resolve_secret("", Some(SECRET.into())),
        options,
        metrics.clone(),
        bus.subscribe(),
        shutdown,
    )
    .expect("dispatcher starts");
    Running {
        bus,
        stop,
        dispatcher,
        metrics,
    }
}

fn publish_call(bus: &EventBus, call_id: &str) {
    let end = utc(2026, 11, 26, 10, 0, 0);
    bus.publish(Event::CallStarted {
        call: parties(call_id),
    });
    bus.publish(Event::CallAnswered {
        call: parties(call_id),
        codec: Some("PCMU".into()),
    });
    bus.publish(answered(call_id, end, 30));
}

/// The bodies once `count` have arrived, each checked for its signature.
async fn bodies(got: &Received, count: usize) -> Vec<Value> {
    let received = eventually(&format!("{count} webhook posts"), 10, || {
        let got = got.lock().expect("lock").clone();
        async move { (got.len() >= count).then_some(got) }
    })
    .await;
    assert_eq!(received.len(), count, "no duplicates");
    received
        .iter()
        .map(|(sig, body)| {
            assert_eq!(sig.as_deref(), Some(signature(SECRET, body).as_str()));
            serde_json::from_slice(body).expect("json body")
        })
        .collect()
}

fn types(bodies: &[Value]) -> Vec<String> {
    bodies
        .iter()
        .map(|b| format!("{}:{}", b["type"].as_str().unwrap_or("?"), b["call_id"]))
        .collect()
}

/// What `types` shows for the events of `publish_call`.
fn call_types(call_id: &str) -> Vec<String> {
    ["call.started", "call.answered", "call.ended"]
        .iter()
        .map(|t| format!("{t}:\"{call_id}\""))
        .collect()
}

fn spooled(spool: &Path) -> usize {
    std::fs::read_dir(spool.join("pbx-0"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| f.file_name().to_string_lossy().ends_with(".json"))
        .count()
}

async fn wait_spooled(spool: &Path, count: usize) {
    eventually(&format!("{count} spooled events"), 5, || {
        let n = spooled(spool);
        async move { (n == count).then_some(()) }
    })
    .await;
}

#[test]
fn signature_is_hex_hmac_sha256_and_env_overrides_config() {
    // RFC 4231 test case 2.
    assert_eq!(
        signature("Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_eq!(
        resolve_secret("file", Some("env".into())).as_deref(),
        Some("env")
    );
    assert_eq!(resolve_secret("file", None).as_deref(), Some("file"));
    assert_eq!(
        resolve_secret("file", Some(String::new())).as_deref(),
        Some("file")
    );
    assert_eq!(resolve_secret("", None), None);
}

#[test]
fn registration_payloads_have_no_call() {
    let envelope = Envelope {
        id: "id-1".into(),
        timestamp: utc(2026, 11, 26, 10, 0, 0),
        event: Event::RegistrationCreated {
            aor: "sip:1001@pbx.local".into(),
            contact: "sip:1001@10.0.0.5:5060".into(),
            expires: 3600,
            source: "10.0.0.5:5060".into(),
        },
    };
    let body = payload(&envelope);
    assert_eq!(body["type"], "registration.created");
    assert_eq!(body["id"], "id-1");
    assert_eq!(body["timestamp"], "2026-11-26T10:00:00Z");
    assert!(body["call_id"].is_null() && body["caller"].is_null() && body["callee"].is_null());
    assert_eq!(body["data"]["aor"], "sip:1001@pbx.local");
    assert_eq!(body["data"]["contact"], "sip:1001@10.0.0.5:5060");
    assert_eq!(body["data"]["expires"], 3600);
    assert_eq!(body["data"]["source"], "10.0.0.5:5060");
}

#[tokio::test]
async fn call_events_arrive_in_order_and_signed() {
    let spool = TempDir::new("hook-order");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = receiver(listener);
    let running = start(&[url(addr)], spool.path());
    publish_call(&running.bus, "c1");
    let bodies = bodies(&got, 3).await;
    assert_eq!(types(&bodies), call_types("c1"));
    assert_eq!(bodies[1]["data"]["codec"], "PCMU");
    assert_eq!(bodies[2]["caller"], "sip:1001@pbx.local");
    assert_eq!(bodies[2]["callee"], "1002");
    assert_eq!(bodies[2]["data"]["disposition"], "answered");
    assert_eq!(bodies[2]["data"]["duration"], 30.0);
    assert_ne!(bodies[0]["id"], bodies[1]["id"]);
    wait_spooled(spool.path(), 0).await;
    assert_eq!(
        running
            .metrics
            .webhook_deliveries(DeliveryResult::Delivered),
        3
    );
    running.stop().await;
}

#[tokio::test]
async fn events_wait_for_a_receiver_that_is_down() {
    let spool = TempDir::new("hook-down");
    let addr = free_addr();
    let running = start(&[url(addr)], spool.path());
    publish_call(&running.bus, "c2");
    let metrics = running.metrics.clone();
    // Past the configured retries: the event must still not be dropped.
    eventually("failed attempts beyond the retries", 10, || {
        let failed = metrics.webhook_deliveries(DeliveryResult::Failed);
        async move { (failed >= 4).then_some(()) }
    })
    .await;
    assert_eq!(spooled(spool.path()), 3);
    let got = receiver(TcpListener::bind(addr).await.expect("rebind"));
    let bodies = bodies(&got, 3).await;
    assert_eq!(types(&bodies), call_types("c2"));
    running.stop().await;
}

#[tokio::test]
async fn spooled_events_survive_a_dispatcher_restart() {
    let spool = TempDir::new("hook-restart");
    let addr = free_addr();
    let first = start(&[url(addr)], spool.path());
    publish_call(&first.bus, "c3");
    wait_spooled(spool.path(), 3).await;
    first.stop().await;
    assert_eq!(spooled(spool.path()), 3, "kept across the stop");

    let got = receiver(TcpListener::bind(addr).await.expect("rebind"));
    let second = start(&[url(addr)], spool.path());
    second.bus.publish(Event::CallStarted {
        call: parties("c4"),
    });
    let bodies = bodies(&got, 4).await;
    let mut expected = call_types("c3");
    expected.push("call.started:\"c4\"".into());
    assert_eq!(types(&bodies), expected);
    second.stop().await;
}

#[tokio::test]
async fn a_hanging_receiver_blocks_neither_calls_nor_other_receivers() {
    let spool = TempDir::new("hook-hang");
    let hanging = hanging_receiver().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let healthy = listener.local_addr().expect("addr");
    let got = receiver(listener);
    let running = start(&[url(hanging), url(healthy)], spool.path());

    let begun = Instant::now();
    for i in 0..50 {
        publish_call(&running.bus, &format!("h{i}"));
    }
    assert!(
        begun.elapsed() < Duration::from_millis(500),
        "publishing took {:?}",
        begun.elapsed()
    );
    let bodies = bodies(&got, 150).await;
    assert_eq!(bodies[149]["call_id"], "h49");
    assert_eq!(
        running
            .metrics
            .webhook_deliveries(DeliveryResult::Delivered),
        150,
        "the hanging receiver got none"
    );
    running.stop().await;
}
