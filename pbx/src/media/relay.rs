//! The packet relay: std threads named `media-relay-N`, each owning the
//! sockets of the calls it was given and waiting on them with epoll, so that
//! media load never competes with signalling for the tokio runtime. The
//! signalling side talks to a thread only through a command queue and an
//! eventfd; the hot path takes no lock. Each stream is symmetric RTP: a leg
//! latches onto the address its first packet came from (phones behind NAT
//! send from elsewhere than their SDP says), and once latched, packets from
//! any other source are dropped, not forwarded. A leg latches only once its
//! SDP has been seen, so that packets sprayed at a ringing call's ports
//! cannot claim its media before the phone does.
//!
//! Why it is built this way (2-core shared VM, `benches/relay.rs` and
//! `shared/bench/compare media`, 150 calls at 50 packets a second each
//! way; figures are CPU per relayed packet and move by 10-20% from run to
//! run with the neighbours' load):
//!
//! - Where the time goes (perf): sendto about 62% (a quarter of all of it
//!   is the far socket's receive path, which loopback runs in the sender's
//!   context, a tenth building the skb, 4% the route lookup), recvfrom 18%,
//!   epoll_wait 11%, sleeping 2%, this code about 4% (mostly samples
//!   landing on the return from a system call). The floor, recvfrom plus
//!   sendto on one warm socket pair, measured 4.8-5.4 us; a system call
//!   alone, 250 ns.
//! - A busy thread wakes at most once per TICK (2 ms) and then serves
//!   every ready socket: 8,300-9,200 ns per packet against 9,900-12,600 ns
//!   with 0.5 ms pauses, mainly fewer epoll_wait and sleep rounds per
//!   packet and far-end receivers that are already awake.
//! - A round reads every ready socket before it sends anything, so the
//!   far ends get their packets in one quick burst: a receiver woken by
//!   the first finds the rest waiting. perf: waking receivers fell from
//!   7.3% to 5.4% of the thread's time; 9,560 against 9,930 ns per packet
//!   (means of six runs each).
//! - Sockets are IPv4-only when the advertised address is IPv4: through a
//!   dual-stack socket IPv4 takes the udpv6 functions first. perf shows
//!   those gone; the gain (a few percent) is inside the noise. An IPv6
//!   address in a phone's SDP is then out of reach until the phone's
//!   first packet (necessarily IPv4, to the advertised address) latches.
//! - recvmmsg/sendmmsg batch per socket only, and a stream brings one
//!   packet per 20 ms, so even per tick the batch is 1: they measured no
//!   better than recvfrom+sendto (5.9 against 5.4 us at batch 1).
//! - io_uring (recv and sendmsg for 256 sockets a batch) measured 5-15%
//!   cheaper; from the perf split above, multishot receives could at best
//!   drop the system calls and most of epoll (about 15%). Either way it
//!   stays above half of rtpengine's cost, needs a ring written by hand,
//!   and is refused by the default seccomp profiles of Docker and
//!   containerd (a pod's RuntimeDefault), so it would need the plain path
//!   as well.
//! - Sockets are not connect()ed to the latched peer, though send() then
//!   measured 0.3-0.7 us cheaper than sendto(): connecting pins the
//!   socket's local address to the route's source address, and a
//!   multi-homed node whose phones send to another of its addresses would
//!   lose their media.

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
        relatch: bool,
    },
    Pause {
        session: u64,
        paused: bool,
    },
    Remove {
        session: u64,
    },
}

