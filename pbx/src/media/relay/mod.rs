//! The packet relay: std threads named `media-relay-N`, each owning the
//! sockets of the calls it was given, so that media load never competes
//! with signalling for the tokio runtime. The signalling side talks to a
//! thread only through a command queue and an eventfd; the hot path takes
//! no lock. Each stream is symmetric RTP: a leg latches onto the address
//! its first packet came from (phones behind NAT send from elsewhere than
//! their SDP says), and once latched, packets from any other source are
//! dropped, not forwarded. A leg latches only once its SDP has been seen,
//! so that packets sprayed at a ringing call's ports cannot claim its media
//! before the phone does. This module owns what every thread does whatever
//! way it waits for packets: io_uring (`uring.rs`) where the kernel and
//! seccomp allow it, epoll (`epoll.rs`) otherwise, or, where asked and
//! allowed CAP_NET_RAW, one AF_PACKET ring (`packet.rs`) (`media.relay_io`).
//!
//! Why it is built this way (2-core shared VM, `benches/relay.rs` and
//! `shared/bench/compare media`, 150 calls at 50 packets a second each
//! way; figures are CPU per relayed packet and move by 10-20% from run to
//! run with the neighbours' load):
//!
//! - Where the time goes (perf, io_uring): the UDP send about 53% (of all
//!   time: 23% the far socket's receive path, which loopback runs in the
//!   sender's context, 13% building the skb, 7% the loopback device), the
//!   UDP receive 23%, waiting and sleeping 6%, io_uring's own work and
//!   this code the rest. The floor, recvfrom plus sendto on one warm
//!   socket pair, measured 4.8-5.4 us.
//! - What io_uring still costs per packet beyond that floor includes a
//!   failed receive: UDP does not report what is left in a socket, so a
//!   multishot recvmsg tries again after every packet and meets EAGAIN
//!   (traced with sock:sock_recv_length: 29,100 failed against 30,000
//!   good receives in 2 s); no io_uring option avoids that for datagrams.
//!   An unconnected send also looks up its route and copies its address.
//!   A second socket per latched leg, on the same port (SO_REUSEPORT) and
//!   connected to the phone, would take the phone's packets from then on
//!   and skip both, with no move race (other sources still reach the
//!   first socket): measured 8,000 against 8,400 ns per packet over five
//!   alternating runs, 5%, not worth twice the sockets and descriptors.
//! - io_uring against epoll, same build: 7,400-7,800 against 8,400-9,500
//!   ns per packet at 150 calls, 7,400-7,800 against 8,600-8,800 at 800
//!   to 1,200 calls; one io_uring thread carried 1,600 calls (137,000
//!   packets a second, the load generator's limit) without loss where
//!   epoll saturated at 1,200. Multishot receives take the place of
//!   epoll_wait and recvfrom, sends from the receive buffers need no copy,
//!   fixed files skip a descriptor lookup per send, and MSG_DONTWAIT sends
//!   with CQE_SKIP_SUCCESS post no completion.
//! - Sockets are not connect()ed to the phone they latch onto, though a
//!   send then skips the route lookup (0.3-0.7 us, within the noise of a
//!   whole run). A connected socket's kernel drops every other source at
//!   once, so a phone that moves (re-INVITE to a new address) loses the
//!   packets it sends before the relay thread has applied the new SDP; an
//!   unconnected socket keeps them for the thread to route after it has.
//!   Connecting also needs sockets bound to the advertised address, which
//!   a multi-homed node may not receive on.
//! - A busy thread wakes at most once per TICK (2 ms) and then serves
//!   every ready socket: 8,300-9,200 ns per packet against 9,900-12,600 ns
//!   with 0.5 ms pauses (epoll), mainly fewer wake-ups per packet and
//!   far-end receivers that are already awake.
//! - A round reads every ready socket before it sends anything, so the
//!   far ends get their packets in one quick burst: a receiver woken by
//!   the first finds the rest waiting. perf: waking receivers fell from
//!   7.3% to 5.4% of the thread's time (epoll).
//! - Wildcard sockets are IPv4-only when the advertised address is IPv4:
//!   through a dual-stack socket IPv4 takes the udpv6 functions first.
//! - recvmmsg/sendmmsg batch per socket only, and a stream brings one
//!   packet per 20 ms, so even per tick the batch is 1: they measured no
//!   better than recvfrom+sendto (5.9 against 5.4 us at batch 1).
//! - The packet ring takes away what waiting on many sockets costs: one
//!   ring brings every stream's packets with no system call per packet,
//!   and raw sockets send a whole round's packets in one sendmmsg. With
//!   whole IPv4 headers (IP_HDRINCL) the kernel skips building them.
//!   Measured at 150 calls, alternating runs: 3,300-4,700 against
//!   5,300-6,400 ns per packet for io_uring (`benches/relay.rs`), and 0.31
//!   to 0.51 of rtpengine's CPU (median 0.40 of 31 runs) against 0.48-0.61
//!   (`compare media`). What is left is the send: perf puts about half of
//!   the thread's time in the far end's receive, which loopback runs in the
//!   sender's context, and most of the rest in building, routing and
//!   queueing the packet. Neither a longer tick (4 or 5 ms) nor skipping
//!   the kernel's choice of IPv4 identification moved it measurably.

