//! The bypass relay over real loopback sockets: UDP sockets play the two
//! phones of a call and talk through the PBX's ports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sip_pbx::config::{MediaConfig, PortRange, RelayIo};
use sip_pbx::media::{
    sdp, LegSide, MediaCounters, MediaError, MediaEvent, MediaSessionId, RelayMedia, SdpRole,
    SessionMedia,
};
use sip_pbx::status::PbxStatus;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const WAIT: Duration = Duration::from_secs(3);

struct Pbx {
    media: RelayMedia,
    events: UnboundedReceiver<MediaEvent>,
    status: Arc<PbxStatus>,
    ip: IpAddr,
}

/// Each test takes its own pool range, below the ephemeral ports the phones get.
fn pbx(start: u16, end: u16, rtp_timeout: u64, ip: &str) -> Pbx {
    pbx_on(RelayIo::Auto, start, end, rtp_timeout, ip)
}

fn pbx_on(relay_io: RelayIo, start: u16, end: u16, rtp_timeout: u64, ip: &str) -> Pbx {
    let config = MediaConfig {
        port_pool: PortRange { start, end },
        rtp_timeout,
        relay_io,
        ..MediaConfig::default()
    };
    let status = Arc::new(PbxStatus::default());
    let (tx, events) = unbounded_channel();
    let ip: IpAddr = ip.parse().expect("test address");
    let media = RelayMedia::with_threads(&config, ip, status.clone(), tx, 2).expect("relay");
    Pbx {
        media,
        events,
        status,
        ip,
    }
}

/// A phone's RTP and RTCP sockets.
struct Phone {
    rtp: UdpSocket,
    rtcp: UdpSocket,
}

fn phone(ip: IpAddr) -> Phone {
    let bind = || {
        let s = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind phone");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s
    };
    Phone {
        rtp: bind(),
        rtcp: bind(),
    }
}

impl Phone {
    fn port(&self) -> u16 {
        self.rtp.local_addr().expect("addr").port()
    }

    fn sdp(&self, extra: &str) -> Bytes {
        let ip = self.rtp.local_addr().expect("addr").ip();
        let kind = if ip.is_ipv4() { "IP4" } else { "IP6" };
        let rtcp = self.rtcp.local_addr().expect("addr").port();
        Bytes::from(format!(
            "v=0\r\no=- 1 1 IN {kind} {ip}\r\ns=-\r\nc=IN {kind} {ip}\r\nt=0 0\r\n\
             m=audio {} RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n\
             a=rtcp:{rtcp}\r\n{extra}",
            self.port()
        ))
    }
}

/// The audio port an SDP body the PBX produced tells the receiver to use.
fn audio_port(body: &[u8]) -> u16 {
    sdp::parse(body).expect("PBX SDP parses").streams[0].port
}

/// An answered call: phones A and B, the SDP offer B got, and the PBX
/// ports facing A and B.
struct Call {
    pbx: Pbx,
    ip: IpAddr,
    a: Phone,
    b: Phone,
    id: MediaSessionId,
    offer: Bytes,
    to_a: u16,
    to_b: u16,
}

impl Call {
    /// A sends to the PBX; B must receive exactly that, from the port B
    /// sends to (symmetric RTP).
    fn a_to_b(&self, payload: &[u8]) {
        send(&self.a.rtp, self.ip, self.to_a, payload);
        let (got, from) = receive_from(&self.b.rtp);
        assert_eq!(got, payload);
        assert_eq!(from.port(), self.to_b, "the port B sends to");
    }

    fn b_to_a(&self, payload: &[u8]) {
        send(&self.b.rtp, self.ip, self.to_b, payload);
        let (got, from) = receive_from(&self.a.rtp);
        assert_eq!(got, payload);
        assert_eq!(from.port(), self.to_a, "the port A sends to");
    }

    /// The call's counters once `ready` holds: the relay counts a packet
    /// once it is sent, so just after it may have arrived.
    fn counters_once(&self, ready: impl Fn(&MediaCounters) -> bool) -> MediaCounters {
        let stats = self.pbx.media.stats();
        let mut last = None;
        wait_until("the session counters", || {
            last = stats.counters(self.id);
            last.as_ref().is_some_and(&ready)
        });
        last.expect("wait_until returned")
    }
}

