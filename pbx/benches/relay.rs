//! Load benchmark of the bypass relay on loopback: N calls, each phone
//! sending 50 packets a second (20 ms of G.711), through `RelayMedia` with
//! a given number of relay threads. Reports the relay threads' CPU time per
//! relayed packet (from /proc, so the load generator's own CPU is not
//! counted) and the loss.
//!
//! `cargo bench -p sip-pbx --bench relay -- --calls 100,400,800 --seconds 5 --threads 1`
//! (`--relay-io epoll` for the fallback path, `packet_ring` for the packet
//! ring; `auto` by default).
//!
//! `--syscalls` instead compares, on one socket pair, the per-packet cost
//! of recvfrom+sendto with recvmmsg+sendmmsg at batch sizes 1 and 16.
//!
//! Seen on the 2-core shared VM (noisy: other tenants' load shows up as
//! loss at any rate), with 2 ms ticks and IPv4 sockets: 6,900-9,000 ns
//! relay CPU per packet at 150 to 1,200 calls; one relay thread carried
//! 1,200 calls (120,000 packets a second, 82% of a core) without loss and
//! saturates near 100,000-130,000 packets a second.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sip_pbx::config::{MediaConfig, PortRange, RelayIo};
use sip_pbx::media::{LegSide, RelayMedia, SdpRole, SessionMedia};
use sip_pbx::status::PbxStatus;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const PACKET: usize = 172;
const TICK: Duration = Duration::from_millis(1);
/// Ticks in one packet interval: each call sends on one tick of twenty.
const SLOTS: usize = 20;

struct Options {
    calls: Vec<usize>,
    seconds: u64,
    threads: usize,
    relay_io: RelayIo,
    syscalls: bool,
}

fn options() -> Options {
    let mut options = Options {
        calls: vec![100, 400, 800],
        seconds: 5,
        threads: 1,
        relay_io: RelayIo::Auto,
        syscalls: false,
    };
    let args: Vec<String> = std::env::args().collect();
    for pair in args.windows(2) {
        match pair[0].as_str() {
            "--calls" => {
                options.calls = pair[1].split(',').filter_map(|n| n.parse().ok()).collect()
            }
            "--seconds" => options.seconds = pair[1].parse().unwrap_or(options.seconds),
            "--threads" => options.threads = pair[1].parse().unwrap_or(options.threads),
            "--relay-io" => {
                options.relay_io = match pair[1].as_str() {
                    "epoll" => RelayIo::Epoll,
                    "io_uring" => RelayIo::IoUring,
                    "packet_ring" => RelayIo::PacketRing,
                    _ => RelayIo::Auto,
                }
            }
            _ => {}
        }
    }
    options.syscalls = args.iter().any(|a| a == "--syscalls");
    options
}

/// CPU time of this process's threads whose name starts with `prefix`.
fn thread_cpu(prefix: &str) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second =
        u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("procfs")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let after_name = stat.rsplit(')').next().unwrap_or_default();
        let fields: Vec<u64> = after_name
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        ticks += fields[11] + fields[12];
    }
    Duration::from_nanos(ticks * 1_000_000_000 / ticks_per_second)
}

/// One socket plays the A phone of every call and one the B phone: the
/// relay keeps a latch per PBX port, so calls need not differ in address,
/// and the generator then drains its side with one recvmmsg per batch
/// instead of one recvfrom per packet, leaving the CPU to the relay.
fn phone() -> UdpSocket {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("socket");
    socket
        .set_recv_buffer_size(4 << 20)
        .expect("receive buffer");
    socket
        .bind(&SocketAddr::new(LOOPBACK, 0).into())
        .expect("bind phone");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.into()
}

fn sdp(socket: &UdpSocket) -> Bytes {
    let port = socket.local_addr().expect("addr").port();
    Bytes::from(format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n"
    ))
}

fn audio_port(body: &[u8]) -> u16 {
    sip_pbx::media::sdp::parse(body).expect("sdp").streams[0].port
}

