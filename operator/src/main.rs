//! `sip-pbx-operator`: `render` prints what a SipPbx becomes; `run` is the
//! controller.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sip_pbx_operator::render::render;
use sip_pbx_operator::run::{run, RunOptions};

#[derive(Parser)]
#[command(version, about = "Kubernetes operator for the sip-pbx SIP PBX")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the objects a SipPbx manifest becomes, without a cluster.
    Render {
        /// The SipPbx manifest ("-" for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Run the controller (in-cluster config, or KUBECONFIG).
    Run {
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Address of /metrics and /health.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
        /// Name of the leader-election Lease.
        #[arg(long, default_value = "sip-pbx-operator")]
        lease_name: String,
        /// Namespace of the Lease (default: the operator's own namespace).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// This replica's identity in the Lease (default: the pod name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds a Lease stays valid without renewal.
        #[arg(long, default_value_t = 15)]
        lease_seconds: u64,
        /// Seconds between reads of the pods' calls while autoscaling.
        #[arg(long, default_value_t = 15)]
        stats_interval_seconds: u64,
        /// Log filter, e.g. info or sip_pbx_operator=debug.
        #[arg(long, env = "RUST_LOG", default_value = "info")]
        log: String,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Render { file } => match render_file(&file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("sip-pbx-operator render: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            namespace,
            metrics_addr,
            lease_name,
            lease_namespace,
            identity,
            lease_seconds,
            stats_interval_seconds,
            log,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(log))
                .init();
            let opts = RunOptions {
                namespace,
                metrics_addr,
                lease_name,
                lease_namespace,
                identity: identity.unwrap_or_else(default_identity),
                lease_duration: Duration::from_secs(lease_seconds.max(3)),
                stats_interval: Duration::from_secs(stats_interval_seconds.max(1)),
                stats_timeout: Duration::from_secs(2),
            };
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(run(opts)));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn render_file(file: &PathBuf) -> anyhow::Result<()> {
    let mut input = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading standard input")?;
    } else {
        input =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    let (yaml, warnings) = render(&input)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    print!("{yaml}");
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
