//! The signalling core: one task that owns the transaction layer and the
//! B2BUA, fed by the transports, the router and the media relay, and driven
//! by their timers. Owning all call state in one task keeps it free of
//! locks; routing lookups, which may wait on Redis or DNS, run beside it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::auth::users::Directory;
use crate::auth::Authenticator;
use crate::b2bua::call::CallKey;
use crate::b2bua::routing::{RouteOutcome, Router};
use crate::b2bua::{B2bua, CallSettings};
use crate::config::{Config, TransportMode};
use crate::events::{EndReason, EventBus};
use crate::media::{MediaEvent, SessionMedia};
use crate::metrics::Metrics;
use crate::registrar::store::Binding;
use crate::registrar::{Limits, RegisterError, Registrar};
use crate::sip::message::Message;
use crate::sip::transaction::{LocalAddress, TimerValues, TransactionLayer, TuEvent, TxId};
use crate::sip::transport::{Inbound, Protocol, StreamLifetimes, Transport, TransportError};
use crate::sip::uri::Host;
use crate::status::PbxStatus;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("sip.listen_ip: {0}")]
    ListenIp(String),
}

/// Everything the core is built from; the parts come from `main` so that
/// tests and the binary wire the same thing.
pub struct CoreParts {
    pub config: Config,
    pub media: Box<dyn SessionMedia>,
    pub media_events: mpsc::UnboundedReceiver<MediaEvent>,
    /// The registrar: REGISTER jobs and the routing lookups.
    pub registrar: Arc<Registrar>,
    /// The accounts digest authentication checks against.
    pub directory: Directory,
    pub bus: EventBus,
    pub status: Arc<PbxStatus>,
    pub metrics: Metrics,
    pub traffic: Option<crate::logging::TrafficLog>,
}

/// The address written into Via, Contact and SDP: `sip.advertised_ip`,
/// else `SIP_PBX_ADVERTISED_IP` (set by the operator from the node), else
/// the listen address, else the address of the host's default route.
pub fn advertised_address(config: &Config) -> IpAddr {
    let configured = [
        config.sip.advertised_ip.clone(),
        std::env::var("SIP_PBX_ADVERTISED_IP").unwrap_or_default(),
    ];
    if let Some(ip) = configured.iter().find_map(|s| s.parse::<IpAddr>().ok()) {
        return ip;
    }
    match config.sip.listen_ip.parse::<IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => ip,
        _ => default_route_address().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    }
}

