//! Logging: `tracing` set up as `logging:` asks (JSON or text, level, stdout
//! or a file), and the SIP traffic log, which writes every message sent and
//! received to a daily `sip_traffic_YYYYMMDD.log` from its own thread so the
//! signalling path never waits for the disk.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use chrono::Utc;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};
use crate::sip::transport::Peer;

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("logging.output: cannot open {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("logging.sip_traffic_log: cannot create {path}: {source}")]
    TrafficDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("logging: {0}")]
    Init(String),
}

/// Installs the global subscriber.
pub fn init(config: &LoggingConfig) -> Result<(), LoggingError> {
    let level = match config.level.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_string(),
        other => other.to_string(),
    };
    let filter = EnvFilter::try_from_env("SIP_PBX_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("sip_pbx={level},{level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let result = match (config.output.as_str(), config.format) {
        ("stdout", LogFormat::Json) => builder.json().try_init(),
        ("stdout", LogFormat::Text) => builder.try_init(),
        (path, format) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LoggingError::Output {
                    path: path.into(),
                    source,
                })?;
            let builder = builder
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false);
            match format {
                LogFormat::Json => builder.json().try_init(),
                LogFormat::Text => builder.try_init(),
            }
        }
    };
    result.map_err(|e| LoggingError::Init(e.to_string()))
}

enum Direction {
    Sent,
    Received,
}

struct Entry {
    direction: Direction,
    peer: Peer,
    data: bytes::Bytes,
}

/// Handle to the SIP traffic log; cheap to clone.
#[derive(Clone)]
pub struct TrafficLog {
    tx: mpsc::Sender<Entry>,
}

impl TrafficLog {
    /// Starts the writer thread for `dir`, creating it if needed.
    pub fn open(dir: &Path) -> Result<TrafficLog, LoggingError> {
        std::fs::create_dir_all(dir).map_err(|source| LoggingError::TrafficDir {
            path: dir.into(),
            source,
        })?;
        let (tx, rx) = mpsc::channel::<Entry>();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("sip-traffic-log".into())
            .spawn(move || write_entries(&dir, rx))
            .map_err(|e| LoggingError::Init(e.to_string()))?;
        Ok(TrafficLog { tx })
    }

    pub fn sent(&self, peer: Peer, data: &[u8]) {
        self.push(Direction::Sent, peer, data);
    }

    pub fn received(&self, peer: Peer, data: &[u8]) {
        self.push(Direction::Received, peer, data);
    }

    fn push(&self, direction: Direction, peer: Peer, data: &[u8]) {
        let _ = self.tx.send(Entry {
            direction,
            peer,
            data: bytes::Bytes::copy_from_slice(data),
        });
    }
}

fn write_entries(dir: &Path, rx: mpsc::Receiver<Entry>) {
    let mut current: Option<(String, std::fs::File)> = None;
    while let Ok(entry) = rx.recv() {
        let now = Utc::now();
        let name = format!("sip_traffic_{}.log", now.format("%Y%m%d"));
        if current.as_ref().map(|(n, _)| n) != Some(&name) {
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(&name))
            {
                Ok(file) => current = Some((name, file)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open SIP traffic log");
                    continue;
                }
            }
        }
        if let Some((_, file)) = current.as_mut() {
            let arrow = match entry.direction {
                Direction::Sent => "SENT to",
                Direction::Received => "RECEIVED from",
            };
            let text = String::from_utf8_lossy(&entry.data);
            let _ = write!(
                file,
                "{} {arrow} {}\n{}\n\n",
                now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                entry.peer,
                text.trim_end()
            );
        }
    }
}