mod epoll;
mod packet;
mod uring;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc::UnboundedSender;

use super::port_pool::PortPool;
use super::{MediaError, MediaEvent, MediaSessionId};
use crate::config::RelayIo;
use crate::limits::{self, OutOfFilesReport};

/// Packets and bytes a call relayed, by direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaCounters {
    pub a_to_b_packets: u64,
    pub a_to_b_bytes: u64,
    pub b_to_a_packets: u64,
    pub b_to_a_bytes: u64,
    /// Packets refused: from a stranger after latching, or with nowhere to go.
    pub dropped: u64,
}

/// Written by one relay thread only, read by anyone.
#[derive(Debug, Default)]
pub struct Counters {
    packets: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    dropped: AtomicU64,
}

/// Adds without a locked instruction: each counter has a single writer.
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Ordering::Relaxed) + by, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> MediaCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MediaCounters {
            a_to_b_packets: get(&self.packets[0]),
            a_to_b_bytes: get(&self.bytes[0]),
            b_to_a_packets: get(&self.packets[1]),
            b_to_a_bytes: get(&self.bytes[1]),
            dropped: get(&self.dropped),
        }
    }
}

/// The sockets of one stream: per leg (A, B), RTP on the even port and
/// RTCP on the odd one.
#[derive(Debug)]
struct StreamSockets {
    ports: [u16; 2],
    sockets: [[UdpSocket; 2]; 2],
}

/// Where the PBX sends one leg's RTP and RTCP before it has latched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    pub rtp: SocketAddr,
    pub rtcp: SocketAddr,
}

/// What new SDP of a leg does to the source it latched onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latch {
    Keep,
    /// An offer moved the leg: latch afresh, keeping the old source aside
    /// in case the offer fails.
    SetAside,
    /// The offer that moved the leg failed: the source set aside is back.
    Restore,
}

enum Command {
    Add {
        session: u64,
        index: usize,
        sockets: StreamSockets,
        counters: Arc<Counters>,
    },
    Remote {
        session: u64,
        index: usize,
        leg: usize,
        remote: Option<Remote>,
        latch: Latch,
    },
    Pause {
        session: u64,
        paused: bool,
    },
    /// Ends one stream of the session (`index`), or all of it.
    Remove {
        session: u64,
        index: Option<usize>,
    },
}

/// The relay threads and how to reach them.
#[derive(Debug)]
pub struct Relay {
    workers: Vec<Worker>,
    /// Packet rings, one a thread, each take their share of the pool.
    rings: bool,
    dual_stack: bool,
    packets: Arc<AtomicU64>,
    out_of_files: OutOfFilesReport,
}

#[derive(Debug)]
struct Worker {
    commands: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
    thread: JoinHandle<()>,
}

