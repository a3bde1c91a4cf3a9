//! The PBX configuration: the YAML file of the architecture document, loaded
//! into typed structs with a default for every key, and validated so that a
//! bad file stops start-up with one line per problem naming the key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {path}: {source}")]
    Syntax {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    /// Every problem found, one line each, each naming its key.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub sip: SipConfig,
    pub auth: AuthConfig,
    pub registrar: RegistrarConfig,
    pub routes: Vec<RouteConfig>,
    pub media: MediaConfig,
    pub events: EventsConfig,
    pub cdr: CdrConfig,
    pub logging: LoggingConfig,
    pub monitoring: MonitoringConfig,
    pub drain: DrainConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    #[default]
    Udp,
    Tcp,
    Both,
}

impl TransportMode {
    pub fn udp(self) -> bool {
        matches!(self, Self::Udp | Self::Both)
    }
    pub fn tcp(self) -> bool {
        matches!(self, Self::Tcp | Self::Both)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SipConfig {
    pub listen_ip: String,
    pub listen_port: u16,
    pub transport: TransportMode,
    /// Address written in Via/Contact/SDP; "" = listen_ip, or the host's own
    /// address when listening on a wildcard.
    pub advertised_ip: String,
    pub max_concurrent_calls: usize,
    pub domain: String,
    /// Seconds a called party may ring before the caller gets 480 (the
    /// role of RFC 3261 Timer C for a B2BUA).
    pub ring_timeout: u64,
    /// RFC 3261 T1 in milliseconds; every transaction timer derives from it.
    pub timer_t1_ms: u64,
}

impl Default for SipConfig {
    fn default() -> Self {
        Self {
            listen_ip: "0.0.0.0".into(),
            listen_port: 5060,
            transport: TransportMode::Udp,
            advertised_ip: String::new(),
            max_concurrent_calls: 100,
            domain: "pbx.local".into(),
            ring_timeout: 180,
            timer_t1_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub enabled: bool,
    pub algorithms: Vec<String>,
    pub users: Vec<UserConfig>,
    pub users_file: String,
    pub trusted_cidrs: Vec<String>,
    pub max_failures: u32,
    pub block_seconds: u64,
    /// Seconds a challenge's nonce is good for; older ones get `stale=true`.
    pub nonce_seconds: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            algorithms: vec!["SHA-256".into(), "MD5".into()],
            users: Vec::new(),
            users_file: String::new(),
            trusted_cidrs: Vec::new(),
            max_failures: 5,
            block_seconds: 300,
            nonce_seconds: 300,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    pub password: Option<String>,
    pub ha1: Option<String>,
    pub ha1_sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RegistrarStore {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrarConfig {
    pub min_expires: u32,
    pub max_expires: u32,
    pub store: RegistrarStore,
    pub redis_url: String,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        Self {
            min_expires: 60,
            max_expires: 3600,
            store: RegistrarStore::Memory,
            redis_url: String::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Regex on the Request-URI user part.
    #[serde(rename = "match")]
    pub pattern: String,
    /// SIP URI; `$1`.. are the pattern's captures.
    pub target: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MediaMode {
    #[default]
    Bypass,
    Direct,
}

/// How the relay threads wait for packets (`media.relay_io`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RelayIo {
    /// io_uring where the kernel and the container's seccomp profile allow
    /// it, epoll otherwise.
    #[default]
    Auto,
    /// io_uring or refuse to start.
    IoUring,
    /// epoll with a system call per packet each way.
    Epoll,
    /// Each relay thread takes the packets of its share of the pool from an
    /// AF_PACKET ring, and raw sockets send them in batches: the least CPU
    /// per packet. Needs CAP_NET_RAW, and sees packets before the host
    /// firewall's INPUT rules; fragmented datagrams are dropped.
    PacketRing,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    pub mode: MediaMode,
    pub port_pool: PortRange,
    pub rtp_timeout: u64,
    pub codecs: Vec<String>,
    pub relay_io: RelayIo,
}

/// Codec names `media.codecs` may list.
pub const KNOWN_CODECS: [&str; 4] = ["PCMU", "PCMA", "opus", "telephone-event"];

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            mode: MediaMode::Bypass,
            port_pool: PortRange {
                start: 10000,
                end: 20000,
            },
            rtp_timeout: 60,
            codecs: KNOWN_CODECS.iter().map(|c| c.to_string()).collect(),
            relay_io: RelayIo::Auto,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub webhook_urls: Vec<String>,
    pub webhook_timeout: u64,
    pub webhook_retries: u32,
    pub webhook_secret: String,
    pub spool_dir: String,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            webhook_urls: Vec::new(),
            webhook_timeout: 10,
            webhook_retries: 3,
            webhook_secret: String::new(),
            spool_dir: "./spool".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CdrConfig {
    pub enabled: bool,
    pub output_dir: String,
    pub filename_pattern: String,
    pub rotation: String,
    pub retention_days: u32,
}

impl Default for CdrConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            output_dir: "./cdr".into(),
            filename_pattern: "cdr-%Y-%m-%d.jsonl".into(),
            rotation: "daily".into(),
            retention_days: 90,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    pub level: String,
    pub format: LogFormat,
    /// "stdout" or a file path.
    pub output: String,
    /// Directory for `sip_traffic_YYYYMMDD.log`; "" = off.
    pub sip_traffic_log: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "INFO".into(),
            format: LogFormat::Json,
            output: "stdout".into(),
            sip_traffic_log: String::new(),
        }
    }
}

/// Levels `logging.level` and `--log-level` accept, in any case.
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "warning", "error"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MonitoringConfig {
    pub prometheus_port: u16,
    pub health_check_port: u16,
    pub admin_token_file: String,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            prometheus_port: 9090,
            health_check_port: 8080,
            admin_token_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    pub timeout_seconds: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            timeout_seconds: 3600,
        }
    }
}

impl Config {
    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Syntax { source, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates YAML text; an empty document is the defaults.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|source| ConfigError::Syntax {
                path: PathBuf::from("<yaml>"),
                source,
            })?
        };
        config.validate()?;
        Ok(config)
    }

