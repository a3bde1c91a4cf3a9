//! The relay's packet-socket loop (`media.relay_io: packet_ring`, which
//! needs CAP_NET_RAW). Each relay thread has an AF_PACKET receive ring,
//! which a kernel filter limits to UDP datagrams for the thread's share of
//! the pool (`ring_of`): it brings the thread's packets without a system
//! call per packet or per socket. Relayed packets leave in batches through
//! raw IP sockets, whose headers carry the stream's own source port. The
//! streams' UDP sockets stay bound: they hold the ports, and keep the
//! kernel from answering ICMP port unreachable. A filter drops whatever
//! reaches them, so their queues stay empty. A call's ports are drawn from
//! the share of the thread that carries it.
//!
//! Why it is opt-in: the ring takes packets at the interface, before the
//! host firewall's INPUT rules (those to an address that is not the host's
//! are left alone); it drops fragmented datagrams and those larger than a
//! FRAME; IPv4 packets leave without a UDP checksum, which RFC 768 allows.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::{drain_eventfd, Hold, Thread, Token, Watch, SWEEP_EVERY};

/// Room for a 9,000-byte jumbo datagram with its headers.
const FRAME: usize = 10 * 1024;
/// One kernel allocation of the ring: six frames.
const BLOCK: usize = 64 * 1024;
/// 1,026 frames, several times what a full thread gathers in one tick.
const BLOCKS: usize = 171;
/// Packets a batch of sends carries at most.
const BATCH: usize = 64;
const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// A packet the ring holds: where it came from, the local port it was sent
/// to, and its payload (`None` when the packet is cut short).
#[derive(Debug, PartialEq, Eq)]
struct Datagram<'a> {
    source: SocketAddr,
    destination: IpAddr,
    port: u16,
    payload: Option<&'a [u8]>,
}

/// Reads the UDP datagram in an IP packet; `None` for anything else.
fn datagram(packet: &[u8]) -> Option<Datagram<'_>> {
    let (source, destination, header, total) = match packet.first()? >> 4 {
        4 => {
            let header = usize::from(packet.first()? & 0x0f) * 4;
            let source: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let destination: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            let total = u16::from_be_bytes(packet.get(2..4)?.try_into().ok()?);
            if *packet.get(9)? != 17 || header < IPV4_HEADER {
                return None;
            }
            (
                IpAddr::V4(Ipv4Addr::from(source)),
                IpAddr::V4(Ipv4Addr::from(destination)),
                header,
                usize::from(total),
            )
        }
        6 => {
            let source: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let destination: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            let payload = u16::from_be_bytes(packet.get(4..6)?.try_into().ok()?);
            if *packet.get(6)? != 17 {
                return None;
            }
            (
                IpAddr::V6(Ipv6Addr::from(source)),
                IpAddr::V6(Ipv6Addr::from(destination)),
                40,
                40 + usize::from(payload),
            )
        }
        _ => return None,
    };
    let udp = packet.get(header..)?;
    let source_port = u16::from_be_bytes(udp.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(udp.get(2..4)?.try_into().ok()?);
    let length = usize::from(u16::from_be_bytes(udp.get(4..6)?.try_into().ok()?));
    Some(Datagram {
        source: SocketAddr::new(source, source_port),
        destination,
        port,
        payload: packet
            .get(header..total)
            .and_then(|udp| udp.get(UDP_HEADER..length)),
    })
}

fn attach(socket: RawFd, program: &mut [libc::sock_filter]) -> io::Result<()> {
    let program = libc::sock_fprog {
        len: u16::try_from(program.len()).unwrap_or(u16::MAX),
        filter: program.as_mut_ptr(),
    };
    // The kernel copies the instructions, which outlive the call.
    set_option(socket, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &program)
}

fn instruction(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: u16::try_from(code).unwrap_or_default(),
        jt,
        jf,
        k,
    }
}

/// Which relay thread's ring takes the packets of pool port `port`: pairs
/// are dealt out in turn, so that each ring sees only its own streams.
pub(super) fn ring_of(port: u16, first: u16, rings: usize) -> usize {
    usize::from(port.saturating_sub(first) / 2) % rings.max(1)
}

