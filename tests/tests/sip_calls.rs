//! Calls through the real `sip-pbx` between SIPp caller and callee
//! scenarios (tests/sipp/), over UDP and TCP.

use std::time::Duration;

use sip_pbx_e2e::{
    assert_sipp_ok, callee_request, caller_request, free_port, header, invite, response_to,
    status_code, wait_until, Pbx, SipClient, Sipp,
};

const CALL_LIMIT: Duration = Duration::from_secs(30);

/// One call from `caller` through the PBX to `callee`; both must pass and
/// the PBX must hold no call afterwards.
fn call_through(caller: &str, callee: &str, extra: &str) -> Pbx {
    let uas_port = free_port();
    let pbx = Pbx::start(uas_port, extra);
    let uas = Sipp::new(callee, uas_port)
        .args(["-m", "1"])
        .spawn(uas_port);
    let uac = Sipp::new(caller, free_port())
        .args(["-m", "1", "-s", "1002"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&uac, "caller");
    assert_sipp_ok(&uas.finish(CALL_LIMIT), "callee");
    assert_no_calls_left(&pbx);
    pbx
}

fn assert_no_calls_left(pbx: &Pbx) {
    wait_until(Duration::from_secs(10), "active calls back to 0", || {
        pbx.active_calls() == 0
    });
}

#[test]
fn basic_call_over_udp() {
    call_through("uac_basic.xml", "uas_answer.xml", "");
}

#[test]
fn basic_call_over_tcp() {
    let uas_port = free_port();
    let pbx = Pbx::start(
        uas_port,
        &format!("routes:\n  - match: \"^(.+)$\"\n    target: \"sip:$1@127.0.0.1:{uas_port};transport=tcp\"\n"),
    );
    let uas = Sipp::new("uas_answer.xml", uas_port)
        .args(["-m", "1", "-t", "t1"])
        .spawn_tcp(uas_port);
    let uac = Sipp::new("uac_basic.xml", free_port())
        .args(["-m", "1", "-s", "1002", "-t", "t1"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&uac, "caller over TCP");
    assert_sipp_ok(&uas.finish(CALL_LIMIT), "callee over TCP");
    assert_no_calls_left(&pbx);
}

#[test]
fn callee_hangs_up() {
    call_through("uac_callee_hangs_up.xml", "uas_hangs_up.xml", "");
}

#[test]
fn caller_cancels_while_ringing() {
    call_through("uac_cancel.xml", "uas_cancelled.xml", "");
}

#[test]
fn busy_is_relayed() {
    call_through("uac_expect_486.xml", "uas_busy.xml", "");
}

#[test]
fn early_media_183_then_200() {
    call_through("uac_early_media.xml", "uas_early_media.xml", "");
}

#[test]
fn reliable_provisional_and_prack_end_to_end() {
    call_through("uac_prack.xml", "uas_prack.xml", "");
}

#[test]
fn update_before_and_after_answer() {
    call_through("uac_update.xml", "uas_update.xml", "");
}

#[test]
fn reinvite_is_relayed() {
    call_through("uac_reinvite.xml", "uas_reinvite.xml", "");
}

#[test]
fn info_is_relayed_with_its_body() {
    call_through("uac_info.xml", "uas_info.xml", "");
}

#[test]
fn callee_that_never_answers_gets_cancelled_and_caller_480() {
    call_through(
        "uac_expect_480.xml",
        "uas_cancelled.xml",
        "sip:\n  listen_ip: 127.0.0.1\n  listen_port: SIP_PORT\n  advertised_ip: 127.0.0.1\n  ring_timeout: 2\n",
    );
}

#[test]
fn repeated_200_from_callee_is_acknowledged_again() {
    let callee = SipClient::new();
    let me = callee.addr();
    let pbx = Pbx::start(me.port(), "");
    let caller = raw_invite(&pbx, "repeated-200");
    let invite = callee.expect_request("INVITE");
    let ok = response_to(&invite, "200 OK", me, None);
    callee.send(&ok, pbx.sip_addr());
    let (code, ok_at_caller) = caller.final_response(CALL_LIMIT).expect("200");
    assert_eq!(code, 200, "{ok_at_caller}");
    caller.send(
        &caller_request("ACK", &ok_at_caller, caller.addr(), 1, None),
        pbx.sip_addr(),
    );
    let first_ack = callee.expect_request("ACK");
    // As if the ACK had been lost: the callee repeats its 200.
    callee.send(&ok, pbx.sip_addr());
    let second_ack = callee.expect_request("ACK");
    assert_eq!(
        header(&first_ack, "CSeq"),
        header(&second_ack, "CSeq"),
        "the same ACK again"
    );
    caller.send(
        &caller_request("BYE", &ok_at_caller, caller.addr(), 2, None),
        pbx.sip_addr(),
    );
    let bye = callee.expect_request("BYE");
    callee.send(&response_to(&bye, "200 OK", me, None), pbx.sip_addr());
    let (code, _) = caller.final_response(CALL_LIMIT).expect("BYE answered");
    assert_eq!(code, 200);
    assert_no_calls_left(&pbx);
}

#[test]
fn options_to_the_pbx() {
    let pbx = Pbx::start(free_port(), "");
    let run = Sipp::new("options.xml", free_port())
        .args(["-m", "1"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&run, "OPTIONS");
}

#[test]
fn unknown_method_gets_501() {
    let pbx = Pbx::start(free_port(), "");
    let run = Sipp::new("unknown_method.xml", free_port())
        .args(["-m", "1"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&run, "unknown method");
}

/// An INVITE for 1002 from a new raw client; returns the client.
fn raw_invite(pbx: &Pbx, call_id: &str) -> SipClient {
    let client = SipClient::new();
    client.send(
        &invite(pbx.sip_addr(), "1002", client.addr(), call_id, None),
        pbx.sip_addr(),
    );
    client
}

/// A raw caller's call to 1002 that the raw `callee` has answered 180:
/// the caller, the INVITE at the callee and the 180 at the caller.
fn ringing(pbx: &Pbx, callee: &SipClient, call_id: &str) -> (SipClient, String, String) {
    let caller = raw_invite(pbx, call_id);
    let invite = callee.expect_request("INVITE");
    callee.send(
        &response_to(&invite, "180 Ringing", callee.addr(), None),
        pbx.sip_addr(),
    );
    let (code, ringing) = caller.final_response(CALL_LIMIT).expect("180");
    assert_eq!(code, 180, "{ringing}");
    (caller, invite, ringing)
}

#[test]
fn a_bye_while_ringing_ends_the_invite_with_487_and_cancels_the_callee() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), "");
    let (caller, invite, ringing) = ringing(&pbx, &callee, "early-bye");
    caller.send(
        &caller_request("BYE", &ringing, caller.addr(), 2, None),
        pbx.sip_addr(),
    );
    let mut answers: Vec<String> = (0..2)
        .map(|_| caller.final_response(CALL_LIMIT).expect("answers").1)
        .map(|text| {
            format!(
                "{} {}",
                status_code(&text).unwrap_or(0),
                header(&text, "CSeq").unwrap_or_default()
            )
        })
        .collect();
    answers.sort();
    assert_eq!(answers, ["200 2 BYE", "487 1 INVITE"]);
    let cancel = callee.expect_request("CANCEL");
    callee.send(
        &response_to(&cancel, "200 OK", callee.addr(), None),
        pbx.sip_addr(),
    );
    callee.send(
        &response_to(&invite, "487 Request Terminated", callee.addr(), None),
        pbx.sip_addr(),
    );
    callee.expect_request("ACK");
    assert_no_calls_left(&pbx);
}

/// Why a call ended goes on with the BYE or CANCEL to the other leg (RFC
/// 3326): a gateway's Q.850 cause reaches the phone or carrier on the far
/// side.
#[test]
fn the_reason_of_a_bye_or_a_cancel_reaches_the_other_leg() {
    let callee = SipClient::new();
    let pbx = Pbx::start(callee.addr().port(), "");
    let why = "Q.850;cause=16;text=\"Normal call clearing\"";

    let caller = raw_invite(&pbx, "reason-bye");
    let invite_at_b = callee.expect_request("INVITE");
    callee.send(
        &response_to(&invite_at_b, "200 OK", callee.addr(), None),
        pbx.sip_addr(),
    );
    let (code, ok) = caller.final_response(CALL_LIMIT).expect("200");
    assert_eq!(code, 200, "{ok}");
    caller.send(
        &caller_request("ACK", &ok, caller.addr(), 1, None),
        pbx.sip_addr(),
    );
    callee.expect_request("ACK");
    let bye = String::from_utf8_lossy(&callee_request("BYE", &invite_at_b, callee.addr(), 1, None))
        .replace("Contact:", &format!("Reason: {why}\r\nContact:"));
    callee.send(bye.as_bytes(), pbx.sip_addr());
    let bye_at_caller = caller.expect_request("BYE");
    assert_eq!(header(&bye_at_caller, "Reason"), Some(why));
    caller.send(
        &response_to(&bye_at_caller, "200 OK", caller.addr(), None),
        pbx.sip_addr(),
    );
    let (code, bye_ok) = callee.final_response(CALL_LIMIT).expect("BYE answered");
    assert_eq!(code, 200, "{bye_ok}");

    let (caller, invite_at_b, _) = ringing(&pbx, &callee, "reason-cancel");
    // The caller's INVITE again, to CANCEL: the same call, the same bytes.
    let sent = invite(pbx.sip_addr(), "1002", caller.addr(), "reason-cancel", None);
    let cancel = String::from_utf8_lossy(&sent)
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replacen("CSeq: 1 INVITE", "CSeq: 1 CANCEL", 1)
        .replacen("Contact:", &format!("Reason: {why}\r\nContact:"), 1);
    caller.send(cancel.as_bytes(), pbx.sip_addr());
    let cancel_at_callee = callee.expect_request("CANCEL");
    assert_eq!(header(&cancel_at_callee, "Reason"), Some(why));
    callee.send(
        &response_to(&cancel_at_callee, "200 OK", callee.addr(), None),
        pbx.sip_addr(),
    );
    callee.send(
        &response_to(&invite_at_b, "487 Request Terminated", callee.addr(), None),
        pbx.sip_addr(),
    );
    assert_no_calls_left(&pbx);
}

#[test]
fn over_max_concurrent_calls_gets_503_with_retry_after() {
    let uas_port = free_port();
    let pbx = Pbx::start(
        uas_port,
        "sip:\n  listen_ip: 127.0.0.1\n  listen_port: SIP_PORT\n  advertised_ip: 127.0.0.1\n  max_concurrent_calls: 1\n  ring_timeout: 5\n",
    );
    let uas = Sipp::new("uas_cancelled.xml", uas_port)
        .args(["-m", "1"])
        .spawn(uas_port);
    let first = raw_invite(&pbx, "first-call");
    let ringing = first.final_response(Duration::from_secs(5)).expect("180");
    assert_eq!(status_code(&ringing.1), Some(180), "{}", ringing.1);

    let client = raw_invite(&pbx, "second-call");
    let (code, text) = client
        .final_response(Duration::from_secs(5))
        .expect("a final response");
    assert_eq!(code, 503, "{text}");
    assert!(header(&text, "Retry-After").is_some(), "{text}");

    // The first call still rings until the ring timeout ends it.
    let (code, _) = first.final_response(Duration::from_secs(10)).expect("480");
    assert_eq!(code, 480);
    assert_sipp_ok(&uas.finish(CALL_LIMIT), "callee");
    assert_no_calls_left(&pbx);
}

#[test]
fn load_5000_calls_at_200_per_second() {
    let uas_port = free_port();
    let pbx = Pbx::start(
        uas_port,
        "logging:\n  level: WARN\n  format: text\n  output: stdout\n",
    );
    let uas = Sipp::new("uas_answer.xml", uas_port)
        .args(["-m", "5000"])
        .spawn(uas_port);
    let uac = Sipp::new("uac_basic.xml", free_port())
        .args(["-m", "5000", "-r", "200", "-l", "1000", "-s", "1002"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&uac, "5000 callers");
    assert_sipp_ok(&uas.finish(Duration::from_secs(60)), "5000 callees");
    assert_no_calls_left(&pbx);
}
