//! Digest authentication of out-of-dialog requests (RFC 3261 §22 with the
//! algorithms of RFC 7616 / RFC 8760): stateless nonces HMAC'd with a
//! per-process key that expire (answered `stale=true`), nonce-count replay
//! checks, one challenge per configured algorithm, trusted source
//! networks that skip the challenge, and blocking of source addresses
//! after repeated failures (brute force, toll fraud).

pub mod digest;
pub mod users;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;

use self::digest::{Algorithm, Credentials};
use self::users::Directory;
use crate::config::{parse_cidr, AuthConfig};
use crate::metrics::Metrics;
use crate::sip::message::{Message, Method};
use crate::sip::uri::NameAddr;

/// Forget nonce counts and stale failure counts this often.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on; the authenticated account, or None for a trusted source (or
    /// authentication off).
    Pass(Option<String>),
    /// Answer 401 (REGISTER) or 407 with fresh challenges.
    Challenge { stale: bool },
    /// Answer 403: the source is blocked, or the caller used an identity
    /// that is not its own.
    Forbidden(&'static str),
}

struct NonceUse {
    issued: u64,
    highest_nc: u32,
}

#[derive(Default)]
struct Failures {
    count: u32,
    last: Option<Instant>,
    blocked_until: Option<Instant>,
}

pub struct Authenticator {
    enabled: bool,
    realm: String,
    algorithms: Vec<Algorithm>,
    trusted: Vec<IpNet>,
    directory: Directory,
    key: [u8; 32],
    nonce_lifetime: u64,
    nonces: HashMap<String, NonceUse>,
    failures: HashMap<IpAddr, Failures>,
    max_failures: u32,
    block: Duration,
    last_prune: Instant,
    metrics: Option<Metrics>,
}

impl Authenticator {
    pub fn new(
        config: &AuthConfig,
        realm: &str,
        directory: Directory,
        metrics: Option<Metrics>,
    ) -> Self {
        Self {
            enabled: config.enabled,
            realm: realm.to_string(),
            algorithms: config
                .algorithms
                .iter()
                .filter_map(|a| Algorithm::parse(a))
                .collect(),
            trusted: config
                .trusted_cidrs
                .iter()
                .filter_map(|c| parse_cidr(c))
                .collect(),
            directory,
            key: rand::random(),
            nonce_lifetime: config.nonce_seconds.max(1),
            nonces: HashMap::new(),
            failures: HashMap::new(),
            max_failures: config.max_failures.max(1),
            block: Duration::from_secs(config.block_seconds),
            last_prune: Instant::now(),
            metrics,
        }
    }

    /// Checks an out-of-dialog request from `source`.
    pub fn check(&mut self, request: &Message, source: IpAddr, now: Instant) -> Verdict {
        if !self.enabled || self.trusted.iter().any(|net| net.contains(&source)) {
            return Verdict::Pass(None);
        }
        self.prune(now);
        if self.is_blocked(source, now) {
            return Verdict::Forbidden("blocked after repeated authentication failures");
        }
        let register = request.method() == Some(&Method::Register);
        let names = if register {
            ["Authorization", "Proxy-Authorization"]
        } else {
            ["Proxy-Authorization", "Authorization"]
        };
        let credentials = names
            .iter()
            .flat_map(|name| request.headers.get_all(name))
            .filter_map(|value| Credentials::parse(value).ok())
            .find(|c| c.realm == self.realm);
        let Some(credentials) = credentials else {
            return Verdict::Challenge { stale: false };
        };
        let algorithm = match credentials.algorithm.as_deref() {
            None => Some(Algorithm::Md5),
            Some(name) => Algorithm::parse(name),
        }
        .filter(|a| self.algorithms.contains(a));
        let Some(algorithm) = algorithm else {
            return Verdict::Challenge { stale: false };
        };
        let Some(issued) = self.nonce_issued(&credentials.nonce) else {
            return Verdict::Challenge { stale: true };
        };
        if unix_now().saturating_sub(issued) > self.nonce_lifetime {
            return Verdict::Challenge { stale: true };
        }
        if credentials.qop.as_deref() != Some("auth") {
            return Verdict::Challenge { stale: false };
        }
        let Some(nc) = credentials
            .nc
            .as_deref()
            .and_then(|nc| u32::from_str_radix(nc, 16).ok())
        else {
            return Verdict::Challenge { stale: false };
        };
        let method = request.method().map(Method::as_str).unwrap_or_default();
        let matches = self
            .directory
            .get(&credentials.username)
            .and_then(|account| account.ha1(algorithm).map(str::to_string))
            .is_some_and(|ha1| {
                let expected = credentials.expected_response(algorithm, &ha1, method);
                constant_time_eq(&expected, &credentials.response.to_ascii_lowercase())
            });
        if !matches {
            self.failed(source, now, &credentials.username);
            return Verdict::Challenge { stale: false };
        }
        let used = self
            .nonces
            .entry(credentials.nonce.clone())
            .or_insert(NonceUse {
                issued,
                highest_nc: 0,
            });
        if nc <= used.highest_nc {
            // A replayed nonce count: make the client start afresh.
            return Verdict::Challenge { stale: true };
        }
        used.highest_nc = nc;
        self.failures.remove(&source);
        let identity = if register {
            request.to()
        } else {
            request.from()
        };
        if identity.as_ref().and_then(user_of).as_deref() != Some(credentials.username.as_str()) {
            return Verdict::Forbidden("the request names an identity that is not the caller's");
        }
        Verdict::Pass(Some(credentials.username))
    }

