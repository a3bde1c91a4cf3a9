//! SIP over UDP and TCP: sockets, stream framing, keep-alives and the
//! lifetime of TCP connections, the Via `received` and `rport` stamps of
//! RFC 3261 §18.2.1 / RFC 3581, and the SIP traffic log. Everything
//! received goes up one channel; everything sent goes through
//! `Transport::send`, which never blocks the caller.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::message::{Message, Via};
use super::parse::{parse_datagram, parse_stream, FrameError, Parsed, MAX_MESSAGE};
use crate::config::TransportMode;
use crate::limits::{self, OutOfFilesReport};
use crate::logging::TrafficLog;

/// How long the TCP listener waits after an error that would recur at
/// once, such as running out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    pub fn via_name(self) -> &'static str {
        match self {
            Protocol::Udp => "UDP",
            Protocol::Tcp => "TCP",
        }
    }
}

/// A remote SIP element as the network sees it: address and transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

impl Peer {
    pub fn reliable(&self) -> bool {
        self.protocol == Protocol::Tcp
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.protocol.via_name())
    }
}

/// Bytes to send to a peer.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub peer: Peer,
    pub data: Bytes,
}

/// A framed message from a peer.
#[derive(Debug)]
pub struct Inbound {
    pub parsed: Parsed,
    pub peer: Peer,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind SIP {protocol} on {addr}: {source}")]
    Bind {
        protocol: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

type Connections = Arc<Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Bytes>>>>;

/// How long a TCP connection may keep the PBX waiting before it is closed,
/// so that connections a peer abandoned, or holds open without speaking
/// SIP, do not use up the process's descriptors.
#[derive(Debug, Clone, Copy)]
pub struct StreamLifetimes {
    /// For the first message after the connection opens, and for the rest
    /// of a message once it has begun.
    pub message: Duration,
    /// Between messages (RFC 5626 keep-alives count): longer than any
    /// registration lasts, so that a phone's flow lives as long as its
    /// registrations refresh it.
    pub idle: Duration,
}

/// The PBX's SIP sockets.
#[derive(Clone)]
pub struct Transport {
    udp: Option<Arc<UdpSocket>>,
    tcp: Connections,
    inbound: mpsc::Sender<Inbound>,
    traffic: Option<TrafficLog>,
    local_port: u16,
    lifetimes: StreamLifetimes,
}

impl Transport {
    /// Binds the sockets `mode` asks for; received messages arrive on the
    /// returned channel.
    pub async fn bind(
        listen: SocketAddr,
        mode: TransportMode,
        traffic: Option<TrafficLog>,
        lifetimes: StreamLifetimes,
    ) -> Result<(Transport, mpsc::Receiver<Inbound>), TransportError> {
        let (tx, rx) = mpsc::channel(16_384);
        let mut local_port = listen.port();
        let udp = if mode.udp() {
            let socket = UdpSocket::bind(listen)
                .await
                .map_err(|source| TransportError::Bind {
                    protocol: "UDP",
                    addr: listen,
                    source,
                })?;
            local_port = socket.local_addr().map(|a| a.port()).unwrap_or(local_port);
            Some(Arc::new(socket))
        } else {
            None
        };
        let transport = Transport {
            udp,
            tcp: Arc::default(),
            inbound: tx,
            traffic,
            local_port,
            lifetimes,
        };
        if let Some(socket) = &transport.udp {
            tokio::spawn(transport.clone().udp_loop(Arc::clone(socket)));
        }
        if mode.tcp() {
            let addr = SocketAddr::new(listen.ip(), local_port);
            let listener =
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| TransportError::Bind {
                        protocol: "TCP",
                        addr,
                        source,
                    })?;
            tokio::spawn(transport.clone().accept_loop(listener));
        }
        Ok((transport, rx))
    }

    /// The port actually bound (for `listen_port: 0` in tests).
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    async fn udp_loop(self, socket: Arc<UdpSocket>) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (len, addr) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                // ICMP port-unreachable from an earlier send surfaces here.
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            };
            let peer = Peer {
                addr,
                protocol: Protocol::Udp,
            };
            let data = &buf[..len];
            if let Some(log) = &self.traffic {
                log.received(peer, data);
            }
            match parse_datagram(data) {
                Ok(parsed) => {
                    if self.deliver(parsed, peer).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "dropped datagram"),
            }
        }
    }

    async fn accept_loop(self, listener: TcpListener) {
        let report = OutOfFilesReport::default();
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    self.adopt(stream, addr);
                }
                // The connection stays queued and accept fails again at
                // once: pause rather than spin the signalling thread.
                Err(e) if limits::out_of_files(&e) => {
                    report.report(&e, "TCP connections wait until others close");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
                // One connection's trouble: it was reset before it was
                // accepted.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    tracing::debug!(error = %e, "TCP accept failed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    }

    /// Starts reading and writing a TCP connection, accepted or opened.
    fn adopt(&self, stream: TcpStream, addr: SocketAddr) -> mpsc::UnboundedSender<Bytes> {
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        if let Ok(mut map) = self.tcp.lock() {
            map.insert(addr, tx.clone());
        }
        let connections = Arc::clone(&self.tcp);
        tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                if writer.write_all(&data).await.is_err() {
                    break;
                }
            }
        });
        let this = self.clone();
        let pong = tx.clone();
        tokio::spawn(async move {
            let peer = Peer {
                addr,
                protocol: Protocol::Tcp,
            };
            if let Err(why) = this.read_stream(&mut reader, peer, &pong).await {
                tracing::debug!(%peer, %why, "closing TCP connection");
            }
            if let Ok(mut map) = connections.lock() {
                map.remove(&addr);
            }
        });
        tx
    }

    /// Frames messages from a TCP connection until it closes or breaks
    /// one of the `StreamLifetimes`; answers each RFC 5626 ping (a double
    /// CRLF) with a pong (one CRLF) on `pong`.
    async fn read_stream(
        &self,
        reader: &mut (impl AsyncReadExt + Unpin),
        peer: Peer,
        pong: &mpsc::UnboundedSender<Bytes>,
    ) -> Result<(), String> {
        let lifetimes = self.lifetimes;
        let mut buf = BytesMut::with_capacity(8192);
        let opened = Instant::now();
        // Time of the last message, or keep-alive after one.
        let mut settled: Option<Instant> = None;
        // Since when the buffer has held the start of a message.
        let mut partial_since: Option<Instant> = None;
        // CR and LF bytes since the last message, for pings split across reads.
        let mut crlf_run = 0usize;
        loop {
            let (deadline, waiting_for) = match (partial_since, settled) {
                (Some(since), _) => (since + lifetimes.message, "the rest of a message"),
                (None, Some(at)) => (at + lifetimes.idle, "a message or keep-alive"),
                (None, None) => (opened + lifetimes.message, "a first message"),
            };
            match tokio::time::timeout_at(deadline, reader.read_buf(&mut buf)).await {
                Err(_) => return Err(format!("no {waiting_for} in time")),
                Ok(Ok(0)) => return Ok(()),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(_)) => {}
            }
            let now = Instant::now();
            loop {
                let run = buf
                    .iter()
                    .position(|b| *b != b'\r' && *b != b'\n')
                    .unwrap_or(buf.len());
                if run > 0 {
                    for _ in 0..(crlf_run + run) / 4 - crlf_run / 4 {
                        let _ = pong.send(Bytes::from_static(b"\r\n"));
                    }
                    crlf_run += run;
                    buf.advance(run);
                    settled = settled.map(|_| now);
                }
                match parse_stream(&buf) {
                    Ok((parsed, used)) => {
                        if let Some(log) = &self.traffic {
                            log.received(peer, &buf[..used]);
                        }
                        buf.advance(used);
                        (settled, partial_since, crlf_run) = (Some(now), None, 0);
                        self.deliver(parsed, peer)
                            .await
                            .map_err(|()| "the PBX is stopping".to_string())?;
                    }
                    Err(FrameError::Incomplete) => break,
                    Err(FrameError::Garbage(why)) => return Err(why),
                }
            }
            if buf.is_empty() {
                partial_since = None;
            } else {
                partial_since.get_or_insert(now);
            }
        }
    }

    async fn deliver(&self, mut parsed: Parsed, peer: Peer) -> Result<(), ()> {
        if parsed.message.is_request() {
            stamp_via(&mut parsed.message, peer);
        }
        self.inbound
            .send(Inbound { parsed, peer })
            .await
            .map_err(|_| ())
    }

    /// Sends without waiting; TCP connects first when there is no connection.
    pub fn send(&self, out: Outbound) {
        if let Some(log) = &self.traffic {
            log.sent(out.peer, &out.data);
        }
        match out.peer.protocol {
            Protocol::Udp => {
                let Some(socket) = &self.udp else {
                    tracing::warn!(peer = %out.peer, "no UDP socket to send on");
                    return;
                };
                match socket.try_send_to(&out.data, out.peer.addr) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let socket = Arc::clone(socket);
                        tokio::spawn(async move {
                            let _ = socket.send_to(&out.data, out.peer.addr).await;
                        });
                    }
                    Err(e) => tracing::debug!(peer = %out.peer, error = %e, "UDP send failed"),
                }
            }
            Protocol::Tcp => {
                let existing = self
                    .tcp
                    .lock()
                    .ok()
                    .and_then(|map| map.get(&out.peer.addr).cloned());
                if let Some(conn) = existing {
                    if conn.send(out.data.clone()).is_ok() {
                        return;
                    }
                }
                let this = self.clone();
                tokio::spawn(async move {
                    match TcpStream::connect(out.peer.addr).await {
                        Ok(stream) => {
                            let _ = this.adopt(stream, out.peer.addr).send(out.data);
                        }
                        Err(e) => {
                            tracing::info!(peer = %out.peer, error = %e, "TCP connect failed")
                        }
                    }
                });
            }
        }
    }
}

