//! Calls through the real `sip-pbx` with `media.mode: bypass`: raw SIP
//! endpoints send real RTP and RTCP through the PBX's port pool.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use sip_pbx_e2e::media::{
    answer, establish, establish_with, media_pair, receive, rtp, sip_i, Call,
};
use sip_pbx_e2e::{
    audio_sdp, caller_request, header, invite, io_uring_available, open_file_limit, prack,
    reliable_response_to, response_to, sdp_audio_target, sdp_port, sdp_session, sdp_version,
    status_code, wait_until, without_io_uring, without_net_raw, Pbx, SipClient,
};

const LIMIT: Duration = Duration::from_secs(10);

fn bypass(extra: &str) -> String {
    format!("media:\n  mode: bypass\n  port_pool: {{start: 31000, end: 31999}}\n  rtp_timeout: 30\n{extra}")
}

fn hang_up(call: &Call<'_>) {
    call.caller.send(&call.request("BYE", 2, None), call.pbx);
    let bye = call.callee.expect_request("BYE");
    call.callee.send(
        &response_to(&bye, "200 OK", call.callee.addr(), None),
        call.pbx,
    );
    // Past repeats of an earlier final response the raw caller did not ACK.
    let answer = next(&call.caller, "the answer to BYE", |m| {
        header(m, "CSeq").is_some_and(|c| c.ends_with("BYE")) && status_code(m) != Some(100)
    });
    assert_eq!(status_code(&answer), Some(200), "{answer}");
}

/// Which way the relay threads wait for packets, from the PBX's log.
fn relay_backend(pbx: &Pbx) -> String {
    let log = pbx.log();
    let line = log
        .lines()
        .find(|l| l.contains("media relay started"))
        .unwrap_or_else(|| panic!("no relay start in the log:\n{log}"));
    line.split("backend=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|b| b.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no backend in {line}"))
}

#[test]
fn rtp_and_rtcp_cross_the_relay_both_ways_and_strangers_are_dropped() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let expected = if io_uring_available() {
        "io_uring"
    } else {
        "epoll"
    };
    assert_eq!(relay_backend(&pbx), expected, "media.relay_io: auto");
    relay_carries_rtp_and_rtcp_but_not_strangers(&pbx, &callee);
}

#[test]
fn the_epoll_relay_carries_rtp_and_rtcp_and_drops_strangers() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass("  relay_io: epoll\n"));
    assert_eq!(relay_backend(&pbx), "epoll");
    relay_carries_rtp_and_rtcp_but_not_strangers(&pbx, &callee);
}

#[test]
fn the_packet_ring_relay_carries_rtp_and_rtcp_and_drops_strangers() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass("  relay_io: packet_ring\n"));
    assert_eq!(relay_backend(&pbx), "packet_ring");
    relay_carries_rtp_and_rtcp_but_not_strangers(&pbx, &callee);
}

/// Without CAP_NET_RAW (a pod's securityContext may drop it), a PBX told
/// to relay through the packet ring says so and does not start.
#[test]
fn without_cap_net_raw_the_packet_ring_refuses_to_start() {
    let (status, log) = Pbx::refused(
        sip_pbx_e2e::free_port(),
        &bypass("  relay_io: packet_ring\n"),
        without_net_raw,
    );
    assert!(!status.success(), "{status}: {log}");
    assert!(
        log.contains(
            "media.relay_io is packet_ring, but the packet ring cannot open (it needs CAP_NET_RAW)"
        ),
        "{log}"
    );
}

/// Under the seccomp profile of a pod's RuntimeDefault, io_uring is
/// refused: `auto` relays through epoll, and `io_uring` will not start.
#[test]
fn where_seccomp_refuses_io_uring_the_relay_uses_epoll() {
    let callee = SipClient::new();
    let pbx = Pbx::start_with(callee.addr().port(), &bypass(""), without_io_uring);
    assert_eq!(relay_backend(&pbx), "epoll");
    assert!(pbx.log().contains("io_uring unavailable"), "{}", pbx.log());
    relay_carries_rtp_and_rtcp_but_not_strangers(&pbx, &callee);

    let (status, log) = Pbx::refused(
        callee.addr().port(),
        &bypass("  relay_io: io_uring\n"),
        without_io_uring,
    );
    assert!(!status.success(), "{status}: {log}");
    assert!(
        log.contains("media.relay_io is io_uring, but io_uring cannot start"),
        "{log}"
    );
}

fn relay_carries_rtp_and_rtcp_but_not_strangers(pbx: &Pbx, callee: &SipClient) {
    let call = establish(pbx, callee, "0 8 101", "relay-1").expect("answered");
    assert_ne!(call.to_pbx_from_a.port(), 0);
    assert_eq!(call.to_pbx_from_a.ip().to_string(), "127.0.0.1");
    assert!(call.invite_at_b.contains("c=IN IP4 127.0.0.1"));

    for seq in 0..50u16 {
        call.exchange(seq);
    }
    let rtcp_to = SocketAddr::new(call.to_pbx_from_a.ip(), call.to_pbx_from_a.port() + 1);
    call.a
        .1
        .send_to(b"\x81\xc8\x00\x06rtcp-sender-report", rtcp_to)
        .expect("send");
    let (got, _) = receive(&call.b.1).expect("RTCP at the callee's odd port");
    assert_eq!(got, b"\x81\xc8\x00\x06rtcp-sender-report");

    let stranger = UdpSocket::bind("127.0.0.1:0").expect("bind");
    stranger
        .send_to(&rtp(999, 0xEE), call.to_pbx_from_a)
        .expect("send");
    call.a
        .0
        .send_to(&rtp(51, 0xA0), call.to_pbx_from_a)
        .expect("send");
    let (got, _) = receive(&call.b.0).expect("the caller's next packet");
    assert_eq!(
        got,
        rtp(51, 0xA0),
        "the stranger's packet was not forwarded"
    );
    hang_up(&call);
    wait_until(LIMIT, "ports back in the pool", || {
        pbx.http_get("/api/stats").1.contains("\"ports_in_use\":0")
    });
}

#[test]
fn hold_by_reinvite_keeps_direction_and_follows_the_new_port() {
    hold_and_move(&bypass(""));
}

#[test]
fn the_epoll_relay_follows_a_hold_to_a_new_port() {
    hold_and_move(&bypass("  relay_io: epoll\n"));
}

#[test]
fn the_packet_ring_relay_follows_a_hold_to_a_new_port() {
    hold_and_move(&bypass("  relay_io: packet_ring\n"));
}