    /// Every problem, one line each, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, what: String| problems.push(format!("config: {key}: {what}"));

        if self.sip.listen_ip.parse::<IpAddr>().is_err() {
            bad(
                "sip.listen_ip",
                format!("{:?} is not an IP address", self.sip.listen_ip),
            );
        }
        if self.sip.listen_port == 0 {
            bad("sip.listen_port", "must be 1..65535".into());
        }
        if !self.sip.advertised_ip.is_empty() && self.sip.advertised_ip.parse::<IpAddr>().is_err() {
            bad(
                "sip.advertised_ip",
                format!(
                    "{:?} is not an IP address (leave it empty to derive it)",
                    self.sip.advertised_ip
                ),
            );
        }
        if self.sip.max_concurrent_calls == 0 {
            bad("sip.max_concurrent_calls", "must be at least 1".into());
        }
        if self.sip.domain.trim().is_empty() {
            bad("sip.domain", "must not be empty".into());
        }
        if self.sip.ring_timeout == 0 {
            bad("sip.ring_timeout", "must be at least 1 second".into());
        }
        if !(10..=5000).contains(&self.sip.timer_t1_ms) {
            bad(
                "sip.timer_t1_ms",
                format!("{} is outside 10..5000", self.sip.timer_t1_ms),
            );
        }

        for (i, alg) in self.auth.algorithms.iter().enumerate() {
            if !["SHA-256", "MD5"].contains(&alg.as_str()) {
                bad(
                    &format!("auth.algorithms[{i}]"),
                    format!("{alg:?} is not one of SHA-256, MD5"),
                );
            }
        }
        if self.auth.enabled && self.auth.algorithms.is_empty() {
            bad("auth.algorithms", "must name at least one algorithm".into());
        }
        for (i, user) in self.auth.users.iter().enumerate() {
            let key = format!("auth.users[{i}]");
            if user.username.is_empty() {
                bad(&key, "username is empty".into());
            }
            let secrets = [&user.password, &user.ha1, &user.ha1_sha256]
                .iter()
                .filter(|s| s.is_some())
                .count();
            if secrets != 1 {
                bad(
                    &key,
                    "give exactly one of password, ha1, ha1_sha256".to_string(),
                );
            }
        }
        for (i, cidr) in self.auth.trusted_cidrs.iter().enumerate() {
            if parse_cidr(cidr).is_none() {
                bad(
                    &format!("auth.trusted_cidrs[{i}]"),
                    format!("{cidr:?} is not an address or CIDR"),
                );
            }
        }
        if self.auth.max_failures == 0 {
            bad("auth.max_failures", "must be at least 1".into());
        }
        if self.auth.nonce_seconds == 0 {
            bad("auth.nonce_seconds", "must be at least 1".into());
        }

        if self.registrar.min_expires > self.registrar.max_expires {
            bad(
                "registrar",
                format!(
                    "min_expires {} is above max_expires {}",
                    self.registrar.min_expires, self.registrar.max_expires
                ),
            );
        }
        if self.registrar.store == RegistrarStore::Redis
            && !self.registrar.redis_url.starts_with("redis://")
            && !self.registrar.redis_url.starts_with("rediss://")
        {
            bad(
                "registrar.redis_url",
                "store is redis but redis_url is not a redis:// URL".into(),
            );
        }