/// Accepts, of the packets addressed to this host, unfragmented UDP over
/// IPv4 or IPv6 (without extension headers) to a port of the pool
/// `first..=last` that belongs to ring `ring` of `rings` (see [`ring_of`]).
fn pool_filter(first: u16, last: u16, ring: usize, rings: usize) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_B, BPF_H, BPF_IND, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP,
        BPF_JSET, BPF_K, BPF_LD, BPF_LDX, BPF_MOD, BPF_MSH, BPF_RET, BPF_RSH, BPF_SUB, BPF_W,
    };
    let ancillary = |at: i32| (libc::SKF_AD_OFF + at) as u32;
    let rings = u32::try_from(rings.max(1)).unwrap_or(1);
    let ring = u32::try_from(ring).unwrap_or_default();
    // Jump offsets count from the next instruction; DROP is the last.
    const DROP: u8 = 22;
    vec![
        // 0: addressed to this host
        instruction(
            BPF_LD | BPF_W | BPF_ABS,
            0,
            0,
            ancillary(libc::SKF_AD_PKTTYPE),
        ),
        instruction(
            BPF_JMP | BPF_JEQ | BPF_K,
            0,
            DROP - 2,
            u32::from(libc::PACKET_HOST),
        ),
        // 2: IPv4 or IPv6
        instruction(
            BPF_LD | BPF_W | BPF_ABS,
            0,
            0,
            ancillary(libc::SKF_AD_PROTOCOL),
        ),
        instruction(BPF_JMP | BPF_JEQ | BPF_K, 0, 11 - 4, libc::ETH_P_IP as u32),
        // 4: IPv4: UDP, neither a fragment nor followed by one
        instruction(BPF_LD | BPF_B | BPF_ABS, 0, 0, 9),
        instruction(BPF_JMP | BPF_JEQ | BPF_K, 0, DROP - 6, 17),
        instruction(BPF_LD | BPF_H | BPF_ABS, 0, 0, 6),
        instruction(BPF_JMP | BPF_JSET | BPF_K, DROP - 8, 0, 0x3fff),
        instruction(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),
        instruction(BPF_LD | BPF_H | BPF_IND, 0, 0, 2),
        instruction(BPF_JMP | BPF_JA, 0, 0, 15 - 11),
        // 11: IPv6: UDP right after the fixed header
        instruction(BPF_JMP | BPF_JEQ | BPF_K, 0, DROP - 12, 0x86dd),
        instruction(BPF_LD | BPF_B | BPF_ABS, 0, 0, 6),
        instruction(BPF_JMP | BPF_JEQ | BPF_K, 0, DROP - 14, 17),
        instruction(BPF_LD | BPF_H | BPF_ABS, 0, 0, 42),
        // 15: the destination port is the pool's
        instruction(BPF_JMP | BPF_JGE | BPF_K, 0, DROP - 16, u32::from(first)),
        instruction(BPF_JMP | BPF_JGT | BPF_K, DROP - 17, 0, u32::from(last)),
        // 17: and this ring's
        instruction(BPF_ALU | BPF_SUB | BPF_K, 0, 0, u32::from(first)),
        instruction(BPF_ALU | BPF_RSH | BPF_K, 0, 0, 1),
        instruction(BPF_ALU | BPF_MOD | BPF_K, 0, 0, rings),
        instruction(BPF_JMP | BPF_JEQ | BPF_K, 0, DROP - 21, ring),
        instruction(BPF_RET | BPF_K, 0, 0, u32::MAX),
        // 22 (DROP): not for this ring
        instruction(BPF_RET | BPF_K, 0, 0, 0),
    ]
}

/// A filter that drops every packet: the streams' UDP sockets hold their
/// ports, while the ring takes their packets.
fn drop_everything(socket: RawFd) -> io::Result<()> {
    attach(
        socket,
        &mut [instruction(libc::BPF_RET | libc::BPF_K, 0, 0, 0)],
    )
}

