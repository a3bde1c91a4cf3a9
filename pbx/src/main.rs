//! `sip-pbx`: loads the configuration, starts logging, the observers and
//! the signalling core, and turns SIGTERM/SIGINT into a drain.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sip_pbx::auth::users::Directory;
use sip_pbx::config::{Config, MediaMode, RegistrarStore, LOG_LEVELS};
use sip_pbx::events::EventBus;
use sip_pbx::limits;
use sip_pbx::logging::{self, TrafficLog};
use sip_pbx::media::{DirectMedia, MediaStats, RelayMedia, SessionMedia};
use sip_pbx::metrics::Metrics;
use sip_pbx::observers;
use sip_pbx::registrar::redis::RedisStore;
use sip_pbx::registrar::store::{MemoryStore, Store};
use sip_pbx::registrar::Registrar;
use sip_pbx::server::{self, CoreParts};
use sip_pbx::sip::transport::Protocol;
use sip_pbx::status::PbxStatus;

/// A SIP PBX (B2BUA with registrar, RTP relay, CDR and webhooks) for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "sip-pbx", version)]
struct Args {
    /// YAML configuration file; without it the built-in defaults are used.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// SIP port, overriding sip.listen_port.
    #[arg(long)]
    port: Option<u16>,
    /// Log level, overriding logging.level (TRACE, DEBUG, INFO, WARN, ERROR).
    #[arg(long)]
    log_level: Option<String>,
    /// Check the configuration, print the problems found and exit.
    #[arg(long)]
    check_config: bool,
}

fn load(args: &Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(port) = args.port {
        config.sip.listen_port = port;
    }
    if let Some(level) = &args.log_level {
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "--log-level: {level:?} is not one of TRACE, DEBUG, INFO, WARN, ERROR"
            ));
        }
        config.logging.level = level.clone();
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match load(&args) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("config: OK");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = logging::init(&config.logging) {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    match limits::raise_open_files() {
        Ok((before, after)) if after > before => {
            tracing::info!(before, after, "open-file limit raised")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    // One thread for signalling and the observers: no cross-thread wake-ups
    // on the hot path; the media relay and file I/O have threads of their own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let report = report(&e);
            tracing::error!("{report}");
            eprintln!("sip-pbx: {report}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once even where a
/// message already quotes its source.
fn report(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

async fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let status = Arc::new(PbxStatus::default());
    let traffic = match config.logging.sip_traffic_log.as_str() {
        "" => None,
        dir => Some(TrafficLog::open(dir.as_ref())?),
    };
    let mut bus = EventBus::default();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let observers = observers::start(&config, &mut bus, Arc::clone(&status), shutdown)
        .await
        .context("observers")?;
    let (media_tx, media_events) = tokio::sync::mpsc::unbounded_channel();
    let media: Box<dyn SessionMedia> = match config.media.mode {
        MediaMode::Direct => Box::new(DirectMedia::default()),
        MediaMode::Bypass => {
            let advertised = server::advertised_address(&config);
            let relay = RelayMedia::new(&config.media, advertised, Arc::clone(&status), media_tx)
                .context("media relay")?;
            spawn_packet_metrics(relay.stats(), observers.metrics.clone());
            Box::new(relay)
        }
    };
    spawn_signal_drain(Arc::clone(&status));
    let users_file = (!config.auth.users_file.is_empty())
        .then(|| std::path::PathBuf::from(&config.auth.users_file));
    let directory = Directory::load(
        &config.sip.domain,
        &config.auth.users,
        users_file.as_deref(),
    )?;
    if let Some(file) = users_file {
        directory.watch(config.sip.domain.clone(), config.auth.users.clone(), file);
    }
    let store: Arc<dyn Store> = match config.registrar.store {
        RegistrarStore::Memory => Arc::new(MemoryStore::default()),
        RegistrarStore::Redis => Arc::new(RedisStore::new(&config.registrar.redis_url)?),
    };
    let instance =
        std::net::SocketAddr::new(server::advertised_address(&config), config.sip.listen_port);
    let instance_protocol = if config.sip.transport.udp() {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    let registrar = Arc::new(Registrar::new(
        store,
        directory.clone(),
        instance,
        instance_protocol,
        bus.clone(),
        Arc::clone(&status),
    ));
    registrar.spawn_sweeper();
    let core = server::run(CoreParts {
        config,
        media,
        media_events,
        registrar,
        directory,
        bus,
        status,
        metrics: observers.metrics.clone(),
        traffic,
    })
    .await
    .context("signalling core");
    stop.send_replace(true);
    observers.join().await;
    core
}

/// Feeds the relay's packet count into `sip_pbx_media_packets_total`.
fn spawn_packet_metrics(stats: MediaStats, metrics: Metrics) {
    tokio::spawn(async move {
        let mut reported = 0;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let total = stats.packets_total();
            metrics.media_packets(total.saturating_sub(reported));
            reported = total;
        }
    });
}

/// SIGTERM (Kubernetes, preStop) and SIGINT (a terminal) start a drain.
fn spawn_signal_drain(status: Arc<PbxStatus>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if status.start_drain() {
                tracing::info!("signal received: draining");
            }
        }
    });
}