impl Relay {
    /// Starts `threads` relay threads (at least one), whose sockets take
    /// the family of `advertised`, the address phones are told to send to.
    /// Each thread waits on its sockets through `io` (see [`RelayIo`]).
    pub fn start(
        threads: usize,
        io: RelayIo,
        advertised: IpAddr,
        pool: Arc<PortPool>,
        rtp_timeout: Duration,
        events: UnboundedSender<MediaEvent>,
    ) -> io::Result<Self> {
        let packets = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        let mut backend = "epoll";
        let threads = threads.max(1);
        for n in 0..threads {
            let (commands, queue) = mpsc::channel();
            let wake = Arc::new(eventfd()?);
            let (started, outcome) = mpsc::sync_channel(1);
            let thread = Thread {
                queue,
                wake: wake.clone(),
                pool: pool.clone(),
                events: events.clone(),
                rtp_timeout,
                packets: packets.clone(),
                streams: Vec::new(),
                free_slots: Vec::new(),
                sessions: HashMap::new(),
                generation: 0,
                since_sweep: 0,
                busy: false,
                next_sweep: Instant::now() + SWEEP_EVERY,
            };
            let handle = std::thread::Builder::new()
                .name(format!("media-relay-{n}"))
                .spawn(move || run(thread, io, (n, threads), started))?;
            backend = outcome.recv().map_err(|_| {
                io::Error::other("a media relay thread stopped before it started")
            })??;
            workers.push(Worker {
                commands,
                wake,
                thread: handle,
            });
        }
        tracing::info!(threads = workers.len(), backend, "media relay started");
        Ok(Self {
            workers,
            rings: io == RelayIo::PacketRing,
            // An IPv4 node gets IPv4 sockets: IPv4 packets through a
            // dual-stack socket take the longer udpv6 paths of the kernel.
            dual_stack: advertised.is_ipv6()
                && Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).is_ok(),
            packets,
            out_of_files: OutOfFilesReport::default(),
        })
    }

    /// Packets relayed by every thread since start.
    pub fn packets(&self) -> Arc<AtomicU64> {
        self.packets.clone()
    }

    /// Binds the sockets of one leg of a stream of `session` on a free pair
    /// of the pool (of the session's thread's share, for packet rings);
    /// pairs some other program holds are skipped. Out of descriptors it
    /// stops at once, as every other pair would fail the same way.
    pub fn bind_pair(
        &self,
        pool: &PortPool,
        session: MediaSessionId,
    ) -> Result<(u16, [UdpSocket; 2]), MediaError> {
        let (first, thread, rings) = (
            pool.range().start,
            self.thread_of(session),
            self.workers.len(),
        );
        let fits = |port| !self.rings || packet::ring_of(port, first, rings) == thread;
        for _ in 0..pool.capacity() {
            let Some(port) = pool.allocate_where(fits) else {
                break;
            };
            let pair = self.bind(port).and_then(|rtp| {
                let rtcp = port.checked_add(1).ok_or(io::ErrorKind::AddrNotAvailable)?;
                Ok([rtp, self.bind(rtcp)?])
            });
            match pair {
                Ok(sockets) => return Ok((port, sockets)),
                Err(e) if limits::out_of_files(&e) => {
                    pool.release(port);
                    self.out_of_files.report(
                        &e,
                        "media sockets cannot be opened, new calls are refused with 503 until others end",
                    );
                    return Err(MediaError::OutOfFiles);
                }
                Err(_) => pool.release(port),
            }
        }
        Err(MediaError::PoolExhausted)
    }

    fn bind(&self, port: u16) -> io::Result<UdpSocket> {
        let socket = if self.dual_stack {
            let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            s
        } else {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            s
        };
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    }

    /// Which thread carries a session.
    pub fn thread_of(&self, session: MediaSessionId) -> usize {
        usize::try_from(session.0).unwrap_or_default() % self.workers.len()
    }

    fn send(&self, session: MediaSessionId, command: Command) {
        let Some(worker) = self.workers.get(self.thread_of(session)) else {
            return;
        };
        if worker.commands.send(command).is_ok() {
            wake(&worker.wake);
        }
    }

    /// Hands a stream's sockets to the session's thread.
    pub fn add(
        &self,
        session: MediaSessionId,
        index: usize,
        ports: [(u16, [UdpSocket; 2]); 2],
        counters: Arc<Counters>,
    ) {
        let [(a, a_sockets), (b, b_sockets)] = ports;
        let sockets = StreamSockets {
            ports: [a, b],
            sockets: [a_sockets, b_sockets],
        };
        self.send(
            session,
            Command::Add {
                session: session.0,
                index,
                sockets,
                counters,
            },
        );
    }

    /// The SDP of leg `leg` (0 = A) of stream `index` was seen: the leg may
    /// latch, and `remote`, when known, is where to send until it does.
    pub fn set_remote(
        &self,
        session: MediaSessionId,
        index: usize,
        leg: usize,
        remote: Option<Remote>,
        latch: Latch,
    ) {
        let form = |addr| socket_form(self.dual_stack, addr);
        let remote = remote.and_then(|r| {
            Some(Remote {
                rtp: form(r.rtp)?,
                rtcp: form(r.rtcp)?,
            })
        });
        self.send(
            session,
            Command::Remote {
                session: session.0,
                index,
                leg,
                remote,
                latch,
            },
        );
    }

    /// A held call sends no RTP: its timeout waits until it resumes.
    pub fn pause(&self, session: MediaSessionId, paused: bool) {
        self.send(
            session,
            Command::Pause {
                session: session.0,
                paused,
            },
        );
    }

    /// Closes the session's sockets; its thread gives the ports back.
    pub fn remove(&self, session: MediaSessionId) {
        let command = Command::Remove {
            session: session.0,
            index: None,
        };
        self.send(session, command);
    }

    /// Closes the sockets of stream `index` (an m-line the call no longer
    /// carries); the session's other streams go on.
    pub fn remove_stream(&self, session: MediaSessionId, index: usize) {
        let command = Command::Remove {
            session: session.0,
            index: Some(index),
        };
        self.send(session, command);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for Worker {
            commands,
            wake: fd,
            thread,
        } in self.workers.drain(..)
        {
            drop(commands);
            wake(&fd);
            if thread.join().is_err() {
                tracing::error!("a media relay thread panicked");
            }
        }
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd. A full counter
    // (EAGAIN) already means "awake", so the result needs no check.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// The form in which the relay's sockets see `addr`: IPv4 peers of a
/// dual-stack socket appear as IPv4-mapped IPv6 addresses; an IPv6 peer is
/// out of reach of an IPv4-only relay.
fn socket_form(dual_stack: bool, addr: SocketAddr) -> Option<SocketAddr> {
    match (dual_stack, addr.ip()) {
        (true, IpAddr::V4(v4)) => Some(SocketAddr::new(
            IpAddr::V6(v4.to_ipv6_mapped()),
            addr.port(),
        )),
        (true, IpAddr::V6(_)) | (false, IpAddr::V4(_)) => Some(addr),
        (false, IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(IpAddr::V4(v4), addr.port())),
    }
}

fn drain_eventfd(fd: RawFd) {
    let mut value: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64.
    unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
}

/// Runs a relay thread on the backend `io` asks for, after telling
/// `started` which one it got (or why it could not start). `(n, threads)`
/// is the thread's place, which picks its share of the pool for a packet
/// ring.
fn run(
    thread: Thread,
    io: RelayIo,
    (n, threads): (usize, usize),
    started: mpsc::SyncSender<io::Result<&'static str>>,
) {
    let ring = match io {
        RelayIo::PacketRing => {
            let range = thread.pool.range();
            let wake = thread.wake.as_raw_fd();
            match packet::Tap::new(wake, range.start, range.end, n, threads) {
                Ok(tap) => {
                    let _ = started.send(Ok("packet_ring"));
                    packet::run(thread, tap);
                }
                Err(e) => {
                    let _ = started.send(Err(io::Error::new(
                        e.kind(),
                        format!("media.relay_io is packet_ring, but the packet ring cannot open (it needs CAP_NET_RAW): {e}"),
                    )));
                }
            }
            return;
        }
        RelayIo::Epoll => None,
        RelayIo::IoUring | RelayIo::Auto => {
            match uring::Ring::new(thread.wake.as_raw_fd(), thread.pool.capacity() * 2) {
                Ok(ring) => Some(ring),
                Err(e) if io == RelayIo::Auto => {
                    tracing::info!(error = %e, "media relay: io_uring unavailable, using epoll");
                    None
                }
                Err(e) => {
                    let _ = started.send(Err(io::Error::new(
                        e.kind(),
                        format!("media.relay_io is io_uring, but io_uring cannot start: {e}"),
                    )));
                    return;
                }
            }
        }
    };
    match ring {
        Some(ring) => {
            let _ = started.send(Ok("io_uring"));
            uring::run(thread, ring);
        }
        None => match epoll::Poll::new(thread.wake.as_raw_fd()) {
            Ok(poll) => {
                let _ = started.send(Ok("epoll"));
                epoll::run(thread, poll);
            }
            Err(e) => {
                let _ = started.send(Err(e));
            }
        },
    }
}

const SWEEP_EVERY: Duration = Duration::from_millis(200);
/// Above this many packets a sweep (5,000 a second) a relay thread is busy:
/// a round that relayed packets is followed by a wait to the end of its
/// TICK, so that one wake-up serves the packets of many streams instead of
/// one each. That delays a packet by up to 2 ms, well inside any jitter
/// buffer. A thread that finds nothing to read waits for the next packet,
/// busy or not, so idle calls never spin.
const BUSY_PACKETS_PER_SWEEP: u64 = 1000;
const TICK: Duration = Duration::from_millis(2);

/// Where a socket sits in a thread's table: the stream's slot and the
/// slot's incarnation (a slot is reused by later calls), the leg (0 = A)
/// and RTP (0) or RTCP (1). Backends carry it encoded in 50 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    slot: usize,
    generation: u16,
    leg: usize,
    kind: usize,
}