/// The caller holds the call from a new port: the relay forgets the
/// address it latched onto and sends to the new one.
fn hold_and_move(config: &str) {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), config);
    let call = establish(&pbx, &callee, "0 101", "hold-1").expect("answered");
    // Latched onto the caller's first port before it moves.
    call.a
        .0
        .send_to(&rtp(1, 0xA0), call.to_pbx_from_a)
        .expect("send");
    let (got, _) = receive(&call.b.0).expect("RTP at the callee");
    assert_eq!(got, rtp(1, 0xA0));
    let (moved, _) = media_pair();
    let moved_port = moved.local_addr().expect("addr").port();
    let hold = audio_sdp(moved_port, "0 101").replace("a=sendrecv", "a=sendonly");
    let answer = audio_sdp(port(&call.b), "0 101").replace("a=sendrecv", "a=recvonly");
    let (reinvite, ok) = call.reinvite(3, &hold, &answer);
    assert!(reinvite.contains("a=sendonly"), "{reinvite}");
    assert_eq!(
        sdp_audio_target(&reinvite),
        Some(call.to_pbx_from_b),
        "same relay port"
    );
    assert!(ok.contains("a=recvonly"), "{ok}");
    moved
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    call.b
        .0
        .send_to(&rtp(7, 0xB0), call.to_pbx_from_b)
        .expect("send");
    let (got, _) = receive(&moved).expect("RTP at the caller's new port");
    assert_eq!(got, rtp(7, 0xB0));
}

/// Hold and resume by UPDATE (RFC 3311): the relay ports stay the same,
/// media flows again after the resume, and a call held in silence for
/// longer than rtp_timeout is not hung up.
#[test]
fn hold_and_resume_by_update_keep_the_call_and_its_media() {
    let callee = SipClient::new();
    let pbx = Pbx::start(
        callee.addr().port(),
        "media:\n  mode: bypass\n  port_pool: {start: 35000, end: 35999}\n  rtp_timeout: 1\n",
    );
    let call = establish(&pbx, &callee, "0 101", "update-hold-1").expect("answered");
    call.exchange(1);
    let a_port = call.a.0.local_addr().expect("addr").port();
    let b_port = call.b.0.local_addr().expect("addr").port();
    for (cseq, direction) in [(2, "a=inactive"), (3, "a=sendrecv")] {
        let offer = audio_sdp(a_port, "0 101").replace("a=sendrecv", direction);
        call.caller
            .send(&call.request("UPDATE", cseq, Some(&offer)), call.pbx);
        let update = call.callee.expect_request("UPDATE");
        assert!(update.contains(direction), "{update}");
        assert_eq!(sdp_audio_target(&update), Some(call.to_pbx_from_b));
        let answer = audio_sdp(b_port, "0 101").replace("a=sendrecv", direction);
        call.callee.send(
            &response_to(&update, "200 OK", call.callee.addr(), Some(&answer)),
            call.pbx,
        );
        let (code, ok) = call.caller.final_response(LIMIT).expect("200 to UPDATE");
        assert_eq!(code, 200, "{ok}");
        assert!(ok.contains(direction), "{ok}");
        assert_eq!(sdp_audio_target(&ok), Some(call.to_pbx_from_a));
        if direction == "a=inactive" {
            assert_eq!(
                call.callee.recv(Duration::from_secs(3)),
                None,
                "a call on hold was hung up for its silence"
            );
        }
    }
    call.exchange(2);
    hang_up(&call);
}

/// A call set up without an offer in the INVITE: the callee offers in its
/// 200 and the caller answers in the ACK (RFC 3264 late offer). Both go
/// through the relay, and media flows both ways.
#[test]
fn late_offer_in_the_200_and_answer_in_the_ack_are_relayed() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let caller = SipClient::new();
    let (a, b) = (media_pair(), media_pair());
    caller.send(
        &invite(pbx.sip_addr(), "1002", caller.addr(), "late-1", None),
        pbx.sip_addr(),
    );
    let invite_at_b = callee.expect_request("INVITE");
    assert!(!invite_at_b.contains("m=audio"), "{invite_at_b}");
    let b_port = b.0.local_addr().expect("addr").port();
    let ok_at_a = answer(&pbx, &callee, &caller, &invite_at_b, b_port);
    let to_pbx_from_a = sdp_audio_target(&ok_at_a).expect("the PBX's offer");
    assert_ne!(
        to_pbx_from_a.port(),
        b_port,
        "the callee's own port reached the caller"
    );
    let a_port = a.0.local_addr().expect("addr").port();
    caller.send(
        &caller_request(
            "ACK",
            &ok_at_a,
            caller.addr(),
            1,
            Some(&audio_sdp(a_port, "0")),
        ),
        pbx.sip_addr(),
    );
    let ack = callee.expect_request("ACK");
    let to_pbx_from_b = sdp_audio_target(&ack).expect("the answer in the ACK");
    assert_ne!(
        to_pbx_from_b.port(),
        a_port,
        "the caller's own port reached the callee"
    );
    let call = Call {
        caller,
        callee: &callee,
        a,
        b,
        to_pbx_from_a,
        to_pbx_from_b,
        invite_at_b,
        ok_at_a,
        pbx: pbx.sip_addr(),
    };
    call.exchange(1);
    hang_up(&call);
}

/// A reliable 183 answers the caller's offer; the caller's PRACK then
/// offers a new port (RFC 3262). The relay keeps its ports and sends the
/// callee's early media to the new one.
#[test]
fn a_new_offer_in_prack_moves_early_media() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let (a, b) = (media_pair(), media_pair());
    let (caller, invite_at_b, progress_at_a) = answered_early(
        &pbx,
        &callee,
        "prack-1",
        &audio_sdp(port(&a), "0 101"),
        &audio_sdp(port(&b), "0 101"),
    );
    let to_pbx_from_b = sdp_audio_target(&invite_at_b).expect("the PBX's offer");
    let to_pbx_from_a = sdp_audio_target(&progress_at_a).expect("the PBX's answer");

    let (moved, _) = media_pair();
    let moved_port = moved.local_addr().expect("addr").port();
    let offer = audio_sdp(moved_port, "0 101");
    caller.send(
        &prack(&progress_at_a, caller.addr(), 2, Some(&offer)),
        pbx.sip_addr(),
    );
    let prack_at_b = callee.expect_request("PRACK");
    assert_eq!(
        sdp_audio_target(&prack_at_b),
        Some(to_pbx_from_b),
        "same relay port"
    );
    callee.send(
        &response_to(
            &prack_at_b,
            "200 OK",
            callee.addr(),
            Some(&audio_sdp(port(&b), "0 101")),
        ),
        pbx.sip_addr(),
    );
    let (code, prack_ok) = caller.final_response(LIMIT).expect("200 to PRACK");
    assert_eq!(code, 200, "{prack_ok}");
    assert_eq!(
        sdp_audio_target(&prack_ok),
        Some(to_pbx_from_a),
        "same relay port"
    );

    b.0.send_to(&rtp(1, 0xB0), to_pbx_from_b).expect("send");
    let (got, _) = receive(&moved).expect("early media at the caller's new port");
    assert_eq!(got, rtp(1, 0xB0));
}