/// Buffers and headers for recvmmsg/sendmmsg.
struct Batch {
    buffers: Vec<[u8; 2048]>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new(size: usize) -> Self {
        Self {
            buffers: vec![[0u8; 2048]; size],
            iovecs: Vec::with_capacity(size),
            // SAFETY: a zeroed mmsghdr is valid (null pointers, zero lengths).
            headers: (0..size).map(|_| unsafe { std::mem::zeroed() }).collect(),
        }
    }

    /// Points the first `n` headers at the buffers, `address` as their
    /// peer (null to receive).
    fn prepare(&mut self, n: usize, address: *mut libc::sockaddr_in) {
        self.iovecs.clear();
        self.iovecs
            .extend(self.buffers.iter_mut().take(n).map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }));
        for (header, iovec) in self.headers.iter_mut().zip(self.iovecs.iter_mut()) {
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_name = address.cast();
            header.msg_hdr.msg_namelen = if address.is_null() {
                0
            } else {
                std::mem::size_of::<libc::sockaddr_in>() as u32
            };
        }
    }

    /// Receives up to `n` waiting packets without blocking.
    fn receive(&mut self, socket: &UdpSocket, n: usize) -> usize {
        let n = n.min(self.buffers.len());
        self.prepare(n, std::ptr::null_mut());
        // SAFETY: the headers point at live iovecs and buffers.
        let got = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(got).unwrap_or(0)
    }

    /// Sends the `n` packets last received, each at its received length.
    fn send(&mut self, socket: &UdpSocket, to: SocketAddr, n: usize) -> usize {
        let SocketAddr::V4(to) = to else {
            panic!("the benchmark runs on IPv4 loopback")
        };
        let mut address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let lengths: Vec<usize> = self
            .headers
            .iter()
            .take(n)
            .map(|h| h.msg_len as usize)
            .collect();
        self.prepare(n, &mut address);
        for (iovec, len) in self.iovecs.iter_mut().zip(lengths) {
            iovec.iov_len = len;
        }
        // SAFETY: as in `receive`; `address` outlives the call.
        let sent =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), self.headers.as_mut_ptr(), n as u32, 0) };
        usize::try_from(sent).unwrap_or(0)
    }

    /// Reads all that waits on the socket; returns the packet count.
    fn drain(&mut self, socket: &UdpSocket) -> u64 {
        let mut total = 0;
        loop {
            let got = self.receive(socket, self.buffers.len());
            total += got as u64;
            if got < self.buffers.len() {
                return total;
            }
        }
    }
}

struct Result {
    sent: u64,
    received: u64,
    relayed: u64,
    cpu: Duration,
    elapsed: Duration,
}