impl Token {
    fn encode(self) -> u64 {
        ((self.slot as u64 & 0xFFFF_FFFF) << 18)
            | (u64::from(self.generation) << 2)
            | ((self.leg as u64 & 1) << 1)
            | (self.kind as u64 & 1)
    }

    /// The tokens of the four sockets of the stream in `slot`.
    fn of_stream(slot: usize, generation: u16) -> impl Iterator<Item = Token> {
        (0..2).flat_map(move |leg| {
            (0..2).map(move |kind| Token {
                slot,
                generation,
                leg,
                kind,
            })
        })
    }

    fn decode(value: u64) -> Self {
        Self {
            slot: usize::try_from((value >> 18) & 0xFFFF_FFFF).unwrap_or(usize::MAX),
            generation: u16::try_from((value >> 2) & 0xFFFF).unwrap_or_default(),
            leg: usize::from(value & 2 != 0),
            kind: usize::from(value & 1 != 0),
        }
    }
}

/// What a backend keeps of a socket it watches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hold {
    /// A request stays pending on the socket, and its port is not free,
    /// until the backend reports [`Thread::let_go`].
    pending: bool,
    /// Where the backend registered the socket (an io_uring fixed file).
    fixed: Option<u32>,
}

/// How a relay thread hears of packets on its sockets.
trait Watch {
    /// Starts watching a socket.
    fn watch(&mut self, socket: RawFd, token: Token) -> Hold;
    /// Stops watching a socket the backend holds as `hold`.
    fn unwatch(&mut self, socket: RawFd, token: Token, hold: Hold);
}

