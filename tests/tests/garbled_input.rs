//! Garbled input from both sides of calls, sent to the real `sip-pbx` with
//! the media relay on: thousands of mutated requests, responses, SDP bodies
//! and RTP datagrams must neither panic the process nor stop it serving.
//! The RFC 4475 corpus (torture.rs) checks the answer to each known-bad
//! message; this checks what no list foresees. The generator is seeded
//! (`GARBLE_SEED`), but what it does next depends on what the PBX has
//! answered by then, so a seed repeats a run only roughly.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use sip_pbx_e2e::media::{establish, rtp, sip_i};
use sip_pbx_e2e::{
    caller_request, header, invite, options, options_over_tcp, response_to, sdp_audio_target,
    status_code, Pbx, SipClient,
};

const LIMIT: Duration = Duration::from_secs(10);
const MESSAGES: usize = 3000;
/// A probe OPTIONS must be answered after every this many messages.
const PROBE_EVERY: usize = 250;
/// The PBX's port pool: garbage media goes only there, never to a test's
/// own sockets.
const POOL: std::ops::RangeInclusive<u16> = 10_000..=19_999;
/// The media ports the garbled SDP names (where the relay sends what it
/// forwards): nobody listens there, and they lie below the ephemeral range
/// so that they never name one of the test's own sockets.
const CALLER_MEDIA: u16 = 20_000;
const CALLEE_MEDIA: u16 = 26_000;
/// How long the caller waits for the PBX to answer what it sent before
/// sending more: garbage the PBX drops gets no answer.
const REPLY: Duration = Duration::from_millis(10);

/// An offer with what the SDP code handles: session and media-level
/// connections, a=rtcp with an address, fmtp, telephone-event, a video
/// stream and an IPv6 one.
fn rich_sdp(port: u16) -> String {
    format!(
        "v=0\r\no=ua 7 7 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0 8 111 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=rtcp:{} IN IP4 127.0.0.1\r\n\
         a=ptime:20\r\na=sendrecv\r\nm=video {} RTP/AVP 96\r\nc=IN IP4 127.0.0.1\r\n\
         a=rtpmap:96 H264/90000\r\na=recvonly\r\nm=audio {} RTP/AVP 0\r\nc=IN IP6 ::1\r\n\
         a=rtpmap:0 PCMU/8000\r\na=inactive\r\n",
        port + 1,
        port + 2,
        port + 4
    )
}

/// Swaps that keep a message well-formed enough to get deep into the PBX.
const SWAPS: &[(&str, &str)] = &[
    ("IP4", "IP6"),
    ("audio", "video"),
    ("audio", "image"),
    ("RTP/AVP", "UDP/TLS/RTP/SAVPF"),
    ("RTP/AVP", "TCP/MRCPv2"),
    ("sendrecv", "inactive"),
    ("sendrecv", "sendonly"),
    ("PCMU/8000", "PCMU"),
    ("opus/48000/2", "opus/"),
    ("a=rtcp:", "a=rtcp"),
    ("127.0.0.1", "::1"),
    ("127.0.0.1", "[::1]"),
    ("127.0.0.1", "999.0.0.1"),
    ("127.0.0.1", ""),
    ("SIP/2.0", "SIP/3.0"),
    ("tag=", "tag"),
    ("branch=z9hG4bK", "branch="),
    ("Content-Length", "l"),
    ("Via", "v"),
    ("Call-ID", "i"),
    ("<sip:", "<tel:"),
    ("sip:", "sips:"),
    ("application/sdp", "application/SDP"),
    ("application/sdp", "multipart/mixed;boundary=x"),
    ("--unique-boundary-1", "--unique-boundary-2"),
    ("boundary=", "boundary"),
    ("application/ISUP", "application/sdp"),
    ("INVITE", "INVITE INVITE"),
    ("\r\n", "\n"),
    ("\r\n", "\r\n "),
    (": ", ":"),
    ("=", "=="),
    ("m=", "m= "),
];

/// Replacements for a run of digits.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "65535",
    "65536",
    "4294967296",
    "99999999999999999999999999",
    "",
    "0x10",
    "1.5",
];

/// Bytes dropped in at random places.
const INSERTS: &[&[u8]] = &[
    b"\0",
    b"\r",
    b"\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b";",
    b":",
    b",",
    b"<",
    b">",
    b"@",
    b"[",
    b"]",
    b"%",
    b"%zz",
    b"\"",
    b"\xff\xfe",
    b"\xc3",
    b"=",
];

/// One message with SDP in five carries it as SIP-I trunks do, beside
/// binary ISUP in a multipart body, before any garbling.
fn sip_i_sometimes(rng: &mut StdRng, message: Vec<u8>) -> Vec<u8> {
    if rng.random_bool(0.2) {
        sip_i(message)
    } else {
        message
    }
}

