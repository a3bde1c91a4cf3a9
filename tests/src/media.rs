//! Calls with media through a PBX started with `media.mode: bypass`: a raw
//! caller and a raw callee, each with an RTP/RTCP socket pair.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use crate::{
    audio_sdp, callee_request, caller_request, invite, response_to, sdp_audio_target, status_code,
    wait_until, Pbx, SipClient,
};

const LIMIT: Duration = Duration::from_secs(10);

/// An RTP packet (PCMU, 20 ms): sequence number `seq`, its 160 payload
/// bytes all `marker`, so that the receiver can tell whose packet it got.
pub fn rtp(seq: u16, marker: u8) -> Vec<u8> {
    let mut packet = vec![0x80, 0x00];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 160, 0x11, 0x22, 0x33, 0x44]);
    packet.extend(std::iter::repeat_n(marker, 160));
    packet
}

/// The next datagram on `socket` and where it came from, or None once
/// its read timeout has passed.
pub fn receive(socket: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    let (len, from) = socket.recv_from(&mut buf).ok()?;
    Some((buf[..len].to_vec(), from))
}

/// An RTP/RTCP socket pair on consecutive ports.
pub fn media_pair() -> (UdpSocket, UdpSocket) {
    loop {
        let rtp = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = rtp.local_addr().expect("addr").port();
        if port.is_multiple_of(2) {
            if let Ok(rtcp) = UdpSocket::bind(("127.0.0.1", port + 1)) {
                for s in [&rtp, &rtcp] {
                    s.set_read_timeout(Some(Duration::from_secs(2)))
                        .expect("timeout");
                }
                return (rtp, rtcp);
            }
        }
    }
}

/// An established call between a raw caller and a raw callee.
pub struct Call<'a> {
    pub caller: SipClient,
    pub callee: &'a SipClient,
    pub a: (UdpSocket, UdpSocket),
    pub b: (UdpSocket, UdpSocket),
    /// Where the caller's media goes (the PBX's A-leg port).
    pub to_pbx_from_a: SocketAddr,
    /// Where the callee's media goes (the PBX's B-leg port).
    pub to_pbx_from_b: SocketAddr,
    pub invite_at_b: String,
    pub ok_at_a: String,
    pub pbx: SocketAddr,
}

impl Call<'_> {
    /// An in-dialog request from the caller, built from the 200 it received.
    pub fn request(&self, method: &str, cseq: u32, sdp: Option<&str>) -> Vec<u8> {
        caller_request(method, &self.ok_at_a, self.caller.addr(), cseq, sdp)
    }

    /// One RTP packet each way through the call's relay: each arrives with
    /// its payload intact, from the PBX's port of the other leg.
    pub fn exchange(&self, seq: u16) {
        let legs = [
            (
                &self.a,
                self.to_pbx_from_a,
                &self.b,
                self.to_pbx_from_b,
                0xA0,
            ),
            (
                &self.b,
                self.to_pbx_from_b,
                &self.a,
                self.to_pbx_from_a,
                0xB0,
            ),
        ];
        for (from, to, at, relayed_from, marker) in legs {
            from.0.send_to(&rtp(seq, marker), to).expect("send");
            let (got, source) = receive(&at.0).expect("RTP through the relay");
            assert_eq!(got, rtp(seq, marker), "payload intact");
            assert_eq!(source, relayed_from, "from the PBX's port of that leg");
        }
    }

    /// A re-INVITE of the caller's (CSeq `cseq`) offering `offer`, which
    /// the callee answers 200 with `answer`, and its ACK: the re-INVITE as
    /// the callee got it and the 200 as the caller got it.
    pub fn reinvite(&self, cseq: u32, offer: &str, answer: &str) -> (String, String) {
        self.caller
            .send(&self.request("INVITE", cseq, Some(offer)), self.pbx);
        let reinvite = self.callee.expect_request("INVITE");
        let ok = response_to(&reinvite, "200 OK", self.callee.addr(), Some(answer));
        self.callee.send(&ok, self.pbx);
        let (code, ok_at_a) = self.caller.final_response(LIMIT).expect("200 to re-INVITE");
        assert_eq!(code, 200, "{ok_at_a}");
        self.caller.send(&self.request("ACK", cseq, None), self.pbx);
        self.callee.expect_request("ACK");
        (reinvite, ok_at_a)
    }

    /// An in-dialog request from the callee, built from the INVITE it
    /// answered.
    pub fn callee_request(&self, method: &str, cseq: u32, sdp: Option<&str>) -> Vec<u8> {
        callee_request(method, &self.invite_at_b, self.callee.addr(), cseq, sdp)
    }
}