/// One direction of one leg: RTP or RTCP.
#[derive(Debug)]
struct Channel {
    socket: UdpSocket,
    sdp: Option<SocketAddr>,
    /// The leg's SDP has been seen.
    signalled: bool,
    latched: Option<SocketAddr>,
    /// The source latched before an offer moved the leg.
    set_aside: Option<SocketAddr>,
    hold: Hold,
}

#[derive(Debug)]
struct StreamEntry {
    index: usize,
    generation: u16,
    ports: [u16; 2],
    /// `[leg][0 = RTP, 1 = RTCP]`.
    channels: [[Channel; 2]; 2],
    counters: Arc<Counters>,
    last_rtp: Instant,
    /// The call is gone; the slot waits for the backend to let go of its
    /// sockets.
    closing: bool,
}

impl StreamEntry {
    fn channel(&self, leg: usize, kind: usize) -> Option<&Channel> {
        self.channels.get(leg)?.get(kind)
    }

    fn channel_mut(&mut self, leg: usize, kind: usize) -> Option<&mut Channel> {
        self.channels.get_mut(leg)?.get_mut(kind)
    }

    /// A backend still holds one of its sockets: its ports are not free.
    fn held(&self) -> bool {
        self.channels.iter().flatten().any(|c| c.hold.pending)
    }
}

#[derive(Debug)]
struct SessionEntry {
    slots: Vec<usize>,
    paused: bool,
    fired: bool,
    /// Signalling touched the session then: the timeout counts from here.
    since: Instant,
}

/// Where in a session's `slots` the slot of its stream `index` is.
fn find_slot(streams: &[Option<StreamEntry>], slots: &[usize], index: usize) -> Option<usize> {
    slots.iter().position(|&slot| {
        streams
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.index == index)
    })
}

