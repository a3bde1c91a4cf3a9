//! Parallel forking through the real `sip-pbx`: a user registered from two
//! phones gets the call on both at once; the first to answer wins and the
//! other is cancelled ("call completed elsewhere"), no earlier than it has
//! rung; a phone answering too late is acknowledged and hung up; when every
//! phone refuses, the caller hears the best refusal, and a 6xx from one
//! phone ends the search. A stream one phone's early answer refuses keeps
//! its relay ports for the phone that answers, and the answer a phone gave
//! in a reliable 183 reaches the caller when its 200 carries none. A caller
//! that kept one phone's early SDP is offered the answering phone's session
//! in a re-INVITE.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use sip_pbx_e2e::media::{media_pair, receive, rtp};
use sip_pbx_e2e::phone::Phone;
use sip_pbx_e2e::{
    audio_sdp, caller_request, header, invite, reliable_response_to, response_to, sdp_audio_target,
    sdp_port, wait_until, Pbx, SipClient,
};

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

/// A PBX relaying media through ports `start` to `end`, where calls go to
/// registrations.
fn relaying_pbx(start: u16, end: u16) -> Pbx {
    Pbx::start(
        1,
        &format!(
            "routes: []\n\nmedia:\n  mode: bypass\n  port_pool: {{start: {start}, end: {end}}}\n"
        ),
    )
}

