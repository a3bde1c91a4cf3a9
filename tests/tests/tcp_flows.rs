//! SIP over TCP through the real `sip-pbx`: RFC 5626 keep-alives, and the
//! lifetimes after which the PBX closes a connection that keeps it waiting
//! (with `sip.timer_t1_ms: 20` a message must arrive within 64*T1 = 1.28 s,
//! and with `registrar.max_expires: 2` a connection may idle 3.28 s).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sip_pbx_e2e::{free_port, options_over_tcp, Pbx};

/// 64*T1 with the T1 below.
const MESSAGE_LIFETIME: Duration = Duration::from_millis(1280);
/// registrar.max_expires plus 64*T1.
const IDLE_LIFETIME: Duration = Duration::from_millis(3280);
const LIMIT: Duration = Duration::from_secs(10);

fn start() -> Pbx {
    Pbx::start(
        free_port(),
        "sip:\n  listen_ip: 127.0.0.1\n  listen_port: SIP_PORT\n  transport: both\n  \
         advertised_ip: 127.0.0.1\n  timer_t1_ms: 20\n\n\
         registrar:\n  min_expires: 1\n  max_expires: 2\n",
    )
}

fn connect(pbx: &Pbx) -> TcpStream {
    let stream = TcpStream::connect(pbx.sip_addr()).expect("connect over TCP");
    stream.set_read_timeout(Some(LIMIT)).expect("read timeout");
    stream
}

/// Sends an OPTIONS on `stream` and returns the status line of the answer.
fn options_over(stream: &mut TcpStream, pbx: &Pbx) -> String {
    let me = stream.local_addr().expect("addr");
    let request = options_over_tcp(pbx.sip_addr(), me, "tcp-flow");
    stream.write_all(&request).expect("send OPTIONS");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "the connection ended in an answer ({other:?}): {}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.contains("Content-Length: 0"), "{head}");
    head.lines().next().unwrap_or_default().to_string()
}

/// Waits for the PBX to close `stream`; returns how long after `since`.
fn closed_after(stream: &mut TcpStream, since: Instant) -> Duration {
    let mut rest = [0u8; 64];
    match stream.read(&mut rest) {
        Ok(0) => since.elapsed(),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => since.elapsed(),
        other => panic!("the PBX did not close the connection: {other:?}"),
    }
}

#[test]
fn a_double_crlf_ping_gets_a_single_crlf_pong() {
    let pbx = start();
    let mut stream = connect(&pbx);
    assert_eq!(options_over(&mut stream, &pbx), "SIP/2.0 200 OK");
    for ping in [&b"\r\n\r\n"[..], b"\r\n\r\n\r\n\r\n"] {
        stream.write_all(ping).expect("ping");
        for _ in 0..ping.len() / 4 {
            let mut pong = [0u8; 2];
            stream.read_exact(&mut pong).expect("pong");
            assert_eq!(&pong, b"\r\n");
        }
    }
    // A ping split across two segments is still one ping.
    stream.write_all(b"\r\n").expect("half a ping");
    stream.flush().expect("flush");
    stream.write_all(b"\r\n").expect("the other half");
    let mut pong = [0u8; 2];
    stream.read_exact(&mut pong).expect("pong to a split ping");
    assert_eq!(&pong, b"\r\n");
    // The connection still carries SIP after its keep-alives.
    assert_eq!(options_over(&mut stream, &pbx), "SIP/2.0 200 OK");
}

#[test]
fn a_connection_that_sends_no_sip_is_closed_after_64_t1() {
    let pbx = start();
    let opened = Instant::now();
    let mut silent = connect(&pbx);
    let waited = closed_after(&mut silent, opened);
    assert!(waited >= MESSAGE_LIFETIME, "closed after {waited:?}");

    let mut partial = connect(&pbx);
    let begun = Instant::now();
    partial
        .write_all(b"OPTIONS sip:pbx@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5;branch=z9hG4bK1\r\n")
        .expect("half a message");
    let waited = closed_after(&mut partial, begun);
    assert!(waited >= MESSAGE_LIFETIME, "closed after {waited:?}");

    // A message begun on a connection that already carried one must also
    // end within 64*T1.
    let mut stalled = connect(&pbx);
    assert_eq!(options_over(&mut stalled, &pbx), "SIP/2.0 200 OK");
    let begun = Instant::now();
    stalled
        .write_all(b"OPTIONS sip:pbx@127.0.0.1 SIP/2.0\r\n")
        .expect("half a message");
    let waited = closed_after(&mut stalled, begun);
    assert!(
        (MESSAGE_LIFETIME..IDLE_LIFETIME).contains(&waited),
        "closed after {waited:?}"
    );
}

#[test]
fn a_flow_lives_while_it_speaks_and_closes_once_idle_past_the_longest_registration() {
    let pbx = start();
    let mut stream = connect(&pbx);
    assert_eq!(options_over(&mut stream, &pbx), "SIP/2.0 200 OK");
    // Pings every second keep it open for twice the idle lifetime.
    let start = Instant::now();
    while start.elapsed() < IDLE_LIFETIME * 2 {
        std::thread::sleep(Duration::from_secs(1));
        stream.write_all(b"\r\n\r\n").expect("ping");
        let mut pong = [0u8; 2];
        stream.read_exact(&mut pong).expect("pong on a live flow");
    }
    assert_eq!(options_over(&mut stream, &pbx), "SIP/2.0 200 OK");
    let last = Instant::now();
    let waited = closed_after(&mut stream, last);
    assert!(waited >= IDLE_LIFETIME, "closed after {waited:?}");
}