/// What a relay thread owns whatever its backend: the streams and their
/// latching, the commands from signalling, the counters and the
/// `rtp_timeout` sweep.
struct Thread {
    queue: mpsc::Receiver<Command>,
    wake: Arc<OwnedFd>,
    pool: Arc<PortPool>,
    events: UnboundedSender<MediaEvent>,
    rtp_timeout: Duration,
    packets: Arc<AtomicU64>,
    streams: Vec<Option<StreamEntry>>,
    free_slots: Vec<usize>,
    sessions: HashMap<u64, SessionEntry>,
    generation: u16,
    since_sweep: u64,
    busy: bool,
    next_sweep: Instant,
}

impl Thread {
    /// The stream a token names, live or closing, while that incarnation
    /// of the slot exists.
    fn named(&self, token: Token) -> Option<&StreamEntry> {
        self.streams
            .get(token.slot)?
            .as_ref()
            .filter(|s| s.generation == token.generation)
    }

    fn named_mut(&mut self, token: Token) -> Option<&mut StreamEntry> {
        self.streams
            .get_mut(token.slot)?
            .as_mut()
            .filter(|s| s.generation == token.generation)
    }

    /// The live stream a token names, if it still exists.
    fn stream(&self, token: Token) -> Option<&StreamEntry> {
        self.named(token).filter(|s| !s.closing)
    }

    /// The socket a token names, while its stream lives.
    fn input(&self, token: Token) -> Option<&UdpSocket> {
        let channel = self.stream(token)?.channel(token.leg, token.kind)?;
        Some(&channel.socket)
    }

    /// The socket that sends on what arrives at `token`'s socket: the
    /// other leg's, of the same kind, and how the backend holds it.
    fn output(&self, token: Token) -> Option<(&UdpSocket, Hold)> {
        let channel = self.stream(token)?.channel(1 - token.leg, token.kind)?;
        Some((&channel.socket, channel.hold))
    }

    /// The port of the socket that sends on what arrives at `token`'s.
    fn output_port(&self, token: Token) -> Option<u16> {
        let even = *self.stream(token)?.ports.get(1 - token.leg)?;
        even.checked_add(token.kind as u16)
    }

    /// How the backend holds `token`'s socket, live or closing.
    fn hold(&self, token: Token) -> Hold {
        self.named(token)
            .and_then(|s| s.channel(token.leg, token.kind))
            .map(|c| c.hold)
            .unwrap_or_default()
    }

    /// Where a packet that reached `token`'s socket from `source` goes:
    /// `None` drops it (counted) when it comes from a stranger, before the
    /// leg may latch, or has nowhere to go.
    fn route(&mut self, token: Token, source: SocketAddr, now: Instant) -> Option<SocketAddr> {
        let entry = self.named_mut(token).filter(|s| !s.closing)?;
        let [a, b] = &mut entry.channels;
        let (from, to) = if token.leg == 0 { (a, b) } else { (b, a) };
        let (input, output) = (from.get_mut(token.kind)?, to.get(token.kind)?);
        match input.latched {
            Some(latched) if latched != source => {
                bump(&entry.counters.dropped, 1);
                return None;
            }
            Some(_) => {}
            None if input.signalled => {
                let even = entry.ports.get(token.leg).copied().unwrap_or_default();
                tracing::debug!(port = even + token.kind as u16, %source, "media: latched");
                input.latched = Some(source);
            }
            None => {
                bump(&entry.counters.dropped, 1);
                return None;
            }
        }
        if token.kind == 0 {
            entry.last_rtp = now;
        }
        let destination = output.latched.or(output.sdp);
        if destination.is_none() {
            bump(&entry.counters.dropped, 1);
        }
        destination
    }

    /// A packet that arrived at `token`'s socket went out, `len` bytes.
    fn sent(&self, token: Token, len: usize) {
        let Some(entry) = self.stream(token) else {
            return;
        };
        if let (Some(packets), Some(bytes)) = (
            entry.counters.packets.get(token.leg),
            entry.counters.bytes.get(token.leg),
        ) {
            bump(packets, 1);
            bump(bytes, len as u64);
        }
    }

    /// A packet that arrived at `token`'s socket could not go out.
    fn failed(&self, token: Token) {
        if let Some(entry) = self.stream(token) {
            bump(&entry.counters.dropped, 1);
        }
    }