fn set_option<T>(
    socket: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live T for the whole call, and its size is passed.
    let done = unsafe {
        libc::setsockopt(
            socket,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn new_socket(
    domain: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The receive ring of an AF_PACKET socket (TPACKET_V2): frames the kernel
/// fills and hands over one by one through their status word.
struct Ring {
    socket: OwnedFd,
    map: NonNull<u8>,
    frames: usize,
    next: usize,
}

impl Ring {
    /// Opens ring `ring` of `rings` for the UDP datagrams sent to ports
    /// `first..=last` of this host, on every interface.
    fn open(first: u16, last: u16, ring: usize, rings: usize) -> io::Result<Self> {
        // Protocol 0 receives nothing until bind, after the filter is on.
        let socket = new_socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0)?;
        let fd = socket.as_raw_fd();
        attach(fd, &mut pool_filter(first, last, ring, rings))?;
        let version = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        set_option(fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)?;
        // Without it, each packet the relay sends runs the filter above
        // only to be refused (kernels before 4.20 lack the option).
        let _ = set_option(fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1);
        let frames = BLOCK / FRAME * BLOCKS;
        let request = libc::tpacket_req {
            tp_block_size: BLOCK as libc::c_uint,
            tp_block_nr: BLOCKS as libc::c_uint,
            tp_frame_size: FRAME as libc::c_uint,
            tp_frame_nr: frames as libc::c_uint,
        };
        set_option(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &request)?;
        // SAFETY: maps the ring the kernel just allocated for this socket;
        // the result is checked before use.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BLOCK * BLOCKS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = Self {
            map: NonNull::new(map.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?,
            socket,
            frames,
            next: 0,
        };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set below
        // make it "every interface, every protocol".
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as libc::c_ushort;
        address.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: `address` is a live sockaddr_ll of the length passed.
        let bound = unsafe {
            libc::bind(
                fd,
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ring)
    }

    /// The header of frame `index` (modulo the ring's frames); frames do
    /// not straddle blocks.
    fn header(&self, index: usize) -> *mut libc::tpacket2_hdr {
        let (index, per_block) = (index % self.frames, BLOCK / FRAME);
        let offset = (index / per_block) * BLOCK + (index % per_block) * FRAME;
        // SAFETY: index < frames, so the frame lies inside the mapping.
        unsafe { self.map.as_ptr().add(offset).cast() }
    }

    /// The packet in frame `index` if the kernel has handed it over, and
    /// whether it arrived whole.
    fn filled(&self, index: usize) -> Option<(&[u8], bool)> {
        let header = self.header(index);
        // SAFETY: the status word is shared with the kernel, so it is read
        // volatile; the fence orders the reads of the frame after it.
        let status = unsafe { std::ptr::read_volatile(&raw const (*header).tp_status) };
        if status & libc::TP_STATUS_USER == 0 {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: the kernel has handed the frame over; it is ours to read
        // until `release`.
        let (net, snap, len) = unsafe {
            (
                usize::from((*header).tp_net),
                (*header).tp_snaplen as usize,
                (*header).tp_len as usize,
            )
        };
        if net + snap > FRAME {
            return Some((&[], false));
        }
        // SAFETY: net + snap lies inside this frame, which the kernel
        // wrote before setting the status.
        let packet = unsafe { std::slice::from_raw_parts(header.cast::<u8>().add(net), snap) };
        Some((packet, snap == len))
    }

    /// Hands frame `index` back to the kernel.
    fn release(&self, index: usize) {
        let header = self.header(index);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: as in `filled`; the frame is no longer read after this.
        unsafe { std::ptr::write_volatile(&raw mut (*header).tp_status, libc::TP_STATUS_KERNEL) };
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `open`, which nothing uses
        // any more.
        unsafe { libc::munmap(self.map.as_ptr().cast(), BLOCK * BLOCKS) };
    }
}

/// A relayed packet waiting in an outbox: its payload stays in its frame.
struct Outgoing {
    token: Token,
    frame: usize,
    payload: NonNull<u8>,
    len: usize,
    source_port: u16,
    destination: SocketAddr,
}

/// Relayed packets waiting to leave through one raw socket, and the
/// buffers `sendmmsg` reads them from.
struct Outbox {
    socket: OwnedFd,
    /// The last IPv4 identification written.
    id: u16,
    packets: Vec<Outgoing>,
    headers: Vec<[u8; IPV4_HEADER + UDP_HEADER]>,
    names: Vec<libc::sockaddr_in6>,
    vectors: Vec<[libc::iovec; 2]>,
    messages: Vec<libc::mmsghdr>,
}

impl Outbox {
    /// IPv4: the socket takes whole IP headers, and the kernel fills in
    /// the source address, the identification and the checksum.
    fn ipv4() -> io::Result<Self> {
        Self::new(new_socket(
            libc::AF_INET,
            libc::SOCK_RAW,
            libc::IPPROTO_RAW,
        )?)
    }

    /// IPv6: the kernel writes the IP header and the UDP checksum.
    fn ipv6() -> io::Result<Self> {
        let socket = new_socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_UDP)?;
        let checksum_at: libc::c_int = 6;
        set_option(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_CHECKSUM,
            &checksum_at,
        )?;
        Self::new(socket)
    }

    fn new(socket: OwnedFd) -> io::Result<Self> {
        // SAFETY: all-zero sockaddr_in6, iovec and mmsghdr are valid
        // values; every one is filled in before a send reads it.
        let (name, vector, message) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed(), std::mem::zeroed()) };
        Ok(Self {
            socket,
            id: rand::random(),
            packets: Vec::with_capacity(BATCH),
            headers: vec![[0; IPV4_HEADER + UDP_HEADER]; BATCH],
            names: vec![name; BATCH],
            vectors: vec![[vector; 2]; BATCH],
            messages: vec![message; BATCH],
        })
    }

    fn full(&self) -> bool {
        self.packets.len() == BATCH
    }

    /// Sends what waits, counts it on `thread`, and gives the frames
    /// back to `ring`; returns how many packets went out.
    fn flush(&mut self, thread: &Thread, ring: &Ring) -> u64 {
        let count = self.packets.len();
        for (i, packet) in self.packets.iter().enumerate() {
            let (Some(header), Some(name), Some(vector), Some(message)) = (
                self.headers.get_mut(i),
                self.names.get_mut(i),
                self.vectors.get_mut(i),
                self.messages.get_mut(i),
            ) else {
                continue;
            };
            // Never 0, which would have the kernel choose.
            self.id = self.id.checked_add(1).unwrap_or(1);
            let (ip, name_len) = address(packet.destination, header, packet.len, self.id, name);
            udp_header(
                header.get_mut(ip..).unwrap_or_default(),
                packet.source_port,
                packet.destination.port(),
                packet.len,
            );
            *vector = [
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: ip + UDP_HEADER,
                },
                libc::iovec {
                    iov_base: packet.payload.as_ptr().cast(),
                    iov_len: packet.len,
                },
            ];
            message.msg_hdr.msg_name = (name as *mut libc::sockaddr_in6).cast();
            message.msg_hdr.msg_namelen = name_len;
            message.msg_hdr.msg_iov = vector.as_mut_ptr();
            message.msg_hdr.msg_iovlen = 2;
        }
        let mut done = 0;
        let mut sent = 0;
        while done < count {
            let rest = self.messages.get_mut(done..count).unwrap_or_default();
            // SAFETY: each message points at its own name, header and
            // payload, all alive and unmoved until the call returns.
            let n = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            match usize::try_from(n) {
                Ok(n) if n > 0 => {
                    for packet in self.packets.get(done..done + n).unwrap_or_default() {
                        thread.sent(packet.token, packet.len);
                    }
                    done += n;
                    sent += n as u64;
                }
                // The first message of `rest` could not go out.
                _ => {
                    if let Some(packet) = self.packets.get(done) {
                        thread.failed(packet.token);
                    }
                    done += 1;
                }
            }
        }
        for packet in self.packets.drain(..) {
            ring.release(packet.frame);
        }
        sent
    }
}

/// Writes the IP header (IPv4 only) and the socket address for sending
/// `len` bytes of payload to `destination`; returns the IP header's length
/// and the address's.
fn address(
    destination: SocketAddr,
    header: &mut [u8; IPV4_HEADER + UDP_HEADER],
    len: usize,
    id: u16,
    name: &mut libc::sockaddr_in6,
) -> (usize, libc::socklen_t) {
    match destination {
        SocketAddr::V4(v4) => {
            let total = u16::try_from(IPV4_HEADER + UDP_HEADER + len).unwrap_or(u16::MAX);
            let [t0, t1] = total.to_be_bytes();
            let [i0, i1] = id.to_be_bytes();
            let [d0, d1, d2, d3] = v4.ip().octets();
            // Version 4, 20-byte header, length, identification, don't
            // fragment (as UDP sockets send by default), TTL 64, UDP;
            // checksum and source left to the kernel. An identification of
            // its own spares the kernel choosing one, which an unfragmented
            // datagram does not need (RFC 6864).
            *header = [
                0x45, 0, t0, t1, i0, i1, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, d0, d1, d2, d3, 0, 0,
                0, 0, 0, 0, 0, 0,
            ];
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_in fits in the sockaddr_in6 it is written to.
            unsafe { std::ptr::write((name as *mut libc::sockaddr_in6).cast(), sin) };
            (
                IPV4_HEADER,
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(v6) => {
            name.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            // A raw IPv6 socket takes the port field as its protocol: 0.
            name.sin6_port = 0;
            name.sin6_flowinfo = 0;
            name.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            name.sin6_scope_id = v6.scope_id();
            (0, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// The UDP header; an IPv4 checksum of 0 means none (RFC 768), and the
/// kernel computes IPv6's.
fn udp_header(header: &mut [u8], source: u16, destination: u16, len: usize) {
    let length = u16::try_from(UDP_HEADER + len).unwrap_or(u16::MAX);
    let mut bytes = [0u8; UDP_HEADER];
    bytes[..2].copy_from_slice(&source.to_be_bytes());
    bytes[2..4].copy_from_slice(&destination.to_be_bytes());
    bytes[4..6].copy_from_slice(&length.to_be_bytes());
    if let Some(place) = header.get_mut(..UDP_HEADER) {
        place.copy_from_slice(&bytes);
    }
}

/// Runs `open` with CAP_NET_RAW in this thread's effective set, raised
/// from its permitted set for that time only when it was not there. A
/// process that does not run as root gets it permitted from the binary's
/// file capability (`setcap cap_net_raw+p`, as the image has it) where the
/// container may have it; permitted only, so that a pod that drops it
/// still starts, and so that no other thread ever holds it.
fn with_net_raw<T>(open: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    use caps::{CapSet, Capability};
    let has = |set| caps::has_cap(None, set, Capability::CAP_NET_RAW).unwrap_or(false);
    let raised = has(CapSet::Permitted)
        && !has(CapSet::Effective)
        && caps::raise(None, CapSet::Effective, Capability::CAP_NET_RAW).is_ok();
    let opened = open();
    if raised {
        if let Err(e) = caps::drop(None, CapSet::Effective, Capability::CAP_NET_RAW) {
            tracing::warn!(error = %e, "media relay: CAP_NET_RAW stays raised");
        }
    }
    opened
}

/// What the ring knows of a stream's socket.
#[derive(Debug, Clone, Copy)]
struct Watched {
    token: Token,
    /// The socket is dual-stack: IPv4 peers appear to it as mapped IPv6.
    dual_stack: bool,
}

/// A relay thread's packet ring, its raw sockets, and the ports it serves.
pub(super) struct Tap {
    ring: Ring,
    ipv4: Outbox,
    ipv6: Option<Outbox>,
    /// The watched sockets, by port from `first` on.
    ports: Vec<Option<Watched>>,
    first: u16,
    /// This host's addresses. The ring also sees packets that only pass
    /// through the host (another pod's, on a node's network), which may
    /// be for the same port number elsewhere.
    local: Vec<IpAddr>,
    local_read: Instant,
    wake: RawFd,
}

/// How often the host's addresses are read again (a pod or node may gain
/// one).
const LOCAL_EVERY: Duration = Duration::from_secs(1);

fn host_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces.iter().map(if_addrs::Interface::ip).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "media relay cannot read the host's addresses");
            Vec::new()
        }
    }
}

impl Tap {
    /// Opens ring `ring` of `rings` for the pool's ports `first..=last`,
    /// and the raw sockets; fails without CAP_NET_RAW.
    pub(super) fn new(
        wake: RawFd,
        first: u16,
        last: u16,
        ring: usize,
        rings: usize,
    ) -> io::Result<Self> {
        let (ring, ipv4, ipv6) = with_net_raw(|| {
            // A host without IPv6 has no IPv6 peers either.
            Ok((
                Ring::open(first, last, ring, rings)?,
                Outbox::ipv4()?,
                Outbox::ipv6().ok(),
            ))
        })?;
        Ok(Self {
            ring,
            ipv4,
            ipv6,
            ports: vec![None; usize::from(last.saturating_sub(first)) + 1],
            first,
            local: host_addresses(),
            local_read: Instant::now(),
            wake,
        })
    }

    /// Reads the host's addresses again when LOCAL_EVERY has passed.
    fn refresh(&mut self, now: Instant) {
        if now.duration_since(self.local_read) >= LOCAL_EVERY {
            self.local = host_addresses();
            self.local_read = now;
        }
    }

    /// Where pool port `port` sits in `ports`.
    fn index(&self, port: u16) -> Option<usize> {
        port.checked_sub(self.first).map(usize::from)
    }

    fn slot(&mut self, port: u16) -> Option<&mut Option<Watched>> {
        let index = self.index(port)?;
        self.ports.get_mut(index)
    }

    fn watched(&self, port: u16) -> Option<Watched> {
        *self.ports.get(self.index(port)?)?
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local.contains(&ip)
    }

    /// Waits until the ring or the thread's eventfd is readable, at most
    /// `timeout`, or not at all while frames are waiting; true when the
    /// eventfd is.
    fn wait(&self, timeout: Duration) -> bool {
        let waiting = self.ring.filled(self.ring.next).is_some();
        let millis = if waiting {
            0
        } else {
            libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX)
        };
        let mut fds = [
            libc::pollfd {
                fd: self.ring.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of the length passed.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
        ready > 0 && fds[1].revents & libc::POLLIN != 0
    }

    /// Relays every packet the ring holds; returns how many went out.
    fn relay(&mut self, thread: &mut Thread, now: Instant) -> u64 {
        let mut sent = 0;
        for _ in 0..self.ring.frames {
            let index = self.ring.next;
            let Some(routed) = self
                .ring
                .filled(index)
                .map(|(packet, whole)| self.route(thread, index, packet, whole, now))
            else {
                break;
            };
            self.ring.next = (index + 1) % self.ring.frames;
            let Some(outgoing) = routed else {
                self.ring.release(index);
                continue;
            };
            let outbox = match outgoing.destination {
                SocketAddr::V4(_) => Some(&mut self.ipv4),
                SocketAddr::V6(_) => self.ipv6.as_mut(),
            };
            let Some(outbox) = outbox else {
                thread.failed(outgoing.token);
                self.ring.release(index);
                continue;
            };
            outbox.packets.push(outgoing);
            if outbox.full() {
                sent += outbox.flush(thread, &self.ring);
            }
        }
        sent += self.ipv4.flush(thread, &self.ring);
        if let Some(outbox) = self.ipv6.as_mut() {
            sent += outbox.flush(thread, &self.ring);
        }
        sent
    }

    /// Where the packet in frame `index` goes, if anywhere.
    fn route(
        &self,
        thread: &mut Thread,
        index: usize,
        packet: &[u8],
        whole: bool,
        now: Instant,
    ) -> Option<Outgoing> {
        let datagram = datagram(packet)?;
        let watched = self.watched(datagram.port)?;
        if !self.is_local(datagram.destination) {
            return None;
        }
        let Some(payload) = datagram.payload.filter(|_| whole) else {
            thread.failed(watched.token);
            return None;
        };
        let source = super::socket_form(watched.dual_stack, datagram.source)?;
        let destination = thread.route(watched.token, source, now)?;
        let source_port = thread.output_port(watched.token)?;
        Some(Outgoing {
            token: watched.token,
            frame: index,
            payload: NonNull::from(payload).cast(),
            len: payload.len(),
            source_port,
            // Raw sockets take IPv4 peers as IPv4, not mapped.
            destination: super::socket_form(false, destination).unwrap_or(destination),
        })
    }
}

/// The address a socket is bound to.
fn local(socket: RawFd) -> Option<SocketAddr> {
    // SAFETY: the caller's socket stays open for the call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket) };
    socket2::SockRef::from(&borrowed)
        .local_addr()
        .ok()?
        .as_socket()
}

impl Watch for Tap {
    fn watch(&mut self, socket: RawFd, token: Token) -> Hold {
        let Some(local) = local(socket) else {
            tracing::error!("media relay cannot read a socket's port");
            return Hold::default();
        };
        if let Err(e) = drop_everything(socket) {
            tracing::warn!(error = %e, "media relay: a socket keeps its own queue");
        }
        let watched = Watched {
            token,
            dual_stack: local.is_ipv6(),
        };
        match self.slot(local.port()) {
            Some(slot) => *slot = Some(watched),
            None => tracing::error!(
                port = local.port(),
                "media relay: a socket outside the pool"
            ),
        }
        Hold::default()
    }

    fn unwatch(&mut self, socket: RawFd, token: Token, _hold: Hold) {
        let slot = local(socket).and_then(|a| self.slot(a.port()));
        if let Some(slot) = slot.filter(|s| s.is_some_and(|w| w.token == token)) {
            *slot = None;
        }
    }
}

pub(super) fn run(mut thread: Thread, mut tap: Tap) {
    let mut paused = false;
    loop {
        // After a pause the ring holds the tick's packets, and commands
        // are read from their queue: no need to ask poll. The eventfd is
        // drained at the next wait.
        if !paused && tap.wait(SWEEP_EVERY) {
            drain_eventfd(tap.wake);
        }
        let now = Instant::now();
        // Commands first, so that a packet arriving with the SDP that
        // tells where it goes is not dropped.
        if !thread.commands(&mut tap) {
            break;
        }
        tap.refresh(now);
        let relayed = tap.relay(&mut thread, now);
        // Packets arriving during the pause wait in the ring.
        let pause = thread.pause(relayed > 0, now);
        if let Some(rest) = pause {
            std::thread::sleep(rest);
        }
        paused = pause.is_some();
        if !thread.end_round(relayed, now, &mut tap) {
            break;
        }
    }
    thread.shutdown(&mut tap);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(options: usize, protocol: u8, udp: &[u8]) -> Vec<u8> {
        let header = IPV4_HEADER + options;
        let total = u16::try_from(header + udp.len()).expect("small");
        let mut packet = vec![0x40 | u8::try_from(header / 4).expect("small"), 0];
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0, 0, 64, protocol, 0, 0, 192, 0, 2, 7, 192, 0, 2, 1]);
        packet.resize(header, 1);
        packet.extend_from_slice(udp);
        packet
    }

    fn udp(source: u16, port: u16, payload: &[u8]) -> Vec<u8> {
        let mut header = [0u8; UDP_HEADER];
        udp_header(&mut header, source, port, payload.len());
        [&header[..], payload].concat()
    }

    #[test]
    fn ipv4_and_ipv6_datagrams_read_with_their_source_port_and_payload() {
        let v4 = ipv4(4, 17, &udp(40000, 20002, b"rtp"));
        assert_eq!(
            datagram(&v4),
            Some(Datagram {
                source: "192.0.2.7:40000".parse().expect("literal"),
                destination: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                port: 20002,
                payload: Some(&b"rtp"[..]),
            })
        );
        let body = udp(40002, 20004, b"rtcp");
        let mut v6 = vec![0x60, 0, 0, 0, 0, 12, 17, 64];
        v6.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9).octets());
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&body);
        let read = datagram(&v6).expect("IPv6 UDP");
        assert_eq!(read.source, "[2001:db8::9]:40002".parse().expect("literal"));
        assert_eq!(read.destination, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!((read.port, read.payload), (20004, Some(&b"rtcp"[..])));
    }

    #[test]
    fn what_is_not_a_whole_udp_datagram_has_no_payload_or_is_refused() {
        let whole = ipv4(0, 17, &udp(40000, 20002, b"payload"));
        let cut = datagram(whole.get(..whole.len() - 3).expect("long enough")).expect("ports");
        assert_eq!((cut.port, cut.payload), (20002, None), "cut short");
        let mut lying = whole.clone();
        lying[IPV4_HEADER + 5] = 200;
        assert_eq!(
            datagram(&lying).expect("ports").payload,
            None,
            "UDP length past the packet"
        );
        assert_eq!(datagram(&ipv4(0, 6, &udp(1, 2, b"tcp"))), None, "not UDP");
        assert_eq!(datagram(&whole[..IPV4_HEADER + 3]), None, "no ports");
        let mut short_header = whole.clone();
        short_header[0] = 0x44;
        assert_eq!(datagram(&short_header), None, "header below 20 bytes");
        for garbage in [&[][..], &[0x50, 1, 2][..], &[0x60; 39][..]] {
            assert_eq!(datagram(garbage), None);
        }
    }

    /// In a thread of its own, as capabilities belong to a thread.
    fn on_a_thread_with<T: Send + 'static>(
        lose: &'static [caps::CapSet],
        then: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            for &set in lose {
                caps::drop(None, set, caps::Capability::CAP_NET_RAW).expect("drop CAP_NET_RAW");
            }
            then()
        })
        .join()
        .expect("the thread")
    }

    fn open_tap() -> io::Result<Tap> {
        let wake = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket");
        Tap::new(wake.as_raw_fd(), 40000, 40099, 0, 1)
    }

    /// As a process that is not root gets it from the image's
    /// `setcap cap_net_raw+p`: permitted, not effective.
    #[test]
    fn cap_net_raw_permitted_is_raised_to_open_the_ring_and_lowered_again() {
        let (opened, effective_after) = on_a_thread_with(&[caps::CapSet::Effective], || {
            let opened = open_tap().map(|_| ());
            let effective =
                caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_NET_RAW);
            (opened, effective.expect("capabilities read"))
        });
        assert!(opened.is_ok(), "{opened:?}");
        assert!(!effective_after, "CAP_NET_RAW lowered again");
    }

    #[test]
    fn without_cap_net_raw_the_ring_does_not_open() {
        let opened = on_a_thread_with(&[caps::CapSet::Effective, caps::CapSet::Permitted], || {
            open_tap().map(|_| ())
        });
        let error = opened.expect_err("no ring without CAP_NET_RAW");
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
    }

    #[test]
    fn ipv4_headers_leave_source_and_checksum_to_the_kernel() {
        let mut header = [0xffu8; IPV4_HEADER + UDP_HEADER];
        // SAFETY: an all-zero sockaddr_in6 is valid.
        let mut name: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let to = "198.51.100.4:5004".parse().expect("literal");
        let (ip, len) = address(to, &mut header, 160, 0x1234, &mut name);
        assert_eq!(
            (ip, len as usize),
            (IPV4_HEADER, size_of::<libc::sockaddr_in>())
        );
        assert_eq!(header[..4], [0x45, 0, 0, 188], "version, length 20+8+160");
        assert_eq!(header[4..8], [0x12, 0x34, 0x40, 0], "identification, DF");
        assert_eq!(header[8..10], [64, 17], "TTL and UDP");
        assert_eq!(
            header[10..16],
            [0; 6],
            "checksum and source filled by the kernel"
        );
        assert_eq!(header[16..20], [198, 51, 100, 4]);
        let v6 = "[2001:db8::4%3]:5004".parse().expect("literal");
        let (ip, len) = address(v6, &mut header, 160, 1, &mut name);
        assert_eq!((ip, len as usize), (0, size_of::<libc::sockaddr_in6>()));
        assert_eq!((name.sin6_port, name.sin6_scope_id), (0, 3));
    }
}