/// RFC 3261 §18.2.1 and RFC 3581: record where a request really came from.
fn stamp_via(message: &mut Message, peer: Peer) {
    let Some(value) = message.headers.first_mut("Via") else {
        return;
    };
    let Ok(mut via) = Via::parse(value) else {
        return;
    };
    let ip = peer.addr.ip();
    let mut changed = false;
    if via.host.ip() != Some(ip) {
        via.set_param("received", Some(ip.to_string()));
        changed = true;
    }
    if via.param("rport").is_some() {
        via.set_param("rport", Some(peer.addr.port().to_string()));
        if via.param("received").is_none() {
            via.set_param("received", Some(ip.to_string()));
        }
        changed = true;
    }
    if changed {
        *value = via.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::parse_datagram;

    #[test]
    fn via_gets_received_and_rport() {
        let text = "OPTIONS sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n";
        let mut m = parse_datagram(text.as_bytes()).expect("framed").message;
        let peer = Peer {
            addr: "192.0.2.9:40000".parse().unwrap(),
            protocol: Protocol::Udp,
        };
        stamp_via(&mut m, peer);
        let via = m.top_via().expect("via");
        assert_eq!(
            via.param("received").and_then(|p| p.value.as_deref()),
            Some("192.0.2.9")
        );
        assert_eq!(
            via.param("rport").and_then(|p| p.value.as_deref()),
            Some("40000")
        );
        assert_eq!(via.branch(), Some("z9hG4bK1"));
    }
}