    /// Ends a round of `relayed` packets that began at `now`: counts them
    /// and runs the sweep when due. False once the signalling side is gone.
    fn end_round(&mut self, relayed: u64, now: Instant, io: &mut impl Watch) -> bool {
        if relayed > 0 {
            self.packets.fetch_add(relayed, Ordering::Relaxed);
            self.since_sweep += relayed;
        }
        if now < self.next_sweep {
            return true;
        }
        self.busy = self.since_sweep >= BUSY_PACKETS_PER_SWEEP;
        self.since_sweep = 0;
        self.sweep(now);
        self.next_sweep = now + SWEEP_EVERY;
        // Also here: a wake-up lost to a failed eventfd write must not
        // leave commands (or the order to stop) waiting.
        self.commands(io)
    }

    /// How long a busy thread should wait before its next round, which
    /// began at `start` and had packets; `None`: until the next packet.
    fn pause(&self, had_packets: bool, start: Instant) -> Option<Duration> {
        if !(self.busy && had_packets) {
            return None;
        }
        (start + TICK).checked_duration_since(Instant::now())
    }

    /// Applies queued commands; false once the signalling side is gone.
    fn commands(&mut self, io: &mut impl Watch) -> bool {
        loop {
            match self.queue.try_recv() {
                Ok(command) => self.apply(command, io),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn apply(&mut self, command: Command, io: &mut impl Watch) {
        let now = Instant::now();
        match command {
            Command::Add {
                session,
                index,
                sockets,
                counters,
            } => self.add(session, index, sockets, counters, now, io),
            Command::Remote {
                session,
                index,
                leg,
                remote,
                latch,
            } => {
                let Some(entry) = self.sessions.get_mut(&session) else {
                    return;
                };
                entry.since = now;
                let slot = find_slot(&self.streams, &entry.slots, index)
                    .and_then(|at| entry.slots.get(at).copied());
                let stream = slot.and_then(|slot| self.streams.get_mut(slot)?.as_mut());
                if let Some([rtp, rtcp]) = stream.and_then(|s| s.channels.get_mut(leg)) {
                    let addrs = [remote.map(|r| r.rtp), remote.map(|r| r.rtcp)];
                    for (channel, addr) in [rtp, rtcp].into_iter().zip(addrs) {
                        channel.signalled = true;
                        channel.sdp = addr.or(channel.sdp);
                        match latch {
                            Latch::Keep => {}
                            Latch::SetAside => channel.set_aside = channel.latched.take(),
                            Latch::Restore => channel.latched = channel.set_aside.take(),
                        }
                    }
                }
            }
            Command::Pause { session, paused } => {
                if let Some(entry) = self.sessions.get_mut(&session) {
                    entry.paused = paused;
                    entry.since = now;
                }
            }
            Command::Remove { session, index } => self.remove(session, index, io),
        }
    }

    fn add(
        &mut self,
        session: u64,
        index: usize,
        sockets: StreamSockets,
        counters: Arc<Counters>,
        now: Instant,
        io: &mut impl Watch,
    ) {
        let slot = self.free_slots.pop().unwrap_or(self.streams.len());
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let [[a_rtp, a_rtcp], [b_rtp, b_rtcp]] = sockets.sockets;
        let channel = |socket| Channel {
            socket,
            sdp: None,
            signalled: false,
            latched: None,
            set_aside: None,
            hold: Hold::default(),
        };
        let mut entry = StreamEntry {
            index,
            generation,
            ports: sockets.ports,
            channels: [
                [channel(a_rtp), channel(a_rtcp)],
                [channel(b_rtp), channel(b_rtcp)],
            ],
            counters,
            last_rtp: now,
            closing: false,
        };
        for token in Token::of_stream(slot, generation) {
            if let Some(channel) = entry.channel_mut(token.leg, token.kind) {
                channel.hold = io.watch(channel.socket.as_raw_fd(), token);
            }
        }
        if slot == self.streams.len() {
            self.streams.push(Some(entry));
        } else if let Some(place) = self.streams.get_mut(slot) {
            *place = Some(entry);
        }
        self.sessions
            .entry(session)
            .or_insert_with(|| SessionEntry {
                slots: Vec::new(),
                paused: false,
                fired: false,
                since: now,
            })
            .slots
            .push(slot);
    }

    /// Closes stream `index` of the session, or the whole session.
    fn remove(&mut self, session: u64, index: Option<usize>, io: &mut impl Watch) {
        let slots = match index {
            None => self.sessions.remove(&session).map(|entry| entry.slots),
            Some(index) => self.sessions.get_mut(&session).and_then(|entry| {
                let at = find_slot(&self.streams, &entry.slots, index)?;
                Some(vec![entry.slots.swap_remove(at)])
            }),
        };
        for slot in slots.into_iter().flatten() {
            let Some(stream) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            stream.closing = true;
            for token in Token::of_stream(slot, stream.generation) {
                if let Some(channel) = stream.channel(token.leg, token.kind) {
                    io.unwatch(channel.socket.as_raw_fd(), token, channel.hold);
                }
            }
            if !stream.held() {
                self.release(slot);
            }
        }
    }

    /// The backend no longer holds `token`'s socket. A closing stream whose
    /// sockets are all let go gives its ports back; a live one has lost a
    /// socket's packets, which is reported.
    fn let_go(&mut self, token: Token) {
        let Some(entry) = self.named_mut(token) else {
            return;
        };
        if let Some(channel) = entry.channel_mut(token.leg, token.kind) {
            channel.hold.pending = false;
        }
        if !entry.closing {
            tracing::warn!(
                port = entry.ports.get(token.leg).copied().unwrap_or_default() + token.kind as u16,
                "media relay stopped receiving on a port"
            );
        } else if !entry.held() {
            self.release(token.slot);
        }
    }

    /// Closes a slot's sockets and gives its ports back.
    fn release(&mut self, slot: usize) {
        let Some(stream) = self.streams.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let ports = stream.ports;
        drop(stream);
        for port in ports {
            self.pool.release(port);
        }
        self.free_slots.push(slot);
    }

    /// Ends every session, as the thread stops.
    fn shutdown(&mut self, io: &mut impl Watch) {
        let sessions: Vec<u64> = self.sessions.keys().copied().collect();
        for session in sessions {
            self.remove(session, None, io);
        }
    }

    /// Reports sessions that are past `rtp_timeout` without RTP, once each.
    fn sweep(&mut self, now: Instant) {
        for (&session, entry) in &mut self.sessions {
            if entry.paused || entry.fired {
                continue;
            }
            let mut last = entry.since;
            let mut established = false;
            for stream in entry
                .slots
                .iter()
                .filter_map(|&slot| self.streams.get(slot).and_then(Option::as_ref))
            {
                last = last.max(stream.last_rtp);
                established |= stream.channels.iter().all(|[rtp, _]| rtp.signalled);
            }
            if established && now.duration_since(last) >= self.rtp_timeout {
                tracing::info!(session, "media: no RTP for rtp_timeout");
                entry.fired = true;
                let _ = self
                    .events
                    .send(MediaEvent::RtpTimeout(MediaSessionId(session)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("literal")
    }

    #[test]
    fn addresses_take_the_form_the_sockets_see() {
        let v4 = addr("192.0.2.1:4000");
        let mapped = addr("[::ffff:192.0.2.1]:4000");
        let v6 = addr("[2001:db8::1]:4000");
        assert_eq!(socket_form(true, v4), Some(mapped));
        assert_eq!(socket_form(true, v6), Some(v6));
        assert_eq!(socket_form(false, v4), Some(v4));
        assert_eq!(socket_form(false, mapped), Some(v4));
        assert_eq!(socket_form(false, v6), None);
    }

    #[test]
    fn tokens_keep_slot_generation_leg_and_kind_apart() {
        let token = Token {
            slot: 12345,
            generation: 0xBEEF,
            leg: 1,
            kind: 0,
        };
        assert_eq!(Token::decode(token.encode()), token);
        assert!(token.encode() < 1 << 50, "room for a backend's tag bits");
        let stream: Vec<(usize, usize)> = Token::of_stream(12345, 0xBEEF)
            .inspect(|t| assert_eq!((t.slot, t.generation), (12345, 0xBEEF)))
            .map(|t| (t.leg, t.kind))
            .collect();
        assert_eq!(stream, [(0, 0), (0, 1), (1, 0), (1, 1)]);
    }
}