fn lines(message: &[u8]) -> Vec<Vec<u8>> {
    message.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

/// One to three random edits of `message`.
fn garble(rng: &mut StdRng, message: &[u8]) -> Vec<u8> {
    let mut out = message.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        match rng.random_range(0..7) {
            0 | 1 => {
                let mut all = lines(&out);
                let at = rng.random_range(0..all.len());
                if rng.random_bool(0.5) {
                    all.remove(at);
                } else {
                    let line = all[at].clone();
                    all.insert(at, line);
                }
                out = all.join(&b'\n');
            }
            2 => out.truncate(rng.random_range(0..=out.len())),
            3 => {
                let runs: Vec<(usize, usize)> = digit_runs(&out);
                if let Some(&(start, end)) = runs.choose(rng) {
                    let by = NUMBERS.choose(rng).copied().unwrap_or_default();
                    out.splice(start..end, by.bytes());
                }
            }
            4 => {
                let at = rng.random_range(0..=out.len());
                let by = INSERTS.choose(rng).copied().unwrap_or_default();
                out.splice(at..at, by.iter().copied());
            }
            5 => {
                let (from, to) = SWAPS.choose(rng).copied().unwrap_or_default();
                let text = String::from_utf8_lossy(&out);
                let places: Vec<usize> = text.match_indices(from).map(|(i, _)| i).collect();
                if let Some(&at) = places.choose(rng) {
                    out = format!("{}{to}{}", &text[..at], &text[at + from.len()..]).into_bytes();
                }
            }
            _ => {
                if !out.is_empty() {
                    let at = rng.random_range(0..out.len());
                    out[at] ^= 1 << rng.random_range(0..8);
                }
            }
        }
    }
    out
}

