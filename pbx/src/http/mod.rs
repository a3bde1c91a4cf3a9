//! The HTTP API on `monitoring.health_check_port`: health and readiness for
//! Kubernetes, live stats for the operator's autoscaler, recent CDRs, and
//! the authenticated drain switch. Every answer, errors included, is JSON.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use crate::cdr::{RecentCdrs, RECENT_CAPACITY};
use crate::status::PbxStatus;

/// Records `GET /api/cdr/recent` returns without `limit`.
pub const DEFAULT_RECENT_LIMIT: usize = 50;

/// Why the admin token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("monitoring.admin_token_file: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("monitoring.admin_token_file: {path} is empty")]
    Empty { path: PathBuf },
}

/// Where the bearer token of `POST /api/drain` lives. The file is read on
/// every request so that a rotated Secret takes effect without a restart.
#[derive(Debug, Clone)]
pub struct AdminToken {
    path: PathBuf,
}

impl AdminToken {
    /// `None` for an empty setting (drain endpoint disabled); an error when
    /// the file cannot be read now, so that a wrong mount fails start-up.
    pub fn from_config(admin_token_file: &str) -> Result<Option<Self>, TokenError> {
        if admin_token_file.trim().is_empty() {
            return Ok(None);
        }
        let token = Self {
            path: PathBuf::from(admin_token_file),
        };
        token.read()?;
        Ok(Some(token))
    }

    fn read(&self) -> Result<String, TokenError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| TokenError::Read {
            path: self.path.clone(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty {
                path: self.path.clone(),
            });
        }
        Ok(token.to_string())
    }
}

/// What the API reads.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub status: Arc<PbxStatus>,
    pub recent: RecentCdrs,
    pub admin_token: Option<AdminToken>,
    pub max_concurrent_calls: usize,
}

/// The body of `GET /api/stats` (and of the drain answer).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    pub active_calls: usize,
    pub total_calls: u64,
    pub max_concurrent_calls: usize,
    pub uptime_seconds: u64,
    pub draining: bool,
    pub ports_in_use: usize,
    pub ports_capacity: usize,
    pub registrations: usize,
    pub version: String,
}

impl Stats {
    pub fn of(state: &ApiState) -> Self {
        let s = &state.status;
        Self {
            active_calls: s.active_calls.load(Ordering::Relaxed),
            total_calls: s.total_calls.load(Ordering::Relaxed),
            max_concurrent_calls: state.max_concurrent_calls,
            uptime_seconds: s.started.elapsed().as_secs(),
            draining: s.draining(),
            ports_in_use: s.ports_in_use.load(Ordering::Relaxed),
            ports_capacity: s.ports_capacity.load(Ordering::Relaxed),
            registrations: s.registrations.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// `{"error": message}` with a status.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not found")
}

async fn method_not_allowed() -> Response {
    json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// Unknown paths and methods get JSON errors too, on every server.
pub fn with_json_fallbacks<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

pub fn router(state: ApiState) -> Router {
    let routes = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/api/stats", get(stats))
        .route("/api/cdr/recent", get(recent_cdrs))
        .route("/api/drain", post(drain));
    with_json_fallbacks(routes).with_state(Arc::new(state))
}

async fn health(State(state): State<Arc<ApiState>>) -> Response {
    Json(json!({
        "status": "healthy",
        "uptime_seconds": state.status.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

/// Ready stays 200 while draining: see the drain contract (conntrack flush
/// of endpoints that stop serving would cut the calls being drained).
async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    Json(json!({ "ready": true, "draining": state.status.draining() })).into_response()
}

async fn stats(State(state): State<Arc<ApiState>>) -> Response {
    Json(Stats::of(&state)).into_response()
}

fn parse_limit(query: &HashMap<String, String>) -> Result<usize, String> {
    let Some(raw) = query.get("limit") else {
        return Ok(DEFAULT_RECENT_LIMIT);
    };
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=RECENT_CAPACITY).contains(&n) => Ok(n),
        _ => Err(format!(
            "limit must be an integer from 1 to {RECENT_CAPACITY}, got {raw:?}"
        )),
    }
}

async fn recent_cdrs(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let limit = match query {
        Ok(Query(query)) => parse_limit(&query),
        Err(rejection) => Err(rejection.body_text()),
    };
    match limit {
        Ok(limit) => {
            let records = state.recent.latest(limit);
            Json(json!({ "count": records.len(), "records": records })).into_response()
        }
        Err(message) => json_error(StatusCode::BAD_REQUEST, &message),
    }
}

/// Compares without an early exit so that the time taken does not reveal
/// how much of a guessed token was right.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn drain(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let Some(admin_token) = &state.admin_token else {
        return json_error(
            StatusCode::FORBIDDEN,
            "draining over HTTP is disabled: monitoring.admin_token_file is not set",
        );
    };
    let expected = match admin_token.read() {
        Ok(token) => token,
        Err(e) => {
            tracing::error!(error = %e, "http: cannot read the admin token");
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the admin token cannot be read",
            );
        }
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !given.is_some_and(|t| same_token(t.as_bytes(), expected.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": "a valid bearer token is required" })),
        )
            .into_response();
    }
    if state.status.start_drain() {
        tracing::info!("http: drain requested over the API");
    }
    (StatusCode::ACCEPTED, Json(Stats::of(&state))).into_response()
}