/// Calls `1002` from a new raw caller offering `codecs`, answers at the
/// raw `callee`, and acknowledges: the call, or the code that refused it.
pub fn establish<'a>(
    pbx: &Pbx,
    callee: &'a SipClient,
    codecs: &str,
    call_id: &str,
) -> Result<Call<'a>, u16> {
    establish_with(pbx, callee, codecs, call_id, |message| message)
}

/// As [`establish`], with the two messages that carry SDP (the caller's
/// INVITE and the callee's 200) passed through `wrap` before they are
/// sent, to carry the SDP in another kind of body.
pub fn establish_with<'a>(
    pbx: &Pbx,
    callee: &'a SipClient,
    codecs: &str,
    call_id: &str,
    wrap: impl Fn(Vec<u8>) -> Vec<u8>,
) -> Result<Call<'a>, u16> {
    let caller = SipClient::new();
    let a = media_pair();
    let b = media_pair();
    let a_port = a.0.local_addr().expect("addr").port();
    let b_port = b.0.local_addr().expect("addr").port();
    let offer = audio_sdp(a_port, codecs);
    caller.send(
        &wrap(invite(
            pbx.sip_addr(),
            "1002",
            caller.addr(),
            call_id,
            Some(&offer),
        )),
        pbx.sip_addr(),
    );
    // Either the callee is offered the call or the caller is refused.
    let mut invite_at_b = None;
    wait_until(LIMIT, "the INVITE to reach the callee or a refusal", || {
        if let Some(text) = callee.recv(Duration::from_millis(20)) {
            invite_at_b = Some(text);
            return true;
        }
        caller.recv(Duration::from_millis(20)).is_some_and(|text| {
            let code = status_code(&text).unwrap_or(100);
            if code >= 200 {
                invite_at_b = Some(text);
            }
            code >= 200
        })
    });
    let invite_at_b = invite_at_b.expect("INVITE or refusal");
    if let Some(code) = status_code(&invite_at_b) {
        return Err(code);
    }
    let to_pbx_from_b = sdp_audio_target(&invite_at_b)
        .unwrap_or_else(|| panic!("no SDP in the callee's INVITE:\n{invite_at_b}"));
    let ok_at_a = answer_with(pbx, callee, &caller, &invite_at_b, b_port, wrap);
    let to_pbx_from_a = sdp_audio_target(&ok_at_a).expect("SDP in the 200");
    let call = Call {
        caller,
        callee,
        a,
        b,
        to_pbx_from_a,
        to_pbx_from_b,
        invite_at_b,
        ok_at_a,
        pbx: pbx.sip_addr(),
    };
    call.caller.send(&call.request("ACK", 1, None), call.pbx);
    call.callee.expect_request("ACK");
    Ok(call)
}

/// The callee answers `invite_at_b` 200 with SDP for its RTP port `b_port`:
/// the 200 as the caller received it.
pub fn answer(
    pbx: &Pbx,
    callee: &SipClient,
    caller: &SipClient,
    invite_at_b: &str,
    b_port: u16,
) -> String {
    answer_with(pbx, callee, caller, invite_at_b, b_port, |message| message)
}

/// As [`answer`], with the 200 passed through `wrap` before it is sent.
fn answer_with(
    pbx: &Pbx,
    callee: &SipClient,
    caller: &SipClient,
    invite_at_b: &str,
    b_port: u16,
    wrap: impl Fn(Vec<u8>) -> Vec<u8>,
) -> String {
    callee.send(
        &wrap(response_to(
            invite_at_b,
            "200 OK",
            callee.addr(),
            Some(&audio_sdp(b_port, "0 101")),
        )),
        pbx.sip_addr(),
    );
    let (code, ok_at_a) = caller.final_response(LIMIT).expect("200");
    assert_eq!(code, 200, "{ok_at_a}");
    ok_at_a
}

/// `message` with its SDP body carried as SIP-I carries it: a multipart
/// body of the SDP and a binary ISUP part.
pub fn sip_i(message: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&message).to_string();
    let (head, sdp) = text.split_once("\r\n\r\n").expect("a head");
    let mut body = format!(
        "--unique-boundary-1\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n\
         --unique-boundary-1\r\nContent-Type: application/ISUP;version=itu-t92+\r\n\
         Content-Disposition: signal;handling=optional\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&[0x01, 0x00, 0x49, 0x00, 0x00, 0x03, 0x02, 0x00, 0x07]);
    body.extend_from_slice(b"\r\n--unique-boundary-1--\r\n");
    let head = head
        .replace(
            "Content-Type: application/sdp",
            "Content-Type: multipart/mixed;boundary=unique-boundary-1\r\nMIME-Version: 1.0",
        )
        .replace(
            &format!("Content-Length: {}", sdp.len()),
            &format!("Content-Length: {}", body.len()),
        );
    [format!("{head}\r\n\r\n").into_bytes(), body].concat()
}
