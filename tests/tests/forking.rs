//! Parallel forking through the real `sip-pbx`: a user registered from two
//! phones gets the call on both at once; the first to answer wins and the
//! other is cancelled ("call completed elsewhere"), no earlier than it has
//! rung; a phone answering too late is acknowledged and hung up; when every
//! phone refuses, the caller hears the best refusal, and a 6xx from one
//! phone ends the search.

use std::net::SocketAddr;
use std::time::Duration;

use sip_pbx_e2e::phone::Phone;
use sip_pbx_e2e::{caller_request, header, invite, response_to, wait_until, Pbx, SipClient};

const LIMIT: Duration = Duration::from_secs(10);

/// A PBX where nothing is routed statically: calls go to registrations.
fn pbx() -> Pbx {
    Pbx::start(1, "routes: []\n")
}

/// Two phones registered as user 2000.
fn two_phones(pbx: &Pbx) -> [Phone; 2] {
    ["desk", "mobile"].map(|tag| {
        let mut phone = Phone::new("2000", pbx.sip_addr());
        let contact = phone.contact(tag);
        let (code, text) = phone.register(&[format!("Contact: {contact}"), "Expires: 300".into()]);
        assert_eq!(code, 200, "{text}");
        phone
    })
}

/// The next message `client` gets that is not a retransmission of an
/// INVITE it has already seen (the PBX resends until it hears a response).
fn next(client: &SipClient, seen_invite: &str) -> String {
    loop {
        let text = client
            .recv(LIMIT)
            .unwrap_or_else(|| panic!("nothing arrived at {}", client.addr()));
        if text != seen_invite {
            return text;
        }
    }
}

fn method(text: &str) -> &str {
    text.split(' ').next().unwrap_or_default()
}

/// The caller's INVITE for 2000, and the INVITE each phone gets.
fn ring(pbx: &Pbx, caller: &SipClient, phones: &[Phone; 2], call_id: &str) -> [String; 2] {
    caller.send(
        &invite(pbx.sip_addr(), "2000", caller.addr(), call_id, None),
        pbx.sip_addr(),
    );
    phones
        .each_ref()
        .map(|phone| phone.client.expect_request("INVITE"))
}

fn respond(phone: &Phone, request: &str, status: &str, to: SocketAddr) {
    phone
        .client
        .send(&response_to(request, status, phone.client.addr(), None), to);
}

/// `phone` answers: the caller gets the 200 and acknowledges it, and the
/// ACK reaches the phone. Returns the caller's 200.
fn answer(pbx: &Pbx, caller: &SipClient, phone: &Phone, invite: &str) -> String {
    respond(phone, invite, "200 OK", pbx.sip_addr());
    let (code, ok) = caller.final_response(LIMIT).expect("answer");
    assert_eq!(code, 200, "{ok}");
    caller.send(
        &caller_request("ACK", &ok, caller.addr(), 1, None),
        pbx.sip_addr(),
    );
    phone.client.expect_request("ACK");
    ok
}

/// The caller hangs up the call `ok` answered by `phone`; no call is left.
fn hang_up(pbx: &Pbx, caller: &SipClient, ok: &str, phone: &Phone) {
    caller.send(
        &caller_request("BYE", ok, caller.addr(), 2, None),
        pbx.sip_addr(),
    );
    let bye = phone.client.expect_request("BYE");
    respond(phone, &bye, "200 OK", pbx.sip_addr());
    let (code, _) = caller.final_response(LIMIT).expect("BYE answered");
    assert_eq!(code, 200);
    wait_until(LIMIT, "no calls left", || pbx.active_calls() == 0);
}