/// The relay threads and how to reach them.
#[derive(Debug)]
pub struct Relay {
    workers: Vec<Worker>,
    dual_stack: bool,
    packets: Arc<AtomicU64>,
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
    pub fn start(
        threads: usize,
        advertised: IpAddr,
        pool: Arc<PortPool>,
        rtp_timeout: Duration,
        events: UnboundedSender<MediaEvent>,
    ) -> io::Result<Self> {
        let packets = Arc::new(AtomicU64::new(0));
        let workers = (0..threads.max(1))
            .map(|n| {
                let (commands, queue) = mpsc::channel();
                let wake = Arc::new(eventfd()?);
                let thread = Thread {
                    poll: Poll::new()?,
                    queue,
                    wake: wake.clone(),
                    pool: pool.clone(),
                    events: events.clone(),
                    rtp_timeout,
                    packets: packets.clone(),
                    streams: Vec::new(),
                    free_slots: Vec::new(),
                    sessions: HashMap::new(),
                };
                let thread = std::thread::Builder::new()
                    .name(format!("media-relay-{n}"))
                    .spawn(move || thread.run())?;
                Ok(Worker {
                    commands,
                    wake,
                    thread,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            workers,
            // An IPv4 node gets IPv4 sockets: IPv4 packets through a
            // dual-stack socket take the longer udpv6 paths of the kernel.
            dual_stack: advertised.is_ipv6()
                && Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).is_ok(),
            packets,
        })
    }

    /// Packets relayed by every thread since start.
    pub fn packets(&self) -> Arc<AtomicU64> {
        self.packets.clone()
    }

    /// Binds the sockets of one leg of a stream on a free pair of the pool;
    /// pairs some other program holds are skipped.
    pub fn bind_pair(&self, pool: &PortPool) -> Result<(u16, [UdpSocket; 2]), MediaError> {
        for _ in 0..pool.capacity() {
            let Some(port) = pool.allocate() else { break };
            let rtcp = port.checked_add(1);
            if let (Ok(a), Some(Ok(b))) = (self.bind(port), rtcp.map(|rtcp| self.bind(rtcp))) {
                return Ok((port, [a, b]));
            }
            pool.release(port);
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
    /// latch, and `remote`, when known, is where to send until it does;
    /// `relatch` forgets the latched source (the SDP moved the leg).
    pub fn set_remote(
        &self,
        session: MediaSessionId,
        index: usize,
        leg: usize,
        remote: Option<Remote>,
        relatch: bool,
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
                relatch,
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
        self.send(session, Command::Remove { session: session.0 });
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

fn drain_eventfd(fd: &OwnedFd) {
    let mut value: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64.
    unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
}

/// A level-triggered epoll set.
struct Poll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Poll {
    fn new() -> io::Result<Self> {
        // SAFETY: no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: fd was just created and is owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
        })
    }

    fn control(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `event` outlives the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, token)
    }

    fn delete(&self, fd: RawFd) {
        if let Err(e) = self.control(libc::EPOLL_CTL_DEL, fd, 0) {
            tracing::warn!(error = %e, "media relay: epoll delete failed");
        }
    }

    /// Tokens of the ready sockets.
    fn wait(&mut self, timeout: Duration) -> impl Iterator<Item = u64> + '_ {
        let capacity = libc::c_int::try_from(self.events.len()).unwrap_or(libc::c_int::MAX);
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the buffer holds `capacity` events and lives across the call.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                capacity,
                millis,
            )
        };
        let n = usize::try_from(n).unwrap_or(0);
        self.events.iter().take(n).map(|e| e.u64)
    }
}

const WAKE_TOKEN: u64 = u64::MAX;
const SWEEP_EVERY: Duration = Duration::from_millis(200);
/// Above this many packets a sweep (5,000 a second) a relay thread is busy:
/// a round that relayed packets is followed by a sleep to the end of its
/// TICK, so that one wake-up serves the packets of many streams instead of
/// one each. That delays a packet by up to 2 ms, well inside any jitter
/// buffer. A thread that finds nothing to read blocks in epoll, busy or
/// not, so idle calls never spin.
const BUSY_PACKETS_PER_SWEEP: u64 = 1000;
const TICK: Duration = Duration::from_millis(2);
/// Large enough for any UDP datagram, so nothing is cut short.
const BUFFER: usize = 65536;
/// Room for the packets of one round, which are all read before any is
/// sent: the far ends then get theirs in one quick burst, and a receiver
/// woken by the first finds the rest waiting instead of being woken again.
const BATCH_BYTES: usize = 8 * BUFFER;

/// The packets of one round, back to back in `buffer`.
struct Batch {
    buffer: Vec<u8>,
    used: usize,
    packets: Vec<Outgoing>,
}

/// A packet read and checked, and where it goes.
struct Outgoing {
    slot: usize,
    leg: usize,
    kind: usize,
    destination: SocketAddr,
    start: usize,
    len: usize,
}

/// One direction of one leg: RTP or RTCP.
#[derive(Debug)]
struct Channel {
    socket: UdpSocket,
    sdp: Option<SocketAddr>,
    /// The leg's SDP has been seen.
    signalled: bool,
    latched: Option<SocketAddr>,
}

#[derive(Debug)]
struct StreamEntry {
    index: usize,
    ports: [u16; 2],
    /// `[leg][0 = RTP, 1 = RTCP]`.
    channels: [[Channel; 2]; 2],
    counters: Arc<Counters>,
    last_rtp: Instant,
}