/// The caller's INVITE for 2000 (offering `sdp`, when given), and the
/// INVITE each phone gets.
fn ring(
    pbx: &Pbx,
    caller: &SipClient,
    phones: &[Phone; 2],
    call_id: &str,
    sdp: Option<&str>,
) -> [String; 2] {
    caller.send(
        &invite(pbx.sip_addr(), "2000", caller.addr(), call_id, sdp),
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

/// `phone` answers (with `sdp`, when given): the caller gets the 200 and
/// acknowledges it, and the ACK reaches the phone. Returns the caller's 200.
fn answer(pbx: &Pbx, caller: &SipClient, phone: &Phone, invite: &str, sdp: Option<&str>) -> String {
    let ok = response_to(invite, "200 OK", phone.client.addr(), sdp);
    phone.client.send(&ok, pbx.sip_addr());
    let (code, ok) = caller.final_response(LIMIT).expect("answer");
    assert_eq!(code, 200, "{ok}");
    caller.send(
        &caller_request("ACK", &ok, caller.addr(), 1, None),
        pbx.sip_addr(),
    );
    phone.client.expect_request("ACK");
    ok
}

/// `phone` sends early media (a 183 with `sdp`) for `invite`; returns the
/// 183 the caller gets.
fn early_media(pbx: &Pbx, caller: &SipClient, phone: &Phone, invite: &str, sdp: &str) -> String {
    let progress = response_to(
        invite,
        "183 Session Progress",
        phone.client.addr(),
        Some(sdp),
    );
    phone.client.send(&progress, pbx.sip_addr());
    let (code, progress) = caller.final_response(LIMIT).expect("early media");
    assert_eq!(code, 183, "{progress}");
    progress
}

/// The PBX re-INVITEs the caller, who answers 200 with `sdp` and gets the
/// ACK. Returns the re-INVITE.
fn reinvited(pbx: &Pbx, caller: &SipClient, sdp: &str) -> String {
    let reinvite = caller.expect_request("INVITE");
    caller.send(
        &response_to(&reinvite, "200 OK", caller.addr(), Some(sdp)),
        pbx.sip_addr(),
    );
    caller.expect_request("ACK");
    reinvite
}

/// The PBX cancels `phone`'s `invite`: the phone answers the CANCEL and
/// ends the INVITE with 487. Returns the CANCEL.
fn cancelled(pbx: &Pbx, phone: &Phone, invite: &str) -> String {
    let cancel = next(&phone.client, invite);
    assert_eq!(method(&cancel), "CANCEL", "{cancel}");
    respond(phone, &cancel, "200 OK", pbx.sip_addr());
    respond(phone, invite, "487 Request Terminated", pbx.sip_addr());
    cancel
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
    let invites = ring(&pbx, &caller, &phones, "fork-answer", None);
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

    let ok = answer(&pbx, &caller, &phones[1], &invites[1], None);
    let cancel = cancelled(&pbx, &phones[0], &invites[0]);
    assert_eq!(header(&cancel, "Call-ID"), header(&invites[0], "Call-ID"));
    assert!(
        header(&cancel, "Reason").is_some_and(|r| r.contains("cause=200")),
        "the desk phone is told the call was answered elsewhere: {cancel}"
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
    let invites = ring(&pbx, &caller, &phones, "fork-late", None);
    let ok = answer(&pbx, &caller, &phones[1], &invites[1], None);

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
    let invites = ring(&pbx, &caller, &phones, "fork-busy", None);
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
    let invites = ring(&pbx, &caller, &phones, "fork-decline", None);
    respond(&phones[1], &invites[1], "180 Ringing", pbx.sip_addr());
    respond(&phones[0], &invites[0], "603 Decline", pbx.sip_addr());
    cancelled(&pbx, &phones[1], &invites[1]);
    let (code, ringing) = caller.final_response(LIMIT).expect("ringing");
    assert_eq!(code, 180, "{ringing}");
    let (code, text) = caller.final_response(LIMIT).expect("refusal");
    assert_eq!(code, 603, "{text}");
    wait_until(LIMIT, "no calls left", || pbx.active_calls() == 0);
}

/// Audio and video SDP for RTP ports `audio` and `video` (0: refused).
fn audio_video_sdp(audio: u16, video: u16) -> String {
    audio_sdp(audio, "0") + &format!("m=video {video} RTP/AVP 99\r\na=rtpmap:99 H264/90000\r\n")
}

/// One phone's early answer refuses the caller's video, and the other
/// phone answers with it: the video the call ends up with is relayed, as
/// the stream kept its ports through the early refusal.
#[test]
fn video_refused_in_one_phones_early_answer_is_relayed_for_the_phone_that_answers() {
    let pbx = relaying_pbx(30000, 30499);
    let phones = two_phones(&pbx);
    let caller = SipClient::new();
    let (audio_a, video_a) = (media_pair(), media_pair());
    let (audio_b, video_b) = (media_pair(), media_pair());
    let offer = audio_video_sdp(port(&audio_a), port(&video_a));
    let invites = ring(&pbx, &caller, &phones, "fork-video", Some(&offer));
    let early = audio_video_sdp(port(&audio_b), 0);
    let progress = early_media(&pbx, &caller, &phones[0], &invites[0], &early);
    assert_eq!(sdp_port(&progress, "video"), Some(0), "{progress}");

    let both = audio_video_sdp(port(&audio_b), port(&video_b));
    let ok = answer(&pbx, &caller, &phones[1], &invites[1], Some(&both));
    let to_pbx = sdp_port(&ok, "video")
        .filter(|&p| p != 0)
        .expect("video in the 200");
    let target = SocketAddr::new(pbx.sip_addr().ip(), to_pbx);
    video_a.0.send_to(&rtp(1, 0xA0), target).expect("send");
    let (got, _) = receive(&video_b.0).expect("the caller's video at the answering phone");
    assert_eq!(got, rtp(1, 0xA0));
    // The caller kept the 183's answer, video refused (RFC 3261 §13.2.1):
    // the PBX offers it the session with video again.
    let reinvite = reinvited(&pbx, &caller, &offer);
    assert_eq!(sdp_port(&reinvite, "video"), Some(to_pbx), "{reinvite}");

    cancelled(&pbx, &phones[0], &invites[0]);
    hang_up(&pbx, &caller, &ok, &phones[1]);
}

/// A phone that answers in a reliable 183 (RFC 3262) need not repeat the
/// answer in its 200. When another phone rang first, the PBX acknowledged
/// that 183 itself instead of relaying it, so the caller gets its answer
/// with the 200, and the media flows between the caller and that phone.
#[test]
fn a_phone_whose_200_has_no_sdp_is_relayed_the_answer_of_its_reliable_183() {
    let pbx = relaying_pbx(30500, 30999);
    let phones = two_phones(&pbx);
    let caller = SipClient::new();
    let (a, b) = (media_pair(), media_pair());
    let offer = audio_sdp(port(&a), "0");
    let invites = ring(&pbx, &caller, &phones, "fork-early-answer", Some(&offer));
    answer_early_after_another_rang(&pbx, &caller, &phones, &invites, &audio_sdp(port(&b), "0"));

    let ok = answer(&pbx, &caller, &phones[1], &invites[1], None);
    let to_pbx_from_a = sdp_audio_target(&ok).expect("the phone's answer in the 200");
    let to_pbx_from_b = sdp_audio_target(&invites[1]).expect("the PBX's offer");
    for (from, to_pbx, to, marker) in [(&a, to_pbx_from_a, &b, 0xA0), (&b, to_pbx_from_b, &a, 0xB0)]
    {
        from.0.send_to(&rtp(1, marker), to_pbx).expect("send");
        let (got, _) = receive(&to.0).expect("RTP across the call");
        assert_eq!(got, rtp(1, marker));
    }

    cancelled(&pbx, &phones[0], &invites[0]);
    hang_up(&pbx, &caller, &ok, &phones[1]);
}

/// The same, when the SDP of that reliable 183 is unusable (unparsable):
/// the call fails with 502 as for an unusable answer in a 200, and the
/// phone that answered is hung up with the reason.
#[test]
fn a_phone_whose_reliable_183_held_unusable_sdp_fails_the_call_with_502() {
    let pbx = relaying_pbx(30500, 30999);
    let phones = two_phones(&pbx);
    let caller = SipClient::new();
    let offer = audio_sdp(port(&media_pair()), "0");
    let invites = ring(&pbx, &caller, &phones, "fork-bad-early", Some(&offer));
    let unusable = audio_sdp(port(&media_pair()), "0").replace("m=audio", "m=audio twenty");
    answer_early_after_another_rang(&pbx, &caller, &phones, &invites, &unusable);

    let ok = response_to(&invites[1], "200 OK", phones[1].client.addr(), None);
    phones[1].client.send(&ok, pbx.sip_addr());
    let (code, refusal) = caller.final_response(LIMIT).expect("the caller's answer");
    assert_eq!(code, 502, "{refusal}");
    phones[1].client.expect_request("ACK");
    let bye = phones[1].client.expect_request("BYE");
    assert!(
        header(&bye, "Reason").is_some_and(|r| r.starts_with("SIP;cause=488")),
        "{bye}"
    );
    respond(&phones[1], &bye, "200 OK", pbx.sip_addr());
    cancelled(&pbx, &phones[0], &invites[0]);
    wait_until(LIMIT, "no calls left", || pbx.active_calls() == 0);
}

/// Phone 0 rings first (180), so it speaks for the B leg; phone 1 then
/// answers the caller's offer with `early` in a reliable 183, which the
/// PBX acknowledges itself.
fn answer_early_after_another_rang(
    pbx: &Pbx,
    caller: &SipClient,
    phones: &[Phone; 2],
    invites: &[String; 2],
    early: &str,
) {
    respond(&phones[0], &invites[0], "180 Ringing", pbx.sip_addr());
    let (code, ringing) = caller.final_response(LIMIT).expect("ringing");
    assert_eq!(code, 180, "{ringing}");
    let progress = reliable_response_to(
        &invites[1],
        "183 Session Progress",
        phones[1].client.addr(),
        Some(early),
    );
    phones[1].client.send(&progress, pbx.sip_addr());
    let prack = next(&phones[1].client, &invites[1]);
    assert_eq!(method(&prack), "PRACK", "{prack}");
    respond(&phones[1], &prack, "200 OK", pbx.sip_addr());
}

/// A phone's SDP: its own o= session `user`/`session`, audio on `port`.
fn phone_sdp(user: &str, session: u32, port: u16, codecs: &str) -> String {
    audio_sdp(port, codecs).replace("o=ua 1 1 ", &format!("o={user} {session} 1 "))
}

/// Phone 1 sends early SDP (a 183 with `early`), then phone 2 answers
/// with `answer`. The caller keeps the first SDP it got as the answer
/// (RFC 3261 §13.2.1), so once it has acknowledged the 200, the PBX sends
/// it a re-INVITE, which the caller answers. Returns the caller's 183, its
/// 200 and the re-INVITE.
fn another_phone_answers_after_early_sdp(
    pbx: &Pbx,
    call_id: &str,
    early: &str,
    answer_sdp: &str,
) -> [String; 3] {
    let phones = two_phones(pbx);
    let caller = SipClient::new();
    let offer = audio_sdp(4000, "0 8");
    let invites = ring(pbx, &caller, &phones, call_id, Some(&offer));
    let progress = early_media(pbx, &caller, &phones[0], &invites[0], early);
    let ok = answer(pbx, &caller, &phones[1], &invites[1], Some(answer_sdp));
    let reinvite = reinvited(pbx, &caller, &offer);
    cancelled(pbx, &phones[0], &invites[0]);
    // The answering phone hears of none of it: its next request is the BYE.
    hang_up(pbx, &caller, &ok, &phones[1]);
    [progress, ok, reinvite]
}

/// Media end to end: the re-INVITE offers the answering phone's session,
/// as a new version of the session the caller has (the early phone's).
#[test]
fn a_caller_holding_early_sdp_of_a_phone_that_did_not_answer_is_offered_the_answering_ones() {
    let pbx = pbx();
    let early = phone_sdp("desk", 7, 5000, "0");
    let answering = phone_sdp("mobile", 9, 6000, "8");
    let [_, _, reinvite] =
        another_phone_answers_after_early_sdp(&pbx, "fork-reoffer", &early, &answering);
    assert_eq!(sdp_port(&reinvite, "audio"), Some(6000), "{reinvite}");
    assert!(
        reinvite.contains("m=audio 6000 RTP/AVP 8\r\n"),
        "{reinvite}"
    );
    assert!(reinvite.contains("o=desk 7 2 IN IP4 "), "{reinvite}");
}

/// Through the relay the caller's port stays, but the codec is the
/// answering phone's.
#[test]
fn through_the_relay_a_caller_holding_early_sdp_is_offered_the_answering_phones_codec() {
    let pbx = relaying_pbx(37000, 37499);
    let early = phone_sdp("desk", 7, 5000, "0");
    let answering = phone_sdp("mobile", 9, 6000, "8");
    let [progress, ok, reinvite] =
        another_phone_answers_after_early_sdp(&pbx, "fork-reoffer-relay", &early, &answering);
    let relay_port = sdp_port(&progress, "audio").expect("relay port");
    assert_eq!(sdp_port(&ok, "audio"), Some(relay_port), "{ok}");
    assert_eq!(sdp_port(&reinvite, "audio"), Some(relay_port), "{reinvite}");
    assert!(
        reinvite.contains(&format!("m=audio {relay_port} RTP/AVP 8\r\n")),
        "{reinvite}"
    );
}

/// Through the relay, two phones answering with the same codec give the
/// caller the same session: its early SDP stands, and no re-INVITE comes
/// (the caller's next message is the answer to its BYE).
#[test]
fn through_the_relay_early_sdp_that_says_the_same_brings_no_reinvite() {
    let pbx = relaying_pbx(37500, 37999);
    let phones = two_phones(&pbx);
    let caller = SipClient::new();
    let invites = ring(
        &pbx,
        &caller,
        &phones,
        "fork-same",
        Some(&audio_sdp(4000, "0 8")),
    );
    let early = phone_sdp("desk", 7, 5000, "0");
    let progress = early_media(&pbx, &caller, &phones[0], &invites[0], &early);
    let ok = answer(
        &pbx,
        &caller,
        &phones[1],
        &invites[1],
        Some(&phone_sdp("mobile", 9, 6000, "0")),
    );
    assert_eq!(sdp_port(&ok, "audio"), sdp_port(&progress, "audio"));
    cancelled(&pbx, &phones[0], &invites[0]);
    hang_up(&pbx, &caller, &ok, &phones[1]);
}

fn port(pair: &(UdpSocket, UdpSocket)) -> u16 {
    pair.0.local_addr().expect("addr").port()
}