/// A multipart body (RFC 5621) as SIP-I trunks send: SDP beside binary
/// ISUP. Its SDP takes part in offer/answer through the relay, both ways;
/// the ISUP, which this B2BUA does not interwork, stays behind.
#[test]
fn sip_i_bodies_have_their_sdp_relayed_and_their_isup_left_behind() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish_with(&pbx, &callee, "0 8", "sip-i-1", sip_i).expect("answered");
    for (relayed, own) in [(&call.invite_at_b, &call.a), (&call.ok_at_a, &call.b)] {
        assert_eq!(header(relayed, "Content-Type"), Some("application/sdp"));
        assert!(!relayed.contains("ISUP"), "{relayed}");
        let own_port = own.0.local_addr().expect("addr").port();
        assert!(
            !relayed.contains(&format!("m=audio {own_port} ")),
            "a phone's own port went past the relay: {relayed}"
        );
    }
    call.exchange(1);
    hang_up(&call);
}

/// In-dialog offers whose answers the relay cannot use: a multipart body
/// without SDP to a re-INVITE, unparsable SDP to an UPDATE. Each offer
/// fails with 488 rather than leaving the caller without an answer, the
/// callee's 200 to the re-INVITE is acknowledged, and the call keeps its
/// media.
#[test]
fn an_in_dialog_answer_the_relay_cannot_use_fails_the_offer_and_the_call_keeps_its_media() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "0 101", "bad-reanswer-1").expect("answered");
    let offer = audio_sdp(call.a.0.local_addr().expect("addr").port(), "0 101");
    let callee_port = call.b.0.local_addr().expect("addr").port();
    let multipart = format!(
        "--x\r\nContent-Type: text/plain\r\n\r\nc=IN IP4 127.0.0.1 m=audio {callee_port}\r\n--x--\r\n"
    );
    let unparsable = audio_sdp(callee_port, "0 101").replace("m=audio", "m=audio twenty");
    for (cseq, method, answer, content_type) in [
        (2, "INVITE", multipart, "multipart/mixed;boundary=x"),
        (3, "UPDATE", unparsable, "application/sdp"),
    ] {
        call.caller
            .send(&call.request(method, cseq, Some(&offer)), call.pbx);
        let request = call.callee.expect_request(method);
        let ok = String::from_utf8_lossy(&response_to(
            &request,
            "200 OK",
            call.callee.addr(),
            Some(&answer),
        ))
        .replace(
            "application/sdp\r\nContent-Length",
            &format!("{content_type}\r\nContent-Length"),
        );
        call.callee.send(ok.as_bytes(), call.pbx);
        let (code, refusal) = call.caller.final_response(LIMIT).expect("an answer");
        assert_eq!(code, 488, "{method}: {refusal}");
        assert!(
            header(&refusal, "Warning").is_some_and(|w| w.contains("SDP")),
            "{refusal}"
        );
        assert!(
            !refusal.contains(&callee_port.to_string()),
            "the callee's address reached the caller: {refusal}"
        );
        if method == "INVITE" {
            let ack = call.callee.expect_request("ACK");
            assert_eq!(
                header(&ack, "CSeq"),
                header(&request, "CSeq")
                    .map(|c| c.replace("INVITE", "ACK"))
                    .as_deref(),
                "{ack}"
            );
        }
        answer_restoring_reinvite(&call);
        call.exchange(cseq as u16);
    }
    hang_up(&call);
}

/// An offer that fails leaves the session as it was (RFC 3264 §8): the
/// caller offers to move its media to another port, and the callee refuses
/// (488 to a re-INVITE, 500 to an UPDATE) or answers with SDP the relay
/// cannot use. The callee's next packet, sent before the caller says
/// anything, still reaches the caller where it was, not the port of the
/// refused offer.
#[test]
fn a_refused_offer_leaves_the_media_where_it_was() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "0", "refused-move-1").expect("answered");
    call.exchange(1);
    let elsewhere = media_pair();
    let offer = audio_sdp(elsewhere.0.local_addr().expect("addr").port(), "0");
    let unusable = audio_sdp(call.b.0.local_addr().expect("addr").port(), "0")
        .replace("m=audio", "m=audio twenty");
    for (cseq, method, status, answer) in [
        (2, "INVITE", "488 Not Acceptable Here", None),
        (3, "UPDATE", "500 Server Internal Error", None),
        (4, "INVITE", "200 OK", Some(unusable.as_str())),
    ] {
        call.caller
            .send(&call.request(method, cseq, Some(&offer)), call.pbx);
        let request = call.callee.expect_request(method);
        let refusal = response_to(&request, status, call.callee.addr(), answer);
        call.callee.send(&refusal, call.pbx);
        if method == "INVITE" {
            call.callee.expect_request("ACK");
        }
        let (code, _) = call.caller.final_response(LIMIT).expect("an answer");
        assert!(code >= 400, "{method} answered {status}: {code}");
        if answer.is_some() {
            answer_restoring_reinvite(&call);
        }
        let seq = 10 * cseq as u16;
        call.b
            .0
            .send_to(&rtp(seq, 0xB0), call.to_pbx_from_b)
            .expect("send");
        let (got, _) = receive(&call.a.0).unwrap_or_else(|| {
            panic!("after {method} {status}, the callee's RTP did not reach the caller's port")
        });
        assert_eq!(got, rtp(seq, 0xB0));
        call.exchange(seq + 1);
    }
    hang_up(&call);
}