#[derive(Debug)]
struct SessionEntry {
    slots: Vec<usize>,
    paused: bool,
    fired: bool,
    /// Signalling touched the session then: the timeout counts from here.
    since: Instant,
}

struct Thread {
    poll: Poll,
    queue: mpsc::Receiver<Command>,
    wake: Arc<OwnedFd>,
    pool: Arc<PortPool>,
    events: UnboundedSender<MediaEvent>,
    rtp_timeout: Duration,
    packets: Arc<AtomicU64>,
    streams: Vec<Option<StreamEntry>>,
    free_slots: Vec<usize>,
    sessions: HashMap<u64, SessionEntry>,
}

fn token(slot: usize, leg: usize, kind: usize) -> u64 {
    ((slot as u64) << 2) | ((leg as u64) << 1) | kind as u64
}

impl Thread {
    fn run(mut self) {
        if let Err(e) = self.poll.add(self.wake.as_raw_fd(), WAKE_TOKEN) {
            tracing::error!(error = %e, "media relay thread cannot start");
            return;
        }
        let mut batch = Batch {
            buffer: vec![0u8; BATCH_BYTES],
            used: 0,
            packets: Vec::with_capacity(1024),
        };
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        let mut ready = Vec::with_capacity(1024);
        let mut since_sweep = 0;
        let mut busy = false;
        loop {
            ready.clear();
            ready.extend(self.poll.wait(SWEEP_EVERY));
            let full = ready.len() == self.poll.events.len();
            let now = Instant::now();
            // Commands first, so that a packet arriving with the SDP that
            // tells where it goes is not dropped. A token of a socket that a
            // command just closed may now name a new stream's socket: the
            // read then finds nothing, as the sockets are non-blocking.
            if ready.contains(&WAKE_TOKEN) {
                drain_eventfd(&self.wake);
                if !self.commands() {
                    break;
                }
            }
            let mut relayed = 0;
            for &token in ready.iter().filter(|&&t| t != WAKE_TOKEN) {
                if batch.buffer.len() - batch.used < BUFFER {
                    relayed += self.send(&mut batch);
                }
                self.receive(token, &mut batch, now);
            }
            relayed += self.send(&mut batch);
            if relayed > 0 {
                self.packets.fetch_add(relayed, Ordering::Relaxed);
                since_sweep += relayed;
            }
            // A full event buffer means more sockets are ready: read them
            // at once rather than a tick later.
            if busy && relayed > 0 && !full {
                if let Some(rest) = (now + TICK).checked_duration_since(Instant::now()) {
                    std::thread::sleep(rest);
                }
            }
            if now >= next_sweep {
                busy = since_sweep >= BUSY_PACKETS_PER_SWEEP;
                since_sweep = 0;
                self.sweep(now);
                next_sweep = now + SWEEP_EVERY;
                // Also here: a wake-up lost to a failed eventfd write must
                // not leave commands (or the order to stop) waiting.
                if !self.commands() {
                    break;
                }
            }
        }
        let sessions: Vec<u64> = self.sessions.keys().copied().collect();
        for session in sessions {
            self.remove(session);
        }
    }

    /// Reads one datagram from the socket behind `token` into `batch`,
    /// with where it goes, unless it is to be dropped.
    fn receive(&mut self, token: u64, batch: &mut Batch, now: Instant) {
        let slot = usize::try_from(token >> 2).unwrap_or(usize::MAX);
        let leg = usize::from(token & 2 != 0);
        let kind = usize::from(token & 1 != 0);
        let Some(Some(entry)) = self.streams.get_mut(slot) else {
            return;
        };
        let [a, b] = &mut entry.channels;
        let (from, to) = if leg == 0 { (a, b) } else { (b, a) };
        let (Some(input), Some(output)) = (from.get_mut(kind), to.get(kind)) else {
            return;
        };
        let start = batch.used;
        let Some(room) = batch.buffer.get_mut(start..start + BUFFER) else {
            return;
        };
        let Ok((len, source)) = input.socket.recv_from(room) else {
            return;
        };
        match input.latched {
            Some(latched) if latched != source => {
                bump(&entry.counters.dropped, 1);
                return;
            }
            Some(_) => {}
            None if input.signalled => {
                let even = entry.ports.get(leg).copied().unwrap_or_default();
                tracing::debug!(port = even + kind as u16, %source, "media: latched");
                input.latched = Some(source);
            }
            None => {
                bump(&entry.counters.dropped, 1);
                return;
            }
        }
        if kind == 0 {
            entry.last_rtp = now;
        }
        let Some(destination) = output.latched.or(output.sdp) else {
            bump(&entry.counters.dropped, 1);
            return;
        };
        batch.used += len;
        batch.packets.push(Outgoing {
            slot,
            leg,
            kind,
            destination,
            start,
            len,
        });
    }