fn run(calls: usize, seconds: u64, threads: usize, relay_io: RelayIo) -> Result {
    let config = MediaConfig {
        relay_io,
        // Clear of the ranges the tests in tests/media_relay.rs use.
        port_pool: PortRange {
            start: 12000,
            end: 19999,
        },
        ..MediaConfig::default()
    };
    let (tx, _events) = tokio::sync::mpsc::unbounded_channel();
    let status = Arc::new(PbxStatus::default());
    let mut media =
        RelayMedia::with_threads(&config, LOOPBACK, status, tx, threads).expect("relay");
    let (a, b) = (phone(), phone());
    // Per call: where A sends and where B sends.
    let mut targets = Vec::with_capacity(calls);
    let mut sessions = Vec::with_capacity(calls);
    for _ in 0..calls {
        let id = media.open().expect("open");
        let offer = media
            .relay_sdp(id, LegSide::A, SdpRole::Offer, sdp(&a))
            .expect("offer");
        let answer = media
            .relay_sdp(id, LegSide::B, SdpRole::Answer, sdp(&b))
            .expect("answer");
        targets.push((
            SocketAddr::new(LOOPBACK, audio_port(&answer)),
            SocketAddr::new(LOOPBACK, audio_port(&offer)),
        ));
        sessions.push(id);
    }
    let stats = media.stats();
    let payload = [0x80u8; PACKET];
    let mut batch = Batch::new(64);
    let (mut sent, mut received) = (0u64, 0u64);
    let warmup = Duration::from_secs(1);
    let start = Instant::now();
    let (mut cpu0, mut relayed0, mut measured) = (Duration::ZERO, 0, None);
    let mut next = start;
    let mut tick = 0usize;
    while start.elapsed() < warmup + Duration::from_secs(seconds) {
        if measured.is_none() && start.elapsed() >= warmup {
            cpu0 = thread_cpu("media-relay");
            relayed0 = stats.packets_total();
            measured = Some((Instant::now(), sent, received));
        }
        for (to_a, to_b) in targets.iter().skip(tick % SLOTS).step_by(SLOTS) {
            a.send_to(&payload, to_a).expect("send");
            b.send_to(&payload, to_b).expect("send");
            sent += 2;
        }
        received += batch.drain(&a) + batch.drain(&b);
        tick += 1;
        next += TICK;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let cpu = thread_cpu("media-relay") - cpu0;
    let relayed = stats.packets_total() - relayed0;
    let (t0, sent0, received0) = measured.expect("ran past the warm-up");
    let elapsed = t0.elapsed();
    // A packet later than this is as good as lost to a phone's jitter buffer.
    let deadline = Instant::now() + Duration::from_millis(500);
    while received - received0 < sent - sent0 && Instant::now() < deadline {
        received += batch.drain(&a) + batch.drain(&b);
    }
    for id in sessions {
        media.close(id);
    }
    Result {
        sent: sent - sent0,
        received: received - received0,
        relayed,
        cpu,
        elapsed,
    }
}

fn load(options: &Options) {
    println!(
        "relay threads: {}, 50 pps each way per call, {} s per step",
        options.threads, options.seconds
    );
    for &calls in &options.calls {
        let r = run(calls, options.seconds, options.threads, options.relay_io);
        let pps = r.relayed as f64 / r.elapsed.as_secs_f64();
        let ns = r.cpu.as_nanos() as f64 / r.relayed.max(1) as f64;
        let core = 100.0 * r.cpu.as_secs_f64() / r.elapsed.as_secs_f64();
        let lost = r.sent.saturating_sub(r.received);
        println!(
            "calls {calls:5}  relayed {pps:8.0} pps  relay CPU {core:5.1}% of a core  {ns:6.0} ns/packet  sent {}  lost or >0.5 s late {lost}",
            r.sent
        );
    }
}

/// One socket sends to another in batches of `batch`; the receiver's
/// per-packet cost is the figure (one receive and one send per packet,
/// like the relay). The cost of an empty system call bounds what io_uring
/// could save: it removes system calls, not the network stack's work.
fn syscalls() {
    let calls = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..calls {
        // SAFETY: getppid takes no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    println!(
        "empty system call          {:6.0} ns",
        t.elapsed().as_nanos() as f64 / f64::from(calls)
    );
    let batches = 200_000 / 16;
    let relay_in = phone();
    let relay_out = phone();
    let sink = phone();
    let source = phone();
    let to_relay = relay_in.local_addr().expect("addr");
    let to_sink = sink.local_addr().expect("addr");
    let payload = [0x80u8; PACKET];
    let mut scratch = vec![0u8; 65536];
    let mut mmsg = Batch::new(16);
    let mut sink_batch = Batch::new(64);
    for size in [1usize, 16] {
        for use_mmsg in [false, true] {
            let mut spent = Duration::ZERO;
            for _ in 0..batches {
                for _ in 0..size {
                    source.send_to(&payload, to_relay).expect("send");
                }
                let t = Instant::now();
                if use_mmsg {
                    let got = mmsg.receive(&relay_in, size);
                    assert_eq!(mmsg.send(&relay_out, to_sink, got), size, "sendmmsg");
                } else {
                    for _ in 0..size {
                        let (n, _) = relay_in.recv_from(&mut scratch).expect("recv");
                        relay_out.send_to(&scratch[..n], to_sink).expect("send");
                    }
                }
                spent += t.elapsed();
                sink_batch.drain(&sink);
            }
            let ns = spent.as_nanos() as f64 / (batches * size) as f64;
            let how = if use_mmsg {
                "recvmmsg+sendmmsg"
            } else {
                "recvfrom+sendto"
            };
            println!("batch {size:2}  {how:18} {ns:6.0} ns/packet");
        }
    }
}

fn main() {
    let options = options();
    if options.syscalls {
        syscalls();
    } else {
        load(&options);
    }
}