fn call(start: u16, end: u16, rtp_timeout: u64, ip: &str) -> Call {
    call_on(RelayIo::Auto, start, end, rtp_timeout, ip)
}

fn call_on(relay_io: RelayIo, start: u16, end: u16, rtp_timeout: u64, ip: &str) -> Call {
    let pbx = pbx_on(relay_io, start, end, rtp_timeout, ip);
    let ip = pbx.ip;
    call_between(pbx, phone(ip), phone(ip))
}

/// Phones `a` and `b` call through `pbx`; A's offer says where A is.
fn call_between(mut pbx: Pbx, a: Phone, b: Phone) -> Call {
    let ip = pbx.ip;
    let id = pbx.media.open().expect("open");
    let offer = pbx
        .media
        .relay_sdp(id, LegSide::A, SdpRole::Offer, a.sdp(""))
        .expect("offer");
    let answer = pbx
        .media
        .relay_sdp(id, LegSide::B, SdpRole::Answer, b.sdp(""))
        .expect("answer");
    let (to_a, to_b) = (audio_port(&answer), audio_port(&offer));
    Call {
        pbx,
        ip,
        a,
        b,
        id,
        offer,
        to_a,
        to_b,
    }
}

fn send(socket: &UdpSocket, ip: IpAddr, port: u16, payload: &[u8]) {
    socket
        .send_to(payload, SocketAddr::new(ip, port))
        .expect("send");
}

fn receive(socket: &UdpSocket) -> Vec<u8> {
    receive_from(socket).0
}

fn receive_from(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buffer = vec![0u8; 65536];
    let (n, from) = socket.recv_from(&mut buffer).expect("packet within WAIT");
    buffer.truncate(n);
    (buffer, from)
}

fn rtp(seq: u16, size: usize) -> Vec<u8> {
    let mut packet = vec![0x80, 0x00];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend((0..size).map(|i| (i % 251) as u8));
    packet
}

/// Polls `done` until it holds, failing the test past WAIT.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn next_event(events: &mut UnboundedReceiver<MediaEvent>) -> MediaEvent {
    let mut event = None;
    wait_until("a media event", || {
        event = events.try_recv().ok();
        event.is_some()
    });
    event.expect("wait_until returned")
}

#[test]
fn rtp_and_rtcp_flow_both_ways_with_payloads_intact() {
    flows_both_ways(call(25000, 25099, 60, "127.0.0.1"));
}

#[test]
fn the_packet_ring_carries_rtp_and_rtcp_both_ways_with_payloads_intact() {
    flows_both_ways(call_on(RelayIo::PacketRing, 27000, 27099, 60, "127.0.0.1"));
}

fn flows_both_ways(mut c: Call) {
    assert_eq!(c.to_a % 2, 0);
    assert_eq!(c.to_b % 2, 0);
    for seq in 0..50 {
        let forth = rtp(seq, 160);
        c.a_to_b(&forth);
        let back = rtp(seq + 1000, 172);
        c.b_to_a(&back);
    }
    send(&c.a.rtcp, c.ip, c.to_a + 1, b"rtcp from a");
    let (got, from) = receive_from(&c.b.rtcp);
    assert_eq!(got, b"rtcp from a");
    assert_eq!(
        from,
        SocketAddr::new(c.ip, c.to_b + 1),
        "RTCP from the odd port"
    );
    send(&c.b.rtcp, c.ip, c.to_b + 1, b"rtcp from b");
    assert_eq!(receive(&c.a.rtcp), b"rtcp from b");

    let counters = c.counters_once(|n| n.b_to_a_packets == 51);
    assert_eq!(counters.a_to_b_packets, 51);
    assert_eq!(counters.a_to_b_bytes, 50 * 164 + 11);
    assert_eq!(counters.dropped, 0);
    let stats = c.pbx.media.stats();
    wait_until("the global counter", || stats.packets_total() == 102);
    assert_eq!(c.pbx.media.codec(c.id).as_deref(), Some("PCMU"));
    c.pbx.media.close(c.id);
}

