//! HTTP client for the PBX pods' own API: `GET /api/stats` (active calls,
//! draining) and `POST /api/drain` with the admin bearer token.

use std::time::Duration;

use serde::Deserialize;

/// What a pod's `/api/stats` reports that the operator uses.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct PodStats {
    pub active_calls: i64,
    #[serde(default)]
    pub draining: bool,
}

/// A pod's API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url}: answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
}

/// Client for the pods' HTTP API.
#[derive(Clone, Debug)]
pub struct StatsClient {
    http: reqwest::Client,
}

impl StatsClient {
    /// A client whose requests give up after `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(StatsClient { http })
    }

    /// `GET http://ip:port/api/stats`.
    pub async fn stats(&self, ip: &str, port: i32) -> Result<PodStats, StatsError> {
        let url = format!("http://{}/api/stats", host_port(ip, port));
        let response = self.http.get(&url).send().await;
        let response = checked(&url, response)?;
        response
            .json()
            .await
            .map_err(|source| StatsError::Http { url, source })
    }

    /// `POST http://ip:port/api/drain` with the bearer `token`.
    pub async fn drain(&self, ip: &str, port: i32, token: &str) -> Result<(), StatsError> {
        let url = format!("http://{}/api/drain", host_port(ip, port));
        let response = self.http.post(&url).bearer_auth(token).send().await;
        checked(&url, response).map(drop)
    }
}

fn checked(
    url: &str,
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<reqwest::Response, StatsError> {
    let response = response.map_err(|source| StatsError::Http {
        url: url.to_string(),
        source,
    })?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(StatsError::Status {
            url: url.to_string(),
            status: response.status(),
        })
    }
}

fn host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_json_with_extra_fields() {
        let s: PodStats = serde_json::from_str(
            r#"{"active_calls": 4, "draining": true, "total_calls": 99, "uptime": 5}"#,
        )
        .expect("parses");
        assert_eq!(
            s,
            PodStats {
                active_calls: 4,
                draining: true
            }
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert_eq!(host_port("10.0.0.1", 8080), "10.0.0.1:8080");
        assert_eq!(host_port("fd00::1", 8080), "[fd00::1]:8080");
    }
}