/// A re-INVITE that adds video takes relay ports for it. When the callee
/// refuses the whole offer (488) or only the video (port 0 in its answer),
/// those ports go back to the pool at once, not when the call ends, and the
/// audio goes on.
#[test]
fn video_the_callee_refuses_holds_no_ports() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "0", "video-refused-1").expect("answered");
    wait_for_ports(&pbx, 4);
    let video = media_pair();
    let with_video = audio_sdp(port(&call.a), "0") + &video_line(port(&video));
    let audio_only = audio_sdp(port(&call.b), "0") + "m=video 0 RTP/AVP 99\r\n";
    for (cseq, status, answer) in [
        (2, "488 Not Acceptable Here", None),
        (3, "200 OK", Some(audio_only.as_str())),
    ] {
        call.caller
            .send(&call.request("INVITE", cseq, Some(&with_video)), call.pbx);
        let reinvite = call.callee.expect_request("INVITE");
        assert!(
            !reinvite.contains("m=video 0 "),
            "the video is offered on relay ports:\n{reinvite}"
        );
        assert_eq!(ports_in_use(&pbx), 8, "ports for the offered video");
        let response = response_to(&reinvite, status, call.callee.addr(), answer);
        call.callee.send(&response, call.pbx);
        let (code, at_caller) = call.caller.final_response(LIMIT).expect("an answer");
        assert_eq!(code, if answer.is_some() { 200 } else { 488 });
        if answer.is_some() {
            assert!(at_caller.contains("m=video 0 "), "{at_caller}");
            call.caller.send(&call.request("ACK", cseq, None), call.pbx);
        }
        call.callee.expect_request("ACK");
        wait_for_ports(&pbx, 4);
        call.exchange(10 * cseq as u16);
    }
    hang_up(&call);
}

/// A fax gateway switches the call to T.38 with a re-INVITE whose one
/// m-line is `image udptl t38`, from new ports. The relay carries the
/// UDPTL packets, which are not RTP, both ways, with the T.38 attributes
/// untouched, and the call goes back to voice on its first ports.
#[test]
fn a_t38_fax_reinvite_is_relayed_and_the_call_returns_to_voice() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "0", "t38-1").expect("answered");
    let (fax_a, fax_b) = (media_pair(), media_pair());
    let t38 = |port: u16| {
        format!(
            "v=0\r\no=gw 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=image {port} udptl t38\r\na=T38FaxVersion:0\r\na=T38MaxBitRate:14400\r\n\
             a=T38FaxRateManagement:transferredTCF\r\na=T38FaxUdpEC:t38UDPRedundancy\r\n"
        )
    };
    let (reinvite, ok_at_a) = call.reinvite(2, &t38(port(&fax_a)), &t38(port(&fax_b)));
    assert!(
        reinvite.contains("a=T38FaxUdpEC:t38UDPRedundancy"),
        "{reinvite}"
    );
    let relay_port = |message: &str| {
        let port = sdp_port(message, "image").filter(|&p| p != 0);
        SocketAddr::new(
            call.pbx.ip(),
            port.unwrap_or_else(|| panic!("T.38 in:\n{message}")),
        )
    };
    let (to_pbx_from_a, to_pbx_from_b) = (relay_port(&ok_at_a), relay_port(&reinvite));

    // UDPTL: a sequence number and IFP packets, no RTP header.
    let udptl = |seq: u8| vec![0x00, seq, 0x03, 0x06, 0x80, 0x00, 0x00, 0x00];
    for (from, to_pbx, at, seq) in [
        (&fax_a, to_pbx_from_a, &fax_b, 1),
        (&fax_b, to_pbx_from_b, &fax_a, 2),
    ] {
        from.0.send_to(&udptl(seq), to_pbx).expect("send");
        let (got, _) = receive(&at.0).expect("UDPTL through the relay");
        assert_eq!(got, udptl(seq));
    }

    let voice = |pair| audio_sdp(port(pair), "0");
    call.reinvite(3, &voice(&call.a), &voice(&call.b));
    call.exchange(1);
    hang_up(&call);
}

/// Phones that encrypt their media with SDES keys (RFC 4568) offer
/// RTP/SAVP with a=crypto: the relay passes the keys through untouched
/// and forwards the SRTP packets as they come, so the two phones decrypt
/// each other's media.
#[test]
fn srtp_with_sdes_keys_is_relayed_end_to_end() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish_with(&pbx, &callee, "0", "srtp-1", sdes).expect("answered");
    for message in [&call.invite_at_b, &call.ok_at_a] {
        assert!(message.contains(" RTP/SAVP 0"), "{message}");
        assert!(message.contains(CRYPTO), "{message}");
    }
    call.exchange(1);
    hang_up(&call);
}

const CRYPTO: &str =
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR";

/// `message` with its SDP offering or answering SRTP with SDES keys.
fn sdes(message: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&message).to_string();
    let (head, sdp) = text.split_once("\r\n\r\n").expect("a head");
    let secured = sdp.replace(" RTP/AVP ", " RTP/SAVP ") + CRYPTO + "\r\n";
    let head = head.replace(
        &format!("Content-Length: {}", sdp.len()),
        &format!("Content-Length: {}", secured.len()),
    );
    format!("{head}\r\n\r\n{secured}").into_bytes()
}

/// A callee that answers in a reliable 183 (RFC 3262) need not repeat the
/// answer in its 200. When that early answer refused the caller's video,
/// the video's ports go back once the 200 comes, as after any final answer.
#[test]
fn video_refused_in_a_reliable_183_gives_its_ports_back_when_the_200_has_no_sdp() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let (a, b, video) = (media_pair(), media_pair(), media_pair());
    let (caller, invite_at_b, progress_at_a) = answered_early(
        &pbx,
        &callee,
        "early-video-1",
        &(audio_sdp(port(&a), "0") + &video_line(port(&video))),
        &(audio_sdp(port(&b), "0") + "m=video 0 RTP/AVP 99\r\n"),
    );
    assert_eq!(ports_in_use(&pbx), 8, "ports for the offered video");
    assert_eq!(
        sdp_port(&progress_at_a, "video"),
        Some(0),
        "{progress_at_a}"
    );
    caller.send(
        &prack(&progress_at_a, caller.addr(), 2, None),
        pbx.sip_addr(),
    );
    let prack_at_b = callee.expect_request("PRACK");
    callee.send(
        &response_to(&prack_at_b, "200 OK", callee.addr(), None),
        pbx.sip_addr(),
    );
    let (code, prack_ok) = caller.final_response(LIMIT).expect("200 to PRACK");
    assert_eq!(code, 200, "{prack_ok}");
    assert_eq!(ports_in_use(&pbx), 8, "an early answer keeps the ports");

    callee.send(
        &response_to(&invite_at_b, "200 OK", callee.addr(), None),
        pbx.sip_addr(),
    );
    let (code, ok_at_a) = caller.final_response(LIMIT).expect("200");
    assert_eq!(code, 200, "{ok_at_a}");
    assert!(
        !ok_at_a.contains("m=audio"),
        "the caller holds the answer already:\n{ok_at_a}"
    );
    let call = Call {
        to_pbx_from_a: sdp_audio_target(&progress_at_a).expect("the PBX's answer"),
        to_pbx_from_b: sdp_audio_target(&invite_at_b).expect("the PBX's offer"),
        caller,
        callee: &callee,
        a,
        b,
        invite_at_b,
        ok_at_a,
        pbx: pbx.sip_addr(),
    };
    call.caller.send(&call.request("ACK", 1, None), call.pbx);
    call.callee.expect_request("ACK");
    wait_for_ports(&pbx, 4);
    call.exchange(1);
    hang_up(&call);
}