#[test]
fn a_re_offer_moving_the_far_end_keeps_ports_and_follows_it() {
    follows_a_move(call(25100, 25199, 60, "127.0.0.1"));
}

#[test]
fn the_packet_ring_follows_a_far_end_that_moves() {
    follows_a_move(call_on(RelayIo::PacketRing, 27100, 27199, 60, "127.0.0.1"));
}

fn follows_a_move(mut c: Call) {
    c.b_to_a(b"latch b");

    let moved = phone(c.ip);
    let reoffer = c
        .pbx
        .media
        .relay_sdp(
            c.id,
            LegSide::B,
            SdpRole::Offer,
            moved.sdp("a=sendonly\r\n"),
        )
        .expect("re-offer");
    assert_eq!(audio_port(&reoffer), c.to_a, "same m-line, same port");
    assert!(String::from_utf8_lossy(&reoffer).contains("a=sendonly\r\n"));
    let reanswer = c
        .pbx
        .media
        .relay_sdp(c.id, LegSide::A, SdpRole::Answer, c.a.sdp("a=recvonly\r\n"))
        .expect("re-answer");
    assert_eq!(audio_port(&reanswer), c.to_b);

    send(&c.a.rtp, c.ip, c.to_a, b"to the new port");
    assert_eq!(receive(&moved.rtp), b"to the new port");
    send(&moved.rtp, c.ip, c.to_b, b"from the new port");
    assert_eq!(receive(&c.a.rtp), b"from the new port");
    send(&c.b.rtp, c.ip, c.to_b, b"old address, now a stranger");
    send(&moved.rtp, c.ip, c.to_b, b"still the new port");
    assert_eq!(receive(&c.a.rtp), b"still the new port");
    c.pbx.media.close(c.id);
}

#[test]
fn packets_from_a_stranger_after_latching_are_dropped() {
    drops_a_stranger(call(25200, 25299, 60, "127.0.0.1"));
}

#[test]
fn the_packet_ring_drops_a_stranger_after_latching() {
    drops_a_stranger(call_on(RelayIo::PacketRing, 27200, 27299, 60, "127.0.0.1"));
}

fn drops_a_stranger(mut c: Call) {
    let stranger = phone(c.ip);
    c.a_to_b(b"first");
    send(&stranger.rtp, c.ip, c.to_a, b"injected");
    c.a_to_b(b"second");
    assert_eq!(c.counters_once(|n| n.a_to_b_packets == 2).dropped, 1);
    c.pbx.media.close(c.id);
}

#[test]
fn an_exhausted_pool_refuses_calls_until_one_ends() {
    // Four pairs: two calls of two legs each.
    let mut pbx = pbx(25300, 25307, 60, "127.0.0.1");
    assert_eq!(pbx.status.ports_capacity.load(Ordering::Relaxed), 8);
    let first = pbx.media.open().expect("first call");
    let _second = pbx.media.open().expect("second call");
    assert_eq!(pbx.status.ports_in_use.load(Ordering::Relaxed), 8);
    assert_eq!(pbx.media.open(), Err(MediaError::PoolExhausted));
    assert_eq!(pbx.status.ports_in_use.load(Ordering::Relaxed), 8);
    pbx.media.close(first);
    let status = pbx.status.clone();
    wait_until("ports back", || {
        status.ports_in_use.load(Ordering::Relaxed) == 4
    });
    pbx.media.open().expect("a call after one ended");
}

#[test]
fn silence_past_rtp_timeout_is_reported_and_close_frees_ports() {
    let Call { mut pbx, id, .. } = call(25400, 25499, 1, "127.0.0.1");
    let ringing = pbx.media.open().expect("a call still ringing");
    let started = Instant::now();
    assert_eq!(next_event(&mut pbx.events), MediaEvent::RtpTimeout(id));
    assert!(started.elapsed() >= Duration::from_millis(900));
    pbx.media.close(id);
    pbx.media.close(ringing);
    let status = pbx.status.clone();
    wait_until("ports back", || {
        status.ports_in_use.load(Ordering::Relaxed) == 0
    });
    assert!(
        pbx.events.try_recv().is_err(),
        "one event, for the answered call"
    );
}