        for (i, route) in self.routes.iter().enumerate() {
            if let Err(e) = Regex::new(&route.pattern) {
                let first = e.to_string().lines().last().unwrap_or_default().to_string();
                bad(&format!("routes[{i}].match"), format!("bad regex: {first}"));
            }
            if !["sip:", "sips:"]
                .iter()
                .any(|s| route.target.starts_with(s))
            {
                bad(
                    &format!("routes[{i}].target"),
                    format!("{:?} is not a sip: URI", route.target),
                );
            }
        }

        let pool = self.media.port_pool;
        if pool.start >= pool.end {
            bad(
                "media.port_pool",
                format!("start {} is not below end {}", pool.start, pool.end),
            );
        } else if pool.start < 1024 {
            bad(
                "media.port_pool",
                format!("start {} is below 1024", pool.start),
            );
        } else if pool.end - pool.start < 3 {
            bad(
                "media.port_pool",
                "must hold at least two even/odd port pairs".into(),
            );
        }
        if self.media.rtp_timeout == 0 {
            bad("media.rtp_timeout", "must be at least 1 second".into());
        }
        for (i, codec) in self.media.codecs.iter().enumerate() {
            if !KNOWN_CODECS.iter().any(|k| k.eq_ignore_ascii_case(codec)) {
                bad(
                    &format!("media.codecs[{i}]"),
                    format!("{codec:?} is not one of {}", KNOWN_CODECS.join(", ")),
                );
            }
        }

        for (i, url) in self.events.webhook_urls.iter().enumerate() {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                bad(
                    &format!("events.webhook_urls[{i}]"),
                    format!("{url:?} is not an http(s) URL"),
                );
            }
        }
        if self.events.webhook_timeout == 0 {
            bad("events.webhook_timeout", "must be at least 1 second".into());
        }

        if self.cdr.filename_pattern.is_empty() {
            bad("cdr.filename_pattern", "must not be empty".into());
        }
        if self.cdr.rotation != "daily" {
            bad(
                "cdr.rotation",
                format!("{:?} is not supported (daily)", self.cdr.rotation),
            );
        }
        if self.cdr.retention_days == 0 {
            bad("cdr.retention_days", "must be at least 1".into());
        }

        if !LOG_LEVELS.contains(&self.logging.level.to_ascii_lowercase().as_str()) {
            bad(
                "logging.level",
                format!(
                    "{:?} is not one of TRACE, DEBUG, INFO, WARN, ERROR",
                    self.logging.level
                ),
            );
        }
        if self.logging.output.is_empty() {
            bad("logging.output", "use \"stdout\" or a file path".into());
        }

        let m = &self.monitoring;
        if m.prometheus_port == 0 || m.health_check_port == 0 {
            bad("monitoring", "ports must be 1..65535".into());
        } else if m.prometheus_port == m.health_check_port {
            bad(
                "monitoring",
                format!(
                    "prometheus_port and health_check_port are both {}",
                    m.prometheus_port
                ),
            );
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Parses "10.0.0.0/8" or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_is_the_defaults() {
        let c = Config::from_yaml("").expect("defaults are valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.sip.listen_port, 5060);
        assert_eq!(c.media.port_pool.start, 10000);
    }

    #[test]
    fn partial_document_keeps_defaults_for_the_rest() {
        let c = Config::from_yaml("sip:\n  listen_port: 5070\n").expect("valid");
        assert_eq!(c.sip.listen_port, 5070);
        assert_eq!(c.sip.max_concurrent_calls, 100);
        assert_eq!(c.cdr.retention_days, 90);
    }

    #[test]
    fn each_problem_is_one_line_naming_its_key() {
        let yaml = "media:\n  port_pool: {start: 20000, end: 10000}\nlogging:\n  level: LOUD\nroutes:\n  - match: \"(\"\n    target: \"x\"\n";
        let err = Config::from_yaml(yaml).expect_err("invalid");
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"config: media.port_pool: start 20000 is not below end 10000"));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("config: logging.level:")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("config: routes[0].match:")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("config: routes[0].target:")));
        assert_eq!(lines.len(), 4, "{text}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::from_yaml("sip:\n  listen_prot: 5070\n").expect_err("typo");
        assert!(err.to_string().contains("listen_prot"), "{err}");
    }

    #[test]
    fn cidrs_accept_bare_addresses() {
        assert!(parse_cidr("127.0.0.1").is_some());
        assert!(parse_cidr("10.0.0.0/8").is_some());
        assert!(parse_cidr("::1").is_some());
        assert!(parse_cidr("nonsense").is_none());
    }
}