/// A caller that supports reliable provisional responses (RFC 3262)
/// offers `offer`, and the callee answers `early` in a reliable 183: the
/// caller, the INVITE at the callee and the 183 at the caller.
fn answered_early(
    pbx: &Pbx,
    callee: &SipClient,
    call_id: &str,
    offer: &str,
    early: &str,
) -> (SipClient, String, String) {
    let caller = SipClient::new();
    let offer = invite(pbx.sip_addr(), "1002", caller.addr(), call_id, Some(offer));
    let offer = String::from_utf8_lossy(&offer)
        .replace("Content-Type:", "Supported: 100rel\r\nContent-Type:");
    caller.send(offer.as_bytes(), pbx.sip_addr());
    let invite_at_b = callee.expect_request("INVITE");
    let progress = reliable_response_to(
        &invite_at_b,
        "183 Session Progress",
        callee.addr(),
        Some(early),
    );
    callee.send(&progress, pbx.sip_addr());
    let (code, progress_at_a) = caller.final_response(LIMIT).expect("183");
    assert_eq!(code, 183, "{progress_at_a}");
    (caller, invite_at_b, progress_at_a)
}

fn ports_in_use(pbx: &Pbx) -> u64 {
    let (_, stats) = pbx.http_get("/api/stats");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    stats["ports_in_use"].as_u64().expect("ports_in_use")
}

fn wait_for_ports(pbx: &Pbx, n: u64) {
    wait_until(LIMIT, &format!("{n} ports in use"), || {
        ports_in_use(pbx) == n
    });
}

fn port(pair: &(UdpSocket, UdpSocket)) -> u16 {
    pair.0.local_addr().expect("addr").port()
}

fn video_line(port: u16) -> String {
    format!("m=video {port} RTP/AVP 99\r\na=rtpmap:99 H264/90000\r\n")
}

/// A callee that answers a relayed re-INVITE with SDP the relay cannot use
/// believes in a session the relay does not carry. After its ACK, the PBX
/// offers it the session last agreed with it again (the SDP of the call's
/// INVITE, one version up), and its answer to that is where the caller's
/// media goes from then on.
#[test]
fn an_unusable_answer_is_followed_by_a_reinvite_that_restores_the_session() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "0", "restore-1").expect("answered");
    let reinvite = hold_answered_with_unusable_sdp(&call);

    let restore = call.callee.expect_request("INVITE");
    assert_eq!(sdp_session(&restore), sdp_session(&call.invite_at_b));
    assert_eq!(
        sdp_version(&restore),
        sdp_version(&reinvite).map(|v| v + 1),
        "{restore}"
    );
    let moved = media_pair();
    let answer = audio_sdp(moved.0.local_addr().expect("addr").port(), "0");
    let ok = response_to(&restore, "200 OK", call.callee.addr(), Some(&answer));
    call.callee.send(&ok, call.pbx);
    let ack = call.callee.expect_request("ACK");
    assert_eq!(
        header(&ack, "CSeq"),
        header(&restore, "CSeq")
            .map(|c| c.replace("INVITE", "ACK"))
            .as_deref()
    );
    call.a
        .0
        .send_to(&rtp(1, 0xA0), call.to_pbx_from_a)
        .expect("send");
    let (got, source) = receive(&moved.0).expect("the caller's RTP at the callee's new port");
    assert_eq!(got, rtp(1, 0xA0));
    assert_eq!(source, call.to_pbx_from_b);
    hang_up(&call);
}

/// The callee's own re-INVITE crossed the PBX's restoring one, so it
/// answered 491: the PBX offers the session again once the glare is over
/// (RFC 3261 §14.1), and a 500 with a short Retry-After is waited out the
/// same way, until the callee takes the session up.
#[test]
fn a_restoring_reinvite_refused_for_glare_or_a_busy_callee_is_sent_again() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "0", "restore-again-1").expect("answered");
    hold_answered_with_unusable_sdp(&call);
    let mut restore = call.callee.expect_request("INVITE");
    for refusal in [
        "491 Request Pending",
        "500 Server Internal Error\r\nRetry-After: 1",
    ] {
        let refused = response_to(&restore, refusal, call.callee.addr(), None);
        call.callee.send(&refused, call.pbx);
        call.callee.expect_request("ACK");
        let again = next(call.callee, "the restoring re-INVITE again", |m| {
            m.starts_with("INVITE ") && header(m, "CSeq") != header(&restore, "CSeq")
        });
        assert_eq!(sdp_session(&again), sdp_session(&restore));
        restore = again;
    }
    let moved = media_pair();
    let answer = audio_sdp(moved.0.local_addr().expect("addr").port(), "0");
    let ok = response_to(&restore, "200 OK", call.callee.addr(), Some(&answer));
    call.callee.send(&ok, call.pbx);
    call.callee.expect_request("ACK");
    call.a
        .0
        .send_to(&rtp(1, 0xA0), call.to_pbx_from_a)
        .expect("send");
    let (got, _) = receive(&moved.0).expect("the caller's RTP at the callee's new port");
    assert_eq!(got, rtp(1, 0xA0));
    hang_up(&call);
}

/// A callee that lost the dialog answers the PBX's restoring re-INVITE
/// 481 or 408: the call is over (RFC 3261 §12.2.1.2), so the caller gets
/// a BYE at once, not silence until the RTP timeout.
#[test]
fn a_restoring_reinvite_the_callee_has_no_dialog_for_hangs_up_the_caller() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    for (n, refusal) in ["481 Call/Transaction Does Not Exist", "408 Request Timeout"]
        .into_iter()
        .enumerate()
    {
        let call = establish(&pbx, &callee, "0", &format!("restore-gone-{n}")).expect("answered");
        hold_answered_with_unusable_sdp(&call);
        let restore = call.callee.expect_request("INVITE");
        let refused = response_to(&restore, refusal, call.callee.addr(), None);
        call.callee.send(&refused, call.pbx);
        call.callee.expect_request("ACK");
        let bye = next(&call.caller, "the PBX's BYE", |m| m.starts_with("BYE "));
        let cause = format!("SIP;cause={}", &refusal[..3]);
        assert!(
            header(&bye, "Reason").is_some_and(|r| r.starts_with(&cause)),
            "{bye}"
        );
        let ok = response_to(&bye, "200 OK", call.caller.addr(), None);
        call.caller.send(&ok, call.pbx);
        let records = pbx.wait_cdrs(n + 1);
        assert_eq!(records[n]["end_reason"], "error", "{refusal}");
        wait_until(LIMIT, "no calls left", || pbx.active_calls() == 0);
    }
}