#[test]
fn offers_without_an_allowed_codec_are_refused() {
    let mut pbx = pbx(25500, 25599, 60, "127.0.0.1");
    let id = pbx.media.open().expect("open");
    let g729 = Bytes::from_static(
        b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=video 4002 RTP/AVP 99\r\nm=audio 4000 RTP/AVP 18 101\r\na=rtpmap:101 telephone-event/8000\r\n",
    );
    assert_eq!(
        pbx.media.relay_sdp(id, LegSide::A, SdpRole::Offer, g729),
        Err(MediaError::NoCommonCodec)
    );
    assert_eq!(
        pbx.status.ports_in_use.load(Ordering::Relaxed),
        4,
        "the refused offer took no ports for its video"
    );
    let garbage = Bytes::from_static(b"\xff\xfe not sdp");
    assert!(matches!(
        pbx.media.relay_sdp(id, LegSide::A, SdpRole::Offer, garbage),
        Err(MediaError::BadSdp(_))
    ));
    pbx.media.close(id);
}

#[test]
fn ipv6_phones_are_relayed() {
    relays_ipv6(call(25600, 25699, 60, "::1"));
}

#[test]
fn the_packet_ring_relays_ipv6_phones() {
    relays_ipv6(call_on(RelayIo::PacketRing, 27600, 27699, 60, "::1"));
}

fn relays_ipv6(mut c: Call) {
    assert!(String::from_utf8_lossy(&c.offer).contains("c=IN IP6 ::1\r\n"));
    c.a_to_b(b"over ipv6");
    c.b_to_a(b"and back");
    c.pbx.media.close(c.id);
}

#[test]
fn unreadable_packets_and_unknown_sessions_do_not_disturb_the_relay() {
    goes_on_after_unreadable_packets(call(25700, 25799, 60, "127.0.0.1"));
}

#[test]
fn the_packet_ring_goes_on_after_unreadable_packets() {
    goes_on_after_unreadable_packets(call_on(RelayIo::PacketRing, 27700, 27799, 60, "127.0.0.1"));
}