/// The source address the kernel would pick for the public internet; a UDP
/// connect sends nothing.
fn default_route_address() -> Option<IpAddr> {
    let socket = StdUdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// A REGISTER's transaction, request and the registrar's answer.
type RegisterDone = (TxId, Message, Result<Vec<Binding>, RegisterError>);

/// Runs the signalling core until a drain completes.
pub async fn run(parts: CoreParts) -> Result<(), ServerError> {
    let CoreParts {
        config,
        media,
        mut media_events,
        registrar,
        directory,
        bus,
        status,
        metrics,
        traffic,
    } = parts;
    let listen_ip: IpAddr = config
        .sip
        .listen_ip
        .parse()
        .map_err(|_| ServerError::ListenIp(config.sip.listen_ip.clone()))?;
    let listen = SocketAddr::new(listen_ip, config.sip.listen_port);
    let timers = TimerValues::from_t1(Duration::from_millis(config.sip.timer_t1_ms));
    let lifetimes = StreamLifetimes {
        message: timers.timeout(),
        idle: Duration::from_secs(config.registrar.max_expires.into()) + timers.timeout(),
    };
    let (transport, mut inbound) =
        Transport::bind(listen, config.sip.transport, traffic, lifetimes).await?;
    let advertised = advertised_address(&config);
    tracing::info!(
        %listen,
        %advertised,
        transport = ?config.sip.transport,
        "SIP listening"
    );

    let mut txl = TransactionLayer::new(
        LocalAddress {
            host: Host::Ip(advertised),
            port: transport.local_port(),
        },
        timers,
    );
    let default_protocol = match config.sip.transport {
        TransportMode::Tcp => Protocol::Tcp,
        TransportMode::Udp | TransportMode::Both => Protocol::Udp,
    };
    let router = Arc::new(Router::new(
        &config.routes,
        Arc::clone(&registrar) as _,
        default_protocol,
    ));
    let auth = Authenticator::new(
        &config.auth,
        &config.sip.domain,
        directory,
        Some(metrics.clone()),
    );
    let mut b2bua = B2bua::new(
        CallSettings {
            max_calls: config.sip.max_concurrent_calls,
            ring_timeout: Duration::from_secs(config.sip.ring_timeout),
            late_2xx_window: timers.timeout(),
        },
        media,
        bus,
        Arc::clone(&status),
        auth,
        Limits {
            min_expires: config.registrar.min_expires,
            max_expires: config.registrar.max_expires,
        },
    );
    let (route_tx, mut route_rx) = mpsc::unbounded_channel::<(CallKey, RouteOutcome)>();
    let (register_tx, mut register_rx) = mpsc::unbounded_channel::<RegisterDone>();
    let mut drain_rx = status.drain_started();
    let drain_timeout = Duration::from_secs(config.drain.timeout_seconds);
    // Once every call has been hung up at the deadline, BYEs get this long.
    let bye_grace = timers.timeout();
    let mut drain_deadline: Option<Instant> = None;
    let mut exit_deadline: Option<Instant> = None;

    loop {
        let wake = [
            txl.next_deadline(),
            b2bua.next_deadline(),
            drain_deadline,
            exit_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = inbound.recv() => {
                let Some(Inbound { parsed, peer }) = got else { break };
                let now = Instant::now();
                if let Some(method) = parsed.message.method() {
                    metrics.sip_request(method.as_str());
                }
                if parsed.defect.is_some() {
                    metrics.error("sip_parse");
                }
                match (parsed.defect, parsed.message.is_request()) {
                    (None, true) => txl.on_request(parsed.message, peer, now),
                    (None, false) => txl.on_response(parsed.message, now),
                    (Some(defect), true) => {
                        tracing::info!(%peer, code = defect.code, why = %defect.why, "bad request refused");
                        if parsed.message.method() != Some(&crate::sip::message::Method::Ack) {
                            let response = Message::response_to(&parsed.message, defect.code, None);
                            txl.respond_stateless(&parsed.message, &response, peer);
                        }
                    }
                    (Some(defect), false) => {
                        tracing::info!(%peer, why = %defect.why, "bad response discarded");
                    }
                }
            }
            Some((call, outcome)) = route_rx.recv() => {
                b2bua.on_route(call, outcome, &mut txl, Instant::now());
            }
            Some((tx, request, result)) = register_rx.recv() => {
                b2bua.on_registered(tx, &request, result, &mut txl, Instant::now());
            }
            Some(event) = media_events.recv() => {
                let MediaEvent::RtpTimeout(session) = event;
                b2bua.on_media_timeout(session, &mut txl, Instant::now());
            }
            changed = drain_rx.changed(), if drain_deadline.is_none() => {
                if changed.is_ok() && *drain_rx.borrow() {
                    tracing::info!(calls = b2bua.active_calls(), timeout = ?drain_timeout, "draining");
                    drain_deadline = Some(Instant::now() + drain_timeout);
                }
            }
            () = sleep => {}
        }
        let now = Instant::now();
        txl.on_timers(now);
        b2bua.on_timers(&mut txl, now);
        if drain_deadline.is_some_and(|d| d <= now) && exit_deadline.is_none() {
            tracing::info!(calls = b2bua.active_calls(), "drain deadline: hanging up");
            b2bua.hang_up_all(EndReason::Drain, &mut txl, now);
            exit_deadline = Some(now + bye_grace);
        }
        loop {
            let events = txl.take_events();
            if events.is_empty() {
                break;
            }
            for event in events {
                if matches!(event, TuEvent::Timeout { .. }) {
                    metrics.error("transaction_timeout");
                }
                b2bua.handle(event, &mut txl, now);
            }
        }
        for job in b2bua.take_route_requests() {
            let router = Arc::clone(&router);
            let done = route_tx.clone();
            tokio::spawn(async move {
                let outcome = router.route(&job.user, job.local_only).await;
                let _ = done.send((job.call, outcome));
            });
        }
        for job in b2bua.take_register_jobs() {
            let registrar = Arc::clone(&registrar);
            let done = register_tx.clone();
            tokio::spawn(async move {
                let result = registrar.register(job.registration, job.source).await;
                let _ = done.send((job.tx, job.request, result));
            });
        }
        for out in txl.take_outbox() {
            if let Some(code) = response_code(&out.data) {
                metrics.sip_response(code);
            }
            transport.send(out);
        }
        metrics.set_transactions(txl.len());
        if drain_deadline.is_some() {
            let idle = b2bua.active_calls() == 0;
            if idle || exit_deadline.is_some_and(|d| d <= now) {
                tracing::info!("drained: exiting");
                break;
            }
        }
    }
    Ok(())
}

/// The status code of serialised response bytes, without parsing them.
fn response_code(data: &[u8]) -> Option<u16> {
    let code = data.strip_prefix(b"SIP/2.0 ")?.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}