/// A callee that never answers the PBX's restoring re-INVITE is gone as
/// much as one that answers 481: once the transaction times out (64*T1,
/// 32 s), the caller gets a BYE.
#[test]
fn a_restoring_reinvite_never_answered_hangs_up_the_caller() {
    let callee = SipClient::new();
    let pbx = Pbx::start(
        callee.addr().port(),
        "media:\n  mode: bypass\n  port_pool: {start: 36000, end: 36999}\n  rtp_timeout: 120\n",
    );
    let call = establish(&pbx, &callee, "0", "restore-silent-1").expect("answered");
    hold_answered_with_unusable_sdp(&call);
    call.callee.expect_request("INVITE");
    let timed_out = Duration::from_secs(32) + LIMIT;
    let bye = call
        .caller
        .recv_matching(timed_out, |m| m.starts_with("BYE "))
        .expect("a BYE once the restoring re-INVITE timed out");
    assert!(
        header(&bye, "Reason").is_some_and(|r| r.starts_with("SIP;cause=408")),
        "{bye}"
    );
    let ok = response_to(&bye, "200 OK", call.caller.addr(), None);
    call.caller.send(&ok, call.pbx);
    assert_eq!(pbx.wait_cdrs(1)[0]["end_reason"], "error");
}

/// The PBX is the origin of the SDP each leg receives (RFC 3264 §8): one
/// o= session whose version goes up when, and only when, the body changes,
/// though the caller here never changes its own version.
#[test]
fn each_leg_sees_one_sdp_origin_whose_version_follows_the_changes() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "0", "origin-1").expect("answered");
    let a_port = call.a.0.local_addr().expect("addr").port();
    let b_answer = audio_sdp(call.b.0.local_addr().expect("addr").port(), "0");
    let first = sdp_version(&call.invite_at_b).expect("a version");
    for (cseq, offer, version) in [
        (2, audio_sdp(a_port, "0"), first),
        (
            3,
            audio_sdp(a_port, "0").replace("a=sendrecv", "a=sendonly"),
            first + 1,
        ),
        (4, audio_sdp(a_port, "0"), first + 2),
    ] {
        call.caller
            .send(&call.request("INVITE", cseq, Some(&offer)), call.pbx);
        let reinvite = call.callee.expect_request("INVITE");
        assert_eq!(sdp_version(&reinvite), Some(version), "{reinvite}");
        let ok = response_to(&reinvite, "200 OK", call.callee.addr(), Some(&b_answer));
        call.callee.send(&ok, call.pbx);
        let ok_at_a = next(&call.caller, "the 200", |m| m.starts_with("SIP/2.0 200"));
        call.caller.send(
            &caller_request("ACK", &ok_at_a, call.caller.addr(), cseq, None),
            call.pbx,
        );
        call.callee.expect_request("ACK");
    }
    hang_up(&call);
}

/// The callee answers with SDP the relay cannot use: the call would have
/// no media, so it fails with 502 to the caller, the callee's 200 is
/// acknowledged and hung up with the reason, and its ports come back.
#[test]
fn an_answer_whose_sdp_cannot_be_relayed_fails_the_call_with_502() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let caller = SipClient::new();
    let a = media_pair();
    let offer = audio_sdp(a.0.local_addr().expect("addr").port(), "0");
    caller.send(
        &invite(
            pbx.sip_addr(),
            "1002",
            caller.addr(),
            "bad-answer-1",
            Some(&offer),
        ),
        pbx.sip_addr(),
    );
    let invite_at_b = callee.expect_request("INVITE");
    let unparsable = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                      m=audio twenty RTP/AVP 0\r\n";
    callee.send(
        &response_to(&invite_at_b, "200 OK", callee.addr(), Some(unparsable)),
        pbx.sip_addr(),
    );
    let (code, refusal) = caller.final_response(LIMIT).expect("a final response");
    assert_eq!(code, 502, "{refusal}");
    assert!(
        header(&refusal, "Warning").is_some_and(|w| w.contains("SDP")),
        "{refusal}"
    );
    assert!(!refusal.contains("m=audio"), "{refusal}");
    callee.expect_request("ACK");
    let bye = callee.expect_request("BYE");
    assert_eq!(
        header(&bye, "Reason"),
        Some("SIP;cause=488;text=\"SDP answer not acceptable\""),
        "{bye}"
    );
    callee.send(
        &response_to(&bye, "200 OK", callee.addr(), None),
        pbx.sip_addr(),
    );
    let records = pbx.wait_cdrs(1);
    assert_eq!(records[0]["sip_code"], 502, "{}", records[0]);
    assert_eq!(records[0]["disposition"], "failed", "{}", records[0]);
    wait_until(
        LIMIT,
        "the call gone and its ports back in the pool",
        || {
            let stats = pbx.http_get("/api/stats").1;
            stats.contains("\"ports_in_use\":0") && stats.contains("\"active_calls\":0")
        },
    );
}

#[test]
fn offer_is_filtered_to_the_configured_codecs_and_488_without_one() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "18 8 0 101", "codecs-1").expect("answered");
    let m_line = call
        .invite_at_b
        .lines()
        .find(|l| l.starts_with("m=audio"))
        .expect("m=");
    assert!(m_line.ends_with("RTP/AVP 0 8 101"), "{m_line}");
    assert!(!call.invite_at_b.contains("G729"));
    hang_up(&call);
    match establish(&pbx, &callee, "18", "codecs-2") {
        Err(code) => assert_eq!(code, 488),
        Ok(_) => panic!("a G.729-only offer was accepted"),
    }
}