/// Sends, on the loopback device, a UDP packet from 127.0.0.1:`from` to
/// 192.0.2.99:`port`: a packet that passes through this host on its way to
/// another, as a pod's do through a node.
fn pass_through(from: u16, port: u16, payload: &[u8]) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let udp_len = u16::try_from(8 + payload.len()).expect("small");
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&(20 + udp_len).to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 127, 0, 0, 1, 192, 0, 2, 99]);
    packet.extend_from_slice(&from.to_be_bytes());
    packet.extend_from_slice(&port.to_be_bytes());
    packet.extend_from_slice(&udp_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    let ip = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket and sendto calls on memory this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(ip));
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let socket = OwnedFd::from_raw_fd(fd);
        let mut to: libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ip;
        to.sll_ifindex = i32::try_from(libc::if_nametoindex(c"lo".as_ptr())).expect("lo");
        to.sll_halen = 6;
        let sent = libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(
            sent,
            packet.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

/// The ring sees packets that pass through the host to the same port
/// number elsewhere: they are neither relayed nor latched onto.
#[test]
fn the_packet_ring_leaves_packets_for_another_host_alone() {
    let mut c = call_on(RelayIo::PacketRing, 28000, 28099, 60, "127.0.0.1");
    pass_through(40999, c.to_a, b"for another host");
    c.a_to_b(b"the phone's own");
    assert_eq!(c.counters_once(|n| n.a_to_b_packets == 1).dropped, 0);
    c.pbx.media.close(c.id);
}

/// A dual-stack relay (advertised IPv6) between an IPv4 phone and an IPv6
/// one: IPv4 packets reach its sockets as IPv4-mapped addresses.
#[test]
fn a_dual_stack_relay_carries_an_ipv4_phone_to_an_ipv6_one() {
    relays_between_families(RelayIo::Auto, 27800, 27899);
}

#[test]
fn the_packet_ring_carries_an_ipv4_phone_to_an_ipv6_one() {
    relays_between_families(RelayIo::PacketRing, 27900, 27999);
}

fn relays_between_families(relay_io: RelayIo, start: u16, end: u16) {
    let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let pbx = pbx_on(relay_io, start, end, 60, "::1");
    let mut c = call_between(pbx, phone(v4), phone(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    send(&c.a.rtp, v4, c.to_a, b"from ipv4");
    let (got, from) = receive_from(&c.b.rtp);
    assert_eq!(
        (got.as_slice(), from),
        (&b"from ipv4"[..], SocketAddr::new(c.ip, c.to_b))
    );
    send(&c.b.rtp, c.ip, c.to_b, b"from ipv6");
    let (got, from) = receive_from(&c.a.rtp);
    assert_eq!(
        (got.as_slice(), from),
        (&b"from ipv6"[..], SocketAddr::new(v4, c.to_a))
    );
    c.pbx.media.close(c.id);
}

fn goes_on_after_unreadable_packets(mut c: Call) {
    c.a_to_b(b"");
    let big = vec![7u8; 9000];
    c.a_to_b(&big);
    // Beyond a jumbo frame: the io_uring relay and the packet ring drop
    // it (counted), the epoll relay forwards it; either way the next
    // packet goes through.
    let huge = vec![9u8; 20_000];
    send(&c.a.rtp, c.ip, c.to_a, &huge);
    send(&c.a.rtp, c.ip, c.to_a, b"after");
    let first = receive(&c.b.rtp);
    if first == huge {
        assert_eq!(receive(&c.b.rtp), b"after");
    } else {
        assert_eq!(first, b"after");
        assert_eq!(c.counters_once(|n| n.dropped == 1).dropped, 1);
    }
    let unknown = MediaSessionId(999_999);
    assert!(c
        .pbx
        .media
        .relay_sdp(unknown, LegSide::A, SdpRole::Offer, c.a.sdp(""))
        .is_err());
    c.pbx.media.close(unknown);
    c.pbx.media.close(c.id);
}

fn video_line(phone: &Phone) -> String {
    format!(
        "m=video {} RTP/AVP 99\r\na=rtpmap:99 H264/90000\r\n",
        phone.port()
    )
}

fn ports(body: &[u8]) -> Vec<u16> {
    let description = sdp::parse(body).expect("PBX SDP parses");
    description.streams.iter().map(|s| s.port).collect()
}

/// Phone A's audio and video, and phone B's.
struct VideoPhones {
    a: Phone,
    b: Phone,
    video_a: Phone,
    video_b: Phone,
}

fn video_phones(ip: IpAddr) -> VideoPhones {
    VideoPhones {
        a: phone(ip),
        b: phone(ip),
        video_a: phone(ip),
        video_b: phone(ip),
    }
}

/// B answers with its video, and a frame from A's video reaches it: the
/// answer as the PBX rewrote it.
fn answer_with_video(pbx: &mut Pbx, id: MediaSessionId, phones: &VideoPhones) -> Bytes {
    let body = phones.b.sdp(&video_line(&phones.video_b));
    let answer = pbx.media.relay_sdp(id, LegSide::B, SdpRole::Answer, body);
    let answer = answer.expect("answer");
    crosses(pbx, &phones.video_a, ports(&answer)[1], &phones.video_b);
    answer
}

/// A packet `from` sends to the PBX's `port` reaches `to` intact.
fn crosses(pbx: &Pbx, from: &Phone, port: u16, to: &Phone) {
    let payload = format!("to port {port}");
    send(&from.rtp, pbx.ip, port, payload.as_bytes());
    assert_eq!(receive(&to.rtp), payload.as_bytes());
}

/// A offers audio and video, B takes both, and a video frame crosses each
/// way: the offer and the answer as the PBX rewrote them.
fn relay_video(pbx: &mut Pbx, id: MediaSessionId, phones: &VideoPhones) -> (Bytes, Bytes) {
    let offer = offer_video(pbx, id, phones);
    let answer = answer_with_video(pbx, id, phones);
    crosses(pbx, &phones.video_b, ports(&offer)[1], &phones.video_a);
    (offer, answer)
}

/// A offers audio and video: the offer as the PBX rewrote it for B.
fn offer_video(pbx: &mut Pbx, id: MediaSessionId, phones: &VideoPhones) -> Bytes {
    let body = phones.a.sdp(&video_line(&phones.video_a));
    let offer = pbx.media.relay_sdp(id, LegSide::A, SdpRole::Offer, body);
    offer.expect("offer")
}

#[test]
fn video_is_relayed_on_ports_of_its_own() {
    let mut pbx = pbx(25800, 25899, 60, "127.0.0.1");
    let phones = video_phones(pbx.ip);
    let id = pbx.media.open().expect("open");
    let (offer, answer) = relay_video(&mut pbx, id, &phones);
    let (offered, answered) = (ports(&offer), ports(&answer));
    assert_eq!(offered.len(), 2);
    assert!(offered[1] != 0 && offered[1] != offered[0]);
    let VideoPhones { a, b, .. } = &phones;
    send(&a.rtp, pbx.ip, answered[0], b"voice");
    assert_eq!(receive(&b.rtp), b"voice");
    pbx.media.close(id);
}

#[test]
fn video_is_refused_with_port_zero_when_the_pool_is_empty() {
    // Two pairs: the audio of one call and nothing more.
    let mut pbx = pbx(25900, 25903, 60, "127.0.0.1");
    let ip = pbx.ip;
    let (a, video_a) = (phone(ip), phone(ip));
    let id = pbx.media.open().expect("open");
    let offer = pbx
        .media
        .relay_sdp(id, LegSide::A, SdpRole::Offer, a.sdp(&video_line(&video_a)))
        .expect("offer");
    let offered = ports(&offer);
    assert!(offered[0] != 0);
    assert_eq!(offered[1], 0);
    assert!(String::from_utf8_lossy(&offer).contains("a=rtpmap:99 H264/90000\r\n"));
    pbx.media.close(id);
}

fn ports_in_use(pbx: &Pbx) -> usize {
    pbx.status.ports_in_use.load(Ordering::Relaxed)
}

fn wait_for_ports_in_use(pbx: &Pbx, ports: usize) {
    wait_until(&format!("{ports} ports in use"), || {
        ports_in_use(pbx) == ports
    });
}

/// The ports of the offer the PBX would make B of its own (to restore the
/// session in force with it).
fn restoring_ports(pbx: &mut Pbx, id: MediaSessionId) -> Vec<u16> {
    let offer = pbx.media.restoring_offer(id, LegSide::B);
    ports(&offer.expect("B's session"))
}

#[test]
fn video_the_answer_refuses_gives_its_ports_back() {
    let mut pbx = pbx(26400, 26499, 60, "127.0.0.1");
    let phones = video_phones(pbx.ip);
    let VideoPhones { a, b, .. } = &phones;
    let id = pbx.media.open().expect("open");
    let offer = offer_video(&mut pbx, id, &phones);
    assert_eq!(
        ports_in_use(&pbx),
        8,
        "RTP and RTCP of two streams, both legs"
    );
    let refused = b.sdp("m=video 0 RTP/AVP 99\r\n");
    let answer = pbx
        .media
        .relay_sdp(id, LegSide::B, SdpRole::Answer, refused)
        .expect("answer");
    assert_eq!(ports(&answer)[1], 0);
    wait_for_ports_in_use(&pbx, 4);
    send(&a.rtp, pbx.ip, ports(&answer)[0], b"voice goes on");
    assert_eq!(receive(&b.rtp), b"voice goes on");

    // The session in force with B has no video now: a re-offer the PBX
    // makes B of its own disables it, instead of naming ports it gave back.
    assert_eq!(restoring_ports(&mut pbx, id), vec![ports(&offer)[0], 0]);

    // A offers video again: new ports, relayed once B takes it.
    relay_video(&mut pbx, id, &phones);
    assert_eq!(ports_in_use(&pbx), 8);
    pbx.media.close(id);
    wait_for_ports_in_use(&pbx, 0);
}

/// A call forked to two phones: one refuses the video in its early
/// answer, the other takes it up in the final one. The refusal holds until
/// a final answer confirms it, or a final response without SDP lets the
/// early answer stand, and the session the PBX keeps with B is the one in
/// force.
#[test]
fn video_refused_in_an_early_answer_keeps_its_ports_until_a_final_response() {
    let mut pbx = pbx(26600, 26699, 60, "127.0.0.1");
    let phones = video_phones(pbx.ip);
    let id = pbx.media.open().expect("open");
    let offer = offer_video(&mut pbx, id, &phones);
    let early = phones.b.sdp("m=video 0 RTP/AVP 99\r\n");
    let progress = pbx
        .media
        .relay_sdp(id, LegSide::B, SdpRole::ProvisionalAnswer, early.clone())
        .expect("early answer");
    assert_eq!(ports(&progress)[1], 0);
    assert_eq!(ports_in_use(&pbx), 8, "the video keeps its ports");
    answer_with_video(&mut pbx, id, &phones);
    assert_eq!(
        restoring_ports(&mut pbx, id),
        ports(&offer),
        "video in force with B"
    );

    // Refused early and again in the final answer: the ports go back.
    let second = pbx.media.open().expect("open");
    offer_video(&mut pbx, second, &phones);
    for role in [SdpRole::ProvisionalAnswer, SdpRole::Answer] {
        pbx.media
            .relay_sdp(second, LegSide::B, role, early.clone())
            .expect("answer without video");
    }
    wait_for_ports_in_use(&pbx, 8 + 4);

    // Refused early, and the 2xx carries no SDP (RFC 3262): the early
    // answer stands, and the ports go back.
    let third = pbx.media.open().expect("open");
    offer_video(&mut pbx, third, &phones);
    pbx.media
        .relay_sdp(third, LegSide::B, SdpRole::ProvisionalAnswer, early)
        .expect("early answer");
    assert_eq!(ports_in_use(&pbx), 8 + 4 + 8);
    pbx.media.early_answer_stands(third);
    wait_for_ports_in_use(&pbx, 8 + 4 + 4);
    assert_eq!(restoring_ports(&mut pbx, third)[1], 0, "no video with B");
    for call in [id, second, third] {
        pbx.media.close(call);
    }
}

#[test]
fn video_a_failed_offer_added_gives_its_ports_back() {
    let mut c = call(26500, 26599, 60, "127.0.0.1");
    let video_a = phone(c.ip);
    let reoffer = c.a.sdp(&video_line(&video_a));
    let offer = c
        .pbx
        .media
        .relay_sdp(c.id, LegSide::A, SdpRole::Offer, reoffer)
        .expect("re-offer with video");
    assert_ne!(ports(&offer)[1], 0);
    assert_eq!(ports_in_use(&c.pbx), 8);
    c.pbx.media.offer_failed(c.id, LegSide::A);
    wait_for_ports_in_use(&c.pbx, 4);
    c.a_to_b(b"voice after the refused re-offer");
    c.b_to_a(b"and back");
    c.pbx.media.close(c.id);
}

#[test]
fn a_call_on_hold_is_not_timed_out_until_it_resumes() {
    let Call {
        mut pbx, a, b, id, ..
    } = call(26000, 26099, 1, "127.0.0.1");
    let mut exchange = |from_a: &str, from_b: &str| {
        pbx.media
            .relay_sdp(id, LegSide::A, SdpRole::Offer, a.sdp(from_a))
            .expect("re-offer");
        pbx.media
            .relay_sdp(id, LegSide::B, SdpRole::Answer, b.sdp(from_b))
            .expect("re-answer");
    };
    exchange("a=sendonly\r\n", "a=recvonly\r\n");
    let held = Instant::now();
    while held.elapsed() < Duration::from_millis(1600) {
        assert!(pbx.events.try_recv().is_err(), "timed out while held");
        std::thread::sleep(Duration::from_millis(50));
    }
    exchange("a=sendrecv\r\n", "");
    let resumed = Instant::now();
    assert_eq!(next_event(&mut pbx.events), MediaEvent::RtpTimeout(id));
    assert!(resumed.elapsed() >= Duration::from_millis(900));
}

/// The way the B2BUA holds it: boxed behind the trait, called from tokio
/// tasks, its events awaited on the channel.
#[tokio::test]
async fn the_b2bua_drives_it_from_tokio_tasks() {
    let config = MediaConfig {
        port_pool: PortRange {
            start: 26100,
            end: 26199,
        },
        rtp_timeout: 1,
        ..MediaConfig::default()
    };
    let status = Arc::new(PbxStatus::default());
    let (tx, mut events) = unbounded_channel();
    let ip: IpAddr = "127.0.0.1".parse().expect("ip");
    let relay = RelayMedia::new(&config, ip, status, tx).expect("relay");
    let stats = relay.stats();
    let media: Arc<std::sync::Mutex<Box<dyn SessionMedia>>> =
        Arc::new(std::sync::Mutex::new(Box::new(relay)));
    let (a, b) = (phone(ip), phone(ip));
    let (offer, answer) = (a.sdp(""), b.sdp(""));
    let task = tokio::spawn({
        let media = media.clone();
        async move {
            let mut media = media.lock().expect("lock");
            let id = media.open()?;
            media.relay_sdp(id, LegSide::A, SdpRole::Offer, offer)?;
            media.relay_sdp(id, LegSide::B, SdpRole::Answer, answer)?;
            Ok::<_, MediaError>(id)
        }
    });
    let id = task.await.expect("task").expect("call set up");
    assert_eq!(stats.counters(id), Some(Default::default()));
    let event = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("event within WAIT");
    assert_eq!(event, Some(MediaEvent::RtpTimeout(id)));
    media.lock().expect("lock").close(id);
    assert_eq!(stats.counters(id), None);
}

#[test]
fn a_body_listing_many_streams_cannot_empty_the_pool() {
    let Call { mut pbx, a, id, .. } = call(26200, 26299, 60, "127.0.0.1");
    let many: String = (0..20).map(|_| video_line(&a)).collect();
    let offer = pbx
        .media
        .relay_sdp(id, LegSide::A, SdpRole::Offer, a.sdp(&many))
        .expect("offer");
    let offered = ports(&offer);
    assert_eq!(offered.len(), 21);
    assert_eq!(offered.iter().filter(|&&p| p != 0).count(), 4);
    assert_eq!(pbx.status.ports_in_use.load(Ordering::Relaxed), 4 * 2 * 2);
    pbx.media.close(id);
}

#[test]
fn packets_before_a_legs_sdp_cannot_claim_its_media() {
    let mut pbx = pbx(26300, 26399, 60, "127.0.0.1");
    let ip = pbx.ip;
    let (a, b, stranger) = (phone(ip), phone(ip), phone(ip));
    let id = pbx.media.open().expect("open");
    let offer = pbx
        .media
        .relay_sdp(id, LegSide::A, SdpRole::Offer, a.sdp(""))
        .expect("offer");
    let to_b = audio_port(&offer);
    send(&stranger.rtp, ip, to_b, b"sprayed while ringing");
    wait_until("the sprayed packet dropped", || {
        pbx.media.stats().counters(id).expect("session").dropped == 1
    });
    let answer = pbx
        .media
        .relay_sdp(id, LegSide::B, SdpRole::Answer, b.sdp(""))
        .expect("answer");
    send(&b.rtp, ip, to_b, b"the real callee");
    assert_eq!(receive(&a.rtp), b"the real callee");
    send(&a.rtp, ip, audio_port(&answer), b"reaches the callee");
    assert_eq!(receive(&b.rtp), b"reaches the callee");
    pbx.media.close(id);
}