    /// One WWW-/Proxy-Authenticate value per algorithm, in the configured
    /// order, all with the same fresh nonce.
    pub fn challenges(&self, stale: bool) -> Vec<String> {
        let nonce = self.new_nonce();
        self.algorithms
            .iter()
            .map(|a| {
                let mut value = format!(
                    "Digest realm=\"{}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"",
                    self.realm,
                    a.name()
                );
                if stale {
                    value.push_str(", stale=true");
                }
                value
            })
            .collect()
    }

    fn new_nonce(&self) -> String {
        let body = format!("{:x}.{:x}", unix_now(), rand::random::<u64>());
        format!("{body}.{}", self.mac(&body))
    }

    /// When a nonce of ours was issued (unix seconds), or None if it is not ours.
    fn nonce_issued(&self, nonce: &str) -> Option<u64> {
        let (body, mac) = nonce.rsplit_once('.')?;
        if !constant_time_eq(&self.mac(body), mac) {
            return None;
        }
        u64::from_str_radix(body.split('.').next()?, 16).ok()
    }

    fn mac(&self, body: &str) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(body.as_bytes());
        hex::encode(mac.finalize().into_bytes().get(..16).unwrap_or_default())
    }

    fn is_blocked(&self, source: IpAddr, now: Instant) -> bool {
        self.failures
            .get(&source)
            .and_then(|f| f.blocked_until)
            .is_some_and(|until| until > now)
    }

    fn failed(&mut self, source: IpAddr, now: Instant, username: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.auth_failure();
        }
        let entry = self.failures.entry(source).or_default();
        entry.count += 1;
        entry.last = Some(now);
        if entry.count >= self.max_failures {
            entry.count = 0;
            entry.blocked_until = Some(now + self.block);
            tracing::warn!(%source, username, block = ?self.block, "authentication failures: source blocked");
        } else {
            tracing::info!(%source, username, failures = entry.count, "authentication failed");
        }
    }

    fn prune(&mut self, now: Instant) {
        if now.duration_since(self.last_prune) < PRUNE_INTERVAL {
            return;
        }
        self.last_prune = now;
        let oldest = unix_now().saturating_sub(self.nonce_lifetime);
        self.nonces.retain(|_, n| n.issued >= oldest);
        let block = self.block;
        self.failures.retain(|_, f| {
            f.blocked_until.is_some_and(|u| u > now)
                || f.last.is_some_and(|l| now.duration_since(l) < block)
        });
    }
}

/// The unescaped user part of a From/To URI.
fn user_of(name: &NameAddr) -> Option<String> {
    name.uri.sip()?.user_unescaped()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests;