#[test]
fn exhausted_port_pool_answers_503() {
    let callee = SipClient::new();
    // Four even/odd pairs: two calls of two legs each.
    let pbx = Pbx::start(
        callee.addr().port(),
        "media:\n  mode: bypass\n  port_pool: {start: 32000, end: 32007}\n",
    );
    let first = establish(&pbx, &callee, "0", "pool-1").expect("first call");
    let second = establish(&pbx, &callee, "0", "pool-2").expect("second call");
    match establish(&pbx, &callee, "0", "pool-3") {
        Err(code) => assert_eq!(code, 503),
        Ok(_) => panic!("a third call got media ports from a pool of two calls"),
    }
    hang_up(&first);
    wait_until(LIMIT, "the first call's ports back", || {
        pbx.http_get("/api/stats").1.contains("\"ports_in_use\":4")
    });
    let third = establish(&pbx, &callee, "0", "pool-4").expect("a call after ports came back");
    hang_up(&second);
    hang_up(&third);
}

#[test]
fn a_low_open_file_limit_is_raised_to_the_hard_limit() {
    let callee = SipClient::new();
    // Soft 64, as low as some hosts set it; 20 calls need 80 media sockets.
    let pbx = Pbx::start_with(callee.addr().port(), &bypass(""), open_file_limit(64, 4096));
    let calls: Vec<Call<'_>> = (0..20)
        .map(|n| {
            establish(&pbx, &callee, "0", &format!("limit-{n}"))
                .unwrap_or_else(|code| panic!("call {n} refused with {code}:\n{}", pbx.log()))
        })
        .collect();
    let log = pbx.log();
    assert!(log.contains("open-file limit raised"), "{log}");
    assert!(!log.contains("open-file limit is below"), "{log}");
    for call in &calls {
        hang_up(call);
    }
}

#[test]
fn out_of_descriptors_a_call_gets_503_and_the_log_says_why() {
    let callee = SipClient::new();
    // A hard limit of 100 descriptors, against a pool of 1,000 ports.
    let pbx = Pbx::start_with(callee.addr().port(), &bypass(""), open_file_limit(100, 100));
    assert!(
        pbx.log()
            .contains("open-file limit is below what media.port_pool needs"),
        "{}",
        pbx.log()
    );
    let mut calls = Vec::new();
    let refused = (0..50).find_map(
        |n| match establish(&pbx, &callee, "0", &format!("fd-{n}")) {
            Ok(call) => {
                calls.push(call);
                None
            }
            Err(code) => Some(code),
        },
    );
    assert_eq!(refused, Some(503), "no call refused within 50 calls");
    assert!(!calls.is_empty(), "no call had media at all");
    let log = pbx.log();
    assert!(
        log.contains("no file descriptors left: media sockets cannot be opened, new calls are refused with 503"),
        "{log}"
    );
    // Ending a call gives its descriptors back: the next call has media.
    if let Some(call) = calls.pop() {
        hang_up(&call);
    }
    let (mut again, mut attempt) = (None, 0);
    wait_until(LIMIT, "a call with media after one ended", || {
        attempt += 1;
        again = establish(&pbx, &callee, "0", &format!("fd-again-{attempt}")).ok();
        again.is_some()
    });
    for call in calls.iter().chain(again.iter()) {
        hang_up(call);
    }
}

#[test]
fn silent_call_ends_at_rtp_timeout_with_bye_on_both_legs() {
    let callee = SipClient::new();
    let pbx = Pbx::start(
        callee.addr().port(),
        "media:\n  mode: bypass\n  port_pool: {start: 33000, end: 33999}\n  rtp_timeout: 1\n",
    );
    let call = establish(&pbx, &callee, "0", "silent-1").expect("answered");
    let timed_out = Some("Q.850;cause=102;text=\"RTP timeout\"");
    let bye_b = call.callee.expect_request("BYE");
    assert_eq!(header(&bye_b, "Reason"), timed_out, "{bye_b}");
    call.callee.send(
        &response_to(&bye_b, "200 OK", call.callee.addr(), None),
        call.pbx,
    );
    let bye_a = call.caller.expect_request("BYE");
    assert_eq!(header(&bye_a, "Reason"), timed_out, "{bye_a}");
    call.caller.send(
        &response_to(&bye_a, "200 OK", call.caller.addr(), None),
        call.pbx,
    );
    let records = pbx.wait_cdrs(1);
    assert_eq!(records[0]["end_reason"], "rtp_timeout");
    wait_until(LIMIT, "ports back in the pool", || {
        pbx.http_get("/api/stats").1.contains("\"ports_in_use\":0")
    });
}

/// The PBX ends a call (at rtp_timeout) while the caller's re-INVITE waits
/// at the callee. Requests crossing its BYEs get 481 and reach nobody; the
/// callee's late answer still reaches the caller, without the SDP of media
/// that is gone.
#[test]
fn requests_crossing_the_pbxs_bye_get_481() {
    let callee = SipClient::new();
    let pbx = Pbx::start(
        callee.addr().port(),
        "media:\n  mode: bypass\n  port_pool: {start: 34000, end: 34999}\n  rtp_timeout: 1\n",
    );
    let call = establish(&pbx, &callee, "0", "crossing-1").expect("answered");
    let offer = audio_sdp(call.a.0.local_addr().expect("addr").port(), "0");
    call.caller
        .send(&call.request("INVITE", 2, Some(&offer)), call.pbx);
    let reinvite = call.callee.expect_request("INVITE");
    let bye_a = next(&call.caller, "the BYE at rtp_timeout", |m| {
        m.starts_with("BYE ")
    });
    call.caller.send(
        &response_to(&bye_a, "200 OK", call.caller.addr(), None),
        call.pbx,
    );
    let bye_b = next(call.callee, "the BYE at rtp_timeout", |m| {
        m.starts_with("BYE ")
    });

    let answer = audio_sdp(call.b.0.local_addr().expect("addr").port(), "0");
    call.callee.send(
        &response_to(&reinvite, "200 OK", call.callee.addr(), Some(&answer)),
        call.pbx,
    );
    let ok = next(&call.caller, "the callee's 200", |m| {
        m.starts_with("SIP/2.0 200") && m.contains(" INVITE\r\n")
    });
    assert!(!ok.contains("m=audio"), "no SDP for released media: {ok}");

    call.callee
        .send(&call.callee_request("INFO", 1, None), call.pbx);
    let refused = next(call.callee, "an answer to INFO", |m| {
        m.contains(" INFO\r\n")
    });
    assert_eq!(status_code(&refused), Some(481), "{refused}");
    call.caller
        .send(&call.request("UPDATE", 3, Some(&offer)), call.pbx);
    let refused = next(&call.caller, "an answer to UPDATE", |m| {
        m.contains(" UPDATE\r\n")
    });
    assert_eq!(status_code(&refused), Some(481), "{refused}");

    call.callee.send(
        &response_to(&bye_b, "200 OK", call.callee.addr(), None),
        call.pbx,
    );
    assert_eq!(pbx.wait_cdrs(1)[0]["end_reason"], "rtp_timeout");
    let log = pbx.log();
    assert!(!log.contains("SDP not relayed"), "{log}");
}

