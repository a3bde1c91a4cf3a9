//! Stands in for a PBX pod's HTTP API: `/api/stats` with a settable number of
//! active calls, and `/api/drain`, which records the bearer tokens it got.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;

#[derive(Default)]
struct Shared {
    calls: AtomicI64,
    draining: AtomicBool,
    drain_tokens: Mutex<Vec<String>>,
}

/// One fake pod API, served on `ip:port` until the test's runtime ends.
pub struct FakePbx {
    pub ip: String,
    shared: Arc<Shared>,
}

impl FakePbx {
    pub async fn start(ip: &str, port: u16, calls: i64) -> FakePbx {
        let shared = Arc::new(Shared::default());
        shared.calls.store(calls, Ordering::SeqCst);
        let app = Router::new()
            .route(
                "/api/stats",
                get(|State(s): State<Arc<Shared>>| async move {
                    let body = serde_json::json!({
                        "active_calls": s.calls.load(Ordering::SeqCst),
                        "draining": s.draining.load(Ordering::SeqCst),
                    });
                    ([("content-type", "application/json")], body.to_string())
                }),
            )
            .route(
                "/api/drain",
                post(
                    |State(s): State<Arc<Shared>>, headers: HeaderMap| async move {
                        let auth = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        s.drain_tokens.lock().expect("lock").push(auth);
                        s.draining.store(true, Ordering::SeqCst);
                        "draining"
                    },
                ),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind((ip, port))
            .await
            .unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakePbx {
            ip: ip.to_string(),
            shared,
        }
    }

    pub fn set_calls(&self, calls: i64) {
        self.shared.calls.store(calls, Ordering::SeqCst);
    }

    /// Authorization headers of the drain requests received.
    pub fn drain_requests(&self) -> Vec<String> {
        self.shared.drain_tokens.lock().expect("lock").clone()
    }
}