#[test]
fn every_phone_rings_and_the_first_to_answer_takes_the_call() {
    let pbx = pbx();
    let phones = two_phones(&pbx);
    let caller = SipClient::new();
    let invites = ring(&pbx, &caller, &phones, "fork-answer");
    assert_ne!(
        header(&invites[0], "Call-ID"),
        header(&invites[1], "Call-ID"),
        "each phone has its own dialog"
    );
    for (phone, invite) in phones.iter().zip(&invites) {
        assert!(invite.starts_with("INVITE sip:2000-"), "{invite}");
        respond(phone, invite, "180 Ringing", pbx.sip_addr());
    }
    let (code, ringing) = caller.final_response(LIMIT).expect("ringing");
    assert_eq!(code, 180, "{ringing}");

    let ok = answer(&pbx, &caller, &phones[1], &invites[1]);
    let cancel = next(&phones[0].client, &invites[0]);
    assert_eq!(method(&cancel), "CANCEL", "{cancel}");
    assert_eq!(header(&cancel, "Call-ID"), header(&invites[0], "Call-ID"));
    assert!(
        header(&cancel, "Reason").is_some_and(|r| r.contains("cause=200")),
        "the desk phone is told the call was answered elsewhere: {cancel}"
    );
    respond(&phones[0], &cancel, "200 OK", pbx.sip_addr());
    respond(
        &phones[0],
        &invites[0],
        "487 Request Terminated",
        pbx.sip_addr(),
    );
    let ack = next(&phones[0].client, &invites[0]);
    assert_eq!(method(&ack), "ACK", "the 487 is acknowledged: {ack}");

    hang_up(&pbx, &caller, &ok, &phones[1]);
    let cdrs = pbx.wait_cdrs(1);
    assert_eq!(cdrs.len(), 1, "one call, one record: {cdrs:?}");
    assert_eq!(cdrs[0]["disposition"], "answered", "{cdrs:?}");
}

#[test]
fn a_silent_phone_is_cancelled_once_it_rings_and_a_late_answer_is_hung_up() {
    let pbx = pbx();
    let phones = two_phones(&pbx);
    let caller = SipClient::new();
    let invites = ring(&pbx, &caller, &phones, "fork-late");
    let ok = answer(&pbx, &caller, &phones[1], &invites[1]);

    // RFC 3261 §9.1: no CANCEL for a branch that has not answered at all.
    while let Some(text) = phones[0].client.recv(Duration::from_millis(300)) {
        assert_eq!(text, invites[0], "only INVITE retransmissions before a 1xx");
    }
    respond(&phones[0], &invites[0], "180 Ringing", pbx.sip_addr());
    let cancel = next(&phones[0].client, &invites[0]);
    assert_eq!(method(&cancel), "CANCEL", "{cancel}");

    // The desk phone answers anyway, crossing the CANCEL.
    respond(&phones[0], &cancel, "200 OK", pbx.sip_addr());
    respond(&phones[0], &invites[0], "200 OK", pbx.sip_addr());
    let ack = next(&phones[0].client, &invites[0]);
    assert_eq!(method(&ack), "ACK", "{ack}");
    let bye = phones[0].client.expect_request("BYE");
    assert_eq!(header(&bye, "Call-ID"), header(&invites[0], "Call-ID"));
    respond(&phones[0], &bye, "200 OK", pbx.sip_addr());

    assert_eq!(pbx.active_calls(), 1, "the answered call goes on");
    hang_up(&pbx, &caller, &ok, &phones[1]);
}

#[test]
fn when_every_phone_refuses_the_caller_hears_the_best_refusal() {
    let pbx = pbx();
    let phones = two_phones(&pbx);
    let caller = SipClient::new();
    let invites = ring(&pbx, &caller, &phones, "fork-busy");
    respond(
        &phones[0],
        &invites[0],
        "503 Service Unavailable",
        pbx.sip_addr(),
    );
    assert_eq!(method(&next(&phones[0].client, &invites[0])), "ACK");
    respond(&phones[1], &invites[1], "486 Busy Here", pbx.sip_addr());
    assert_eq!(method(&next(&phones[1].client, &invites[1])), "ACK");
    let (code, text) = caller.final_response(LIMIT).expect("refusal");
    assert_eq!(code, 486, "a 4xx beats a 5xx: {text}");
    let cdrs = pbx.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "busy", "{cdrs:?}");
}

#[test]
fn a_decline_from_one_phone_stops_the_others_ringing() {
    let pbx = pbx();
    let phones = two_phones(&pbx);
    let caller = SipClient::new();
    let invites = ring(&pbx, &caller, &phones, "fork-decline");
    respond(&phones[1], &invites[1], "180 Ringing", pbx.sip_addr());
    respond(&phones[0], &invites[0], "603 Decline", pbx.sip_addr());
    let cancel = next(&phones[1].client, &invites[1]);
    assert_eq!(method(&cancel), "CANCEL", "{cancel}");
    respond(&phones[1], &cancel, "200 OK", pbx.sip_addr());
    respond(
        &phones[1],
        &invites[1],
        "487 Request Terminated",
        pbx.sip_addr(),
    );
    let (code, ringing) = caller.final_response(LIMIT).expect("ringing");
    assert_eq!(code, 180, "{ringing}");
    let (code, text) = caller.final_response(LIMIT).expect("refusal");
    assert_eq!(code, 603, "{text}");
    wait_until(LIMIT, "no calls left", || pbx.active_calls() == 0);
}