/// A relayed re-INVITE's 2xx repeats when its ACK was lost (RFC 3261
/// §13.3.1.4): the PBX sends that ACK again rather than leaving the phone
/// to hang up after 64*T1, whichever side sent the re-INVITE.
#[test]
fn a_repeated_2xx_to_a_relayed_reinvite_gets_its_ack_again() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), &bypass(""));
    let call = establish(&pbx, &callee, "0", "lost-ack-1").expect("answered");
    let a_offer = audio_sdp(call.a.0.local_addr().expect("addr").port(), "0");
    let b_offer = audio_sdp(call.b.0.local_addr().expect("addr").port(), "0");

    call.caller
        .send(&call.request("INVITE", 2, Some(&a_offer)), call.pbx);
    let reinvite = call.callee.expect_request("INVITE");
    let ok = response_to(&reinvite, "200 OK", call.callee.addr(), Some(&b_offer));
    call.callee.send(&ok, call.pbx);
    let ok_at_a = next(&call.caller, "the 200 to the re-INVITE", |m| {
        m.starts_with("SIP/2.0 200") && m.contains(" INVITE\r\n")
    });
    call.caller.send(
        &caller_request("ACK", &ok_at_a, call.caller.addr(), 2, None),
        call.pbx,
    );
    let ack = call.callee.expect_request("ACK");
    call.callee.send(&ok, call.pbx);
    let again = next(call.callee, "the ACK again", |m| m.starts_with("ACK "));
    assert_eq!(again, ack);

    call.callee
        .send(&call.callee_request("INVITE", 1, Some(&b_offer)), call.pbx);
    let reinvite = call.caller.expect_request("INVITE");
    let ok = response_to(&reinvite, "200 OK", call.caller.addr(), Some(&a_offer));
    call.caller.send(&ok, call.pbx);
    next(call.callee, "the 200 to the callee's re-INVITE", |m| {
        m.starts_with("SIP/2.0 200") && m.contains(" INVITE\r\n")
    });
    call.callee
        .send(&call.callee_request("ACK", 1, None), call.pbx);
    let ack = call.caller.expect_request("ACK");
    call.caller.send(&ok, call.pbx);
    let again = next(&call.caller, "the ACK again", |m| m.starts_with("ACK "));
    assert_eq!(again, ack);
    call.exchange(1);
    hang_up(&call);
}

/// The caller puts the call on hold; the callee answers the re-INVITE with
/// a 200 whose SDP the relay cannot use, is acknowledged, and the caller
/// gets 488: the re-INVITE as the callee got it.
fn hold_answered_with_unusable_sdp(call: &Call) -> String {
    let hold = audio_sdp(call.a.0.local_addr().expect("addr").port(), "0")
        .replace("a=sendrecv", "a=sendonly");
    call.caller
        .send(&call.request("INVITE", 2, Some(&hold)), call.pbx);
    let reinvite = call.callee.expect_request("INVITE");
    let unusable = audio_sdp(call.b.0.local_addr().expect("addr").port(), "0")
        .replace("m=audio", "m=audio twenty");
    let ok = response_to(&reinvite, "200 OK", call.callee.addr(), Some(&unusable));
    call.callee.send(&ok, call.pbx);
    call.callee.expect_request("ACK");
    let (code, _) = call.caller.final_response(LIMIT).expect("an answer");
    assert_eq!(code, 488);
    reinvite
}

/// Answers the re-INVITE with which the PBX puts the callee back into the
/// session it relays, after the callee answered with SDP it could not use.
fn answer_restoring_reinvite(call: &Call) {
    let restore = call.callee.expect_request("INVITE");
    let answer = audio_sdp(call.b.0.local_addr().expect("addr").port(), "0 101");
    let ok = response_to(&restore, "200 OK", call.callee.addr(), Some(&answer));
    call.callee.send(&ok, call.pbx);
    call.callee.expect_request("ACK");
}

/// The next message at `client` that `wanted` picks, past retransmissions
/// and provisional responses.
fn next(client: &SipClient, what: &str, wanted: impl Fn(&str) -> bool) -> String {
    client
        .recv_matching(LIMIT, wanted)
        .unwrap_or_else(|| panic!("no {what} within {LIMIT:?}"))
}

/// Two seconds of a PCMU tone as a WAV file (format 7: G.711 mu-law).
fn tone_wav() -> Vec<u8> {
    let samples: Vec<u8> = (0..16_000u32)
        .map(|i| if i % 16 < 8 { 0x10 } else { 0x90 })
        .collect();
    sip_pbx_e2e::wav(7, 8, &samples)
}

#[test]
fn sipp_rtp_stream_is_echoed_back_through_the_relay() {
    sipp_rtp_is_echoed_back("");
}

#[test]
fn sipp_rtp_stream_is_echoed_back_through_the_packet_ring() {
    sipp_rtp_is_echoed_back("  relay_io: packet_ring\n");
}

/// SIPp streams a tone file to a SIPp that echoes it, through a relay
/// configured by `relay_io` (a line of `media`).
fn sipp_rtp_is_echoed_back(relay_io: &str) {
    let uas_port = sip_pbx_e2e::free_port();
    let pbx = Pbx::start(uas_port, &bypass(relay_io));
    let echo_port = sip_pbx_e2e::free_ports(4);
    let uas = sip_pbx_e2e::Sipp::new("uas_answer.xml", uas_port)
        .args(["-m", "1", "-rtp_echo", "-mp", &echo_port.to_string()])
        .spawn(uas_port);
    let uac = sip_pbx_e2e::Sipp::new("uac_rtp.xml", sip_pbx_e2e::free_port())
        .file("tone.wav", &tone_wav())
        .args([
            "-m",
            "1",
            "-s",
            "1002",
            "-mp",
            &sip_pbx_e2e::free_ports(4).to_string(),
        ])
        .arg(pbx.sip_addr().to_string())
        .run();
    sip_pbx_e2e::assert_sipp_ok(&uac, "caller streaming RTP");
    sip_pbx_e2e::assert_sipp_ok(&uas.finish(LIMIT), "callee echoing RTP");
    // 2 s at 50 packets/s out, echoed back: both directions cross the relay.
    wait_until(LIMIT, "relayed packets counted", || {
        pbx.relayed_packets() >= 150.0
    });
}