fn digit_runs(text: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, b) in text.iter().chain([&b' ']).enumerate() {
        match (b.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// Datagrams no phone should send: empty, cut short, random, and one
/// longer than any RTP packet (a jumbo frame's worth and more).
fn garbage_media(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let mut cut = rtp(rng.random(), 0x5A);
    cut.truncate(rng.random_range(0..12));
    let random: Vec<u8> = (0..rng.random_range(1..1500))
        .map(|_| rng.random())
        .collect();
    vec![
        Vec::new(),
        cut,
        random,
        vec![0x80; 9300],
        rtp(rng.random(), 0x5B),
    ]
}

/// The caller's side: what it may send next.
struct Caller {
    client: SipClient,
    pbx: SocketAddr,
    /// 200s to INVITEs the caller received: their dialogs take in-dialog
    /// requests.
    answered: Vec<String>,
    /// The last INVITE sent, for CANCEL.
    last_invite: String,
    /// Send the garbage media, each time from one of them: the first to
    /// reach a port latches it, and the others are strangers there.
    media: Vec<UdpSocket>,
    cseq: u32,
}

impl Caller {
    fn next_message(&mut self, rng: &mut StdRng, n: usize) -> Vec<u8> {
        let me = self.client.addr();
        let call_id = format!("garbled-{n}");
        let sdp = rich_sdp(CALLER_MEDIA + 6 * u16::try_from(n % 1000).unwrap_or(0));
        self.cseq += 1;
        let dialog = self.answered.choose(rng).cloned();
        let kind = match (rng.random_range(0..10), &dialog) {
            (7.., None) => 0,
            (kind, _) => kind,
        };
        match (kind, dialog) {
            (0..=3, _) | (_, None) => {
                let message = sip_i_sometimes(
                    rng,
                    invite(self.pbx, "2000", me, &call_id, Some(&sdp)),
                );
                self.last_invite = String::from_utf8_lossy(&message).into_owned();
                message
            }
            (4, _) => format!(
                "REGISTER sip:{pbx} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{call_id};rport\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:2001@{pbx}>;tag=r{n}\r\nTo: <sip:2001@{pbx}>\r\n\
                 Call-ID: {call_id}\r\nCSeq: 1 REGISTER\r\nContact: <sip:2001@{me}>;expires=60\r\n\
                 Expires: 60\r\nContent-Length: 0\r\n\r\n",
                pbx = self.pbx
            )
            .into_bytes(),
            (5, _) => options(self.pbx, me, &call_id),
            (6, _) => self
                .last_invite
                .replacen("INVITE sip:", "CANCEL sip:", 1)
                .replacen("CSeq: 1 INVITE", "CSeq: 1 CANCEL", 1)
                .into_bytes(),
            (_, Some(ok)) => {
                let (method, body) = [
                    ("INVITE", Some(sdp.as_str())),
                    ("UPDATE", Some(sdp.as_str())),
                    ("ACK", None),
                    ("BYE", None),
                    ("INFO", None),
                    ("PRACK", None),
                    ("FROBNICATE", None),
                ]
                .choose(rng)
                .copied()
                .unwrap_or(("BYE", None));
                caller_request(method, &ok, me, self.cseq, body)
            }
        }
    }

    /// Reads what came back: a 200 with SDP opens a dialog for later
    /// requests, and its relay port gets garbage media.
    fn read_responses(&mut self, rng: &mut StdRng) {
        let first = self.client.recv(REPLY);
        for text in first
            .into_iter()
            .chain(std::iter::from_fn(|| self.client.try_recv()))
        {
            if status_code(&text) != Some(200) || !text.contains(" INVITE\r\n") {
                continue;
            }
            if let Some(target) = sdp_audio_target(&text).filter(|t| POOL.contains(&t.port())) {
                let from = self.media.choose(rng).expect("media sockets");
                for datagram in garbage_media(rng) {
                    for port in [target.port(), target.port().wrapping_add(1)] {
                        // Refused sends (ICMP from a port already freed)
                        // are part of the game.
                        let _ = from.send_to(&datagram, SocketAddr::new(target.ip(), port));
                    }
                }
            }
            self.answered.push(text);
            if self.answered.len() > 20 {
                self.answered.remove(0);
            }
        }
    }
}

/// The callee's side: answers what the PBX sends, often garbled.
fn answer_requests(rng: &mut StdRng, callee: &SipClient, pbx: SocketAddr) {
    while let Some(request) = callee.try_recv() {
        if request.starts_with("ACK ") || status_code(&request).is_some() {
            continue;
        }
        let sdp = rich_sdp(CALLEE_MEDIA + 2 * rng.random_range(0..1000u16));
        // SDP the relay cannot use, ungarbled, so that offers fail and
        // the PBX restores the callee's session often enough.
        let unusable = sdp.replacen("m=audio ", "m=audio none", 1);
        let choices: &[(&str, Option<&str>)] = if request.starts_with("INVITE ") {
            &[
                ("180 Ringing", None),
                ("183 Session Progress", Some(&sdp)),
                ("200 OK", Some(&sdp)),
                ("200 OK", Some(&unusable)),
                ("486 Busy Here", None),
            ]
        } else if request.starts_with("UPDATE ") {
            &[
                ("200 OK", Some(&sdp)),
                ("200 OK", Some(&unusable)),
                ("488 Not Acceptable Here", None),
            ]
        } else {
            &[("200 OK", None)]
        };
        let (status, body) = choices.choose(rng).copied().unwrap_or(("200 OK", None));
        let response = response_to(&request, status, callee.addr(), body);
        let response = if body.is_some() {
            sip_i_sometimes(rng, response)
        } else {
            response
        };
        let response = if rng.random_bool(0.5) {
            garble(rng, &response)
        } else {
            response
        };
        callee.send(&response, pbx);
    }
}

fn seed() -> u64 {
    std::env::var("GARBLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4475)
}

/// A caller with no dialogs yet: INVITEs, REGISTERs, OPTIONS and CANCELs.
/// Its port lies below the ephemeral range, so that a digit garbled in it
/// never names one of the test's own sockets, which the PBX would then
/// answer.
fn new_caller(pbx: SocketAddr) -> Caller {
    let client = (2000..10_000)
        .find_map(|port| SipClient::try_bind(SocketAddr::from(([127, 0, 0, 1], port))).ok())
        .expect("a free port below 10000");
    Caller {
        client,
        pbx,
        answered: Vec::new(),
        last_invite: String::new(),
        media: (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect(),
        cseq: 1,
    }
}

#[test]
fn garbled_sip_sdp_and_rtp_from_both_sides_never_stop_the_pbx() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let garbled_callee = SipClient::new();
    let clean_callee = SipClient::new();
    let mut pbx = Pbx::start(
        garbled_callee.addr().port(),
        &format!(
            "media:\n  mode: bypass\n  port_pool: {{start: {}, end: {}}}\n  rtp_timeout: 30\n\n\
             routes:\n  - match: \"^1002$\"\n    target: \"sip:1002@127.0.0.1:{}\"\n  \
             - match: \"^(.+)$\"\n    target: \"sip:$1@127.0.0.1:{}\"\n",
            POOL.start(),
            POOL.end(),
            clean_callee.addr().port(),
            garbled_callee.addr().port()
        ),
    );
    let probe = SipClient::new();
    let mut caller = new_caller(pbx.sip_addr());

    for n in 0..MESSAGES {
        let message = caller.next_message(&mut rng, n);
        let message = if rng.random_bool(0.85) {
            garble(&mut rng, &message)
        } else {
            message
        };
        caller.client.send(&message, pbx.sip_addr());
        caller.read_responses(&mut rng);
        answer_requests(&mut rng, &garbled_callee, pbx.sip_addr());
        if n % PROBE_EVERY == PROBE_EVERY - 1 {
            if let Ok(Some(status)) = pbx.child.try_wait() {
                panic!(
                    "seed {seed}: the PBX exited with {status} after {n} messages:\n{}",
                    pbx.log()
                );
            }
            let answer = probe_answer(&probe, pbx.sip_addr());
            assert_eq!(
                answer.as_deref().and_then(status_code),
                Some(200),
                "seed {seed}: OPTIONS after {n} garbled messages: {answer:?}"
            );
        }
    }
    assert!(
        caller.answered.len() > 5,
        "seed {seed}: too few calls got answered to reach in-dialog requests and media"
    );

    let call = establish(&pbx, &clean_callee, "0 8 101", "after-the-garbage").expect("answered");
    for seq in 0..20u16 {
        call.exchange(seq);
    }
    let log = pbx.log();
    assert!(!log.contains("panicked"), "seed {seed}:\n{log}");
    assert!(
        pbx.child.try_wait().is_ok_and(|s| s.is_none()),
        "still running"
    );
}

/// The same over TCP, where framing is the stream's: each garbled message
/// goes out in random pieces on one connection, opened again whenever the
/// PBX closes it; every 100 messages a new connection must get its OPTIONS
/// answered.
#[test]
fn garbled_sip_over_tcp_never_stops_the_pbx() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let callee = SipClient::new();
    let mut pbx = Pbx::start(callee.addr().port(), "");
    let mut caller = new_caller(pbx.sip_addr());
    let mut stream: Option<TcpStream> = None;
    for n in 0..1000 {
        let message = caller.next_message(&mut rng, n);
        let message = garble(&mut rng, &message);
        let connection = match stream.take() {
            Some(connection) => connection,
            None => TcpStream::connect(pbx.sip_addr()).expect("TCP connect"),
        };
        if send_in_pieces(&mut rng, &connection, &message) && still_open(&connection) {
            stream = Some(connection);
        }
        while callee.try_recv().is_some() {}
        if n % 100 == 99 {
            let answer = tcp_options_answer(pbx.sip_addr());
            assert!(
                answer.starts_with("SIP/2.0 200"),
                "seed {seed}: OPTIONS over TCP after {n} garbled messages: {answer}\n{}",
                pbx.log()
            );
        }
    }
    assert!(
        pbx.child.try_wait().is_ok_and(|s| s.is_none()),
        "still running"
    );
    let log = pbx.log();
    assert!(!log.contains("panicked"), "seed {seed}:\n{log}");
}

/// Writes `message` in one to four pieces; false once the PBX has closed
/// the connection.
fn send_in_pieces(rng: &mut StdRng, mut connection: &TcpStream, message: &[u8]) -> bool {
    let mut rest = message;
    for _ in 0..rng.random_range(0..4) {
        let (piece, after) = rest.split_at(rng.random_range(0..=rest.len()));
        if connection.write_all(piece).is_err() {
            return false;
        }
        rest = after;
    }
    connection.write_all(rest).is_ok()
}

/// Reads what the PBX has answered so far; false once it has closed the
/// connection.
fn still_open(mut connection: &TcpStream) -> bool {
    connection.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 65_536];
    let open = loop {
        match connection.read(&mut buf) {
            Ok(0) => break false,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
            Err(_) => break false,
        }
    };
    connection.set_nonblocking(false).expect("blocking");
    open
}

/// The PBX's answer to an OPTIONS from `probe`, past datagrams that
/// garbled messages sent its way (a bit flipped in a port can name it).
fn probe_answer(probe: &SipClient, pbx: SocketAddr) -> Option<String> {
    probe.send(&options(pbx, probe.addr(), "probe"), pbx);
    probe.recv_matching(LIMIT, |text| {
        let ours = header(text, "Call-ID").is_some_and(|id| id.starts_with("probe"));
        ours && status_code(text).is_some()
    })
}

/// What a new TCP connection receives for a clean OPTIONS, or why nothing.
fn tcp_options_answer(pbx: SocketAddr) -> String {
    let mut connection = match TcpStream::connect(pbx) {
        Ok(connection) => connection,
        Err(e) => return format!("no connection: {e}"),
    };
    let me = connection.local_addr().expect("addr");
    let request = options_over_tcp(pbx, me, "tcp-probe");
    connection.set_read_timeout(Some(LIMIT)).expect("timeout");
    if let Err(e) = connection.write_all(&request) {
        return format!("not sent: {e}");
    }
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match connection.read(&mut buf) {
            Ok(0) => break,
            Ok(len) => received.extend_from_slice(&buf[..len]),
            Err(e) => {
                received.extend_from_slice(format!("[{e}]").as_bytes());
                break;
            }
        }
        if received.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}