    /// Sends the packets of `batch`; returns how many went out.
    fn send(&self, batch: &mut Batch) -> u64 {
        let mut sent = 0;
        for packet in batch.packets.drain(..) {
            let Some(Some(entry)) = self.streams.get(packet.slot) else {
                continue;
            };
            let (Some(output), Some(data)) = (
                entry
                    .channels
                    .get(1 - packet.leg)
                    .and_then(|to| to.get(packet.kind)),
                batch.buffer.get(packet.start..packet.start + packet.len),
            ) else {
                continue;
            };
            if output.socket.send_to(data, packet.destination).is_err() {
                bump(&entry.counters.dropped, 1);
                continue;
            }
            if let (Some(packets), Some(bytes)) = (
                entry.counters.packets.get(packet.leg),
                entry.counters.bytes.get(packet.leg),
            ) {
                bump(packets, 1);
                bump(bytes, packet.len as u64);
            }
            sent += 1;
        }
        batch.used = 0;
        sent
    }

    /// Applies queued commands; false once the signalling side is gone.
    fn commands(&mut self) -> bool {
        loop {
            match self.queue.try_recv() {
                Ok(command) => self.apply(command),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn apply(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Add {
                session,
                index,
                sockets,
                counters,
            } => self.add(session, index, sockets, counters, now),
            Command::Remote {
                session,
                index,
                leg,
                remote,
                relatch,
            } => {
                let Some(entry) = self.sessions.get_mut(&session) else {
                    return;
                };
                entry.since = now;
                let slot = entry.slots.iter().copied().find(|&slot| {
                    self.streams
                        .get(slot)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.index == index)
                });
                let stream = slot.and_then(|slot| self.streams.get_mut(slot)?.as_mut());
                if let Some([rtp, rtcp]) = stream.and_then(|s| s.channels.get_mut(leg)) {
                    let addrs = [remote.map(|r| r.rtp), remote.map(|r| r.rtcp)];
                    for (channel, addr) in [rtp, rtcp].into_iter().zip(addrs) {
                        channel.signalled = true;
                        channel.sdp = addr.or(channel.sdp);
                        if relatch {
                            channel.latched = None;
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
            Command::Remove { session } => self.remove(session),
        }
    }

    fn add(
        &mut self,
        session: u64,
        index: usize,
        sockets: StreamSockets,
        counters: Arc<Counters>,
        now: Instant,
    ) {
        let slot = self.free_slots.pop().unwrap_or(self.streams.len());
        let [[a_rtp, a_rtcp], [b_rtp, b_rtcp]] = sockets.sockets;
        let channel = |socket| Channel {
            socket,
            sdp: None,
            signalled: false,
            latched: None,
        };
        let entry = StreamEntry {
            index,
            ports: sockets.ports,
            channels: [
                [channel(a_rtp), channel(a_rtcp)],
                [channel(b_rtp), channel(b_rtcp)],
            ],
            counters,
            last_rtp: now,
        };
        for (leg, pair) in entry.channels.iter().enumerate() {
            for (kind, channel) in pair.iter().enumerate() {
                if let Err(e) = self
                    .poll
                    .add(channel.socket.as_raw_fd(), token(slot, leg, kind))
                {
                    tracing::error!(error = %e, "media relay cannot watch a socket");
                }
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

    fn remove(&mut self, session: u64) {
        let Some(entry) = self.sessions.remove(&session) else {
            return;
        };
        for slot in entry.slots {
            let Some(stream) = self.streams.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            for channel in stream.channels.iter().flatten() {
                self.poll.delete(channel.socket.as_raw_fd());
            }
            let ports = stream.ports;
            drop(stream);
            for port in ports {
                self.pool.release(port);
            }
            self.free_slots.push(slot);
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
    fn tokens_keep_slot_leg_and_kind_apart() {
        let t = token(12345, 1, 0);
        assert_eq!(t >> 2, 12345);
        assert_eq!(t & 2, 2);
        assert_eq!(t & 1, 0);
    }
}
