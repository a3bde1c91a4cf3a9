//! A call: two legs, each its own dialog (RFC 3261 §12) with its own
//! Call-ID, tags, CSeq and Contact, and what the call needs to remember to
//! relay between them.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::events::{CallParties, Disposition, EndReason};
use crate::media::{LegSide, MediaSessionId, SdpRole};
use crate::sip::message::{CSeq, Message, Method};
use crate::sip::transaction::{TransactionLayer, TxId};
use crate::sip::transport::Peer;
use crate::sip::uri::{NameAddr, Uri};

pub type CallKey = u64;

/// One leg's dialog as the PBX (a user agent on that leg) holds it.
#[derive(Debug, Clone)]
pub struct Dialog {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: Option<String>,
    /// Our party, without tag (From of requests we send).
    pub local: NameAddr,
    /// Their party, without tag.
    pub remote: NameAddr,
    /// Next CSeq number we use.
    pub local_seq: u32,
    /// CSeq of the INVITE we sent last on this leg (for ACK and RAck).
    pub invite_seq: u32,
    pub remote_target: Uri,
    pub route_set: Vec<String>,
    /// Where this leg's peer is reached (its flow, for NAT).
    pub peer: Peer,
    /// Our Contact on this leg.
    pub contact: String,
}

impl Dialog {
    /// A request inside this dialog; `ACK` reuses the INVITE's CSeq.
    pub fn request(&mut self, method: Method) -> Message {
        let seq = match method {
            Method::Ack => self.invite_seq,
            _ => {
                self.local_seq += 1;
                self.local_seq
            }
        };
        if method == Method::Invite {
            self.invite_seq = seq;
        }
        let mut m = Message::request(method.clone(), self.remote_target.clone());
        for route in &self.route_set {
            m.headers.push("Route", route.clone());
        }
        let mut from = self.local.clone();
        from.set_param("tag", Some(&self.local_tag));
        let mut to = self.remote.clone();
        if let Some(tag) = &self.remote_tag {
            to.set_param("tag", Some(tag));
        }
        m.headers.push("From", from.to_string());
        m.headers.push("To", to.to_string());
        m.headers.push("Call-ID", self.call_id.clone());
        m.headers.push("CSeq", CSeq { seq, method }.to_string());
        m.headers.push("Max-Forwards", "70");
        m.headers.push("Contact", self.contact.clone());
        m
    }

    /// Learns the peer's tag, target and route set from a request or
    /// response that establishes or refreshes the dialog.
    pub fn learn(&mut self, message: &Message, from_response: bool) {
        let remote = if from_response {
            message.to_tag()
        } else {
            message.from_tag()
        };
        if remote.is_some() {
            self.remote_tag = remote;
        }
        if let Some(target) = message.contact_uri() {
            self.remote_target = target;
        }
        let mut routes: Vec<String> = message
            .headers
            .get_all("Record-Route")
            .map(str::to_string)
            .collect();
        if !routes.is_empty() {
            // A UAC uses the Record-Route of the response in reverse.
            if from_response {
                routes.reverse();
            }
            self.route_set = routes;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// Waiting for the router.
    Routing,
    /// B leg INVITE sent, no final response yet.
    Early,
    /// 2xx relayed to the caller, waiting for the ACK.
    Answered,
    /// ACK relayed: media flowing.
    Active,
}

/// A request relayed from one leg to the other, waiting for its answer.
#[derive(Debug, Clone)]
pub struct Relay {
    pub call: CallKey,
    /// Leg the request came from; the response goes back there.
    pub origin: LegSide,
    pub server_tx: TxId,
    pub request: Message,
    pub carried_offer: bool,
}

/// A 2xx to an INVITE relayed to `origin` whose ACK we wait for.
#[derive(Debug, Clone, Copy)]
pub struct AwaitedAck {
    pub origin: LegSide,
    pub server_tx: TxId,
    /// Whether the 2xx carried an offer, so the ACK carries the answer.
    pub offer_in_2xx: bool,
    /// The caller holds the early answer of a phone that did not answer
    /// (RFC 3261 §13.2.1: it ignores the one in the 2xx), so once it has
    /// acknowledged the 2xx the PBX offers it the session the call has.
    pub reoffer: bool,
}

/// An early SDP answer the caller holds (RFC 3261 §13.2.1: the first it
/// gets is the one it keeps).
#[derive(Debug, Clone)]
pub struct HeldAnswer {
    pub from: TxId,
    /// The body as the caller got it.
    pub body: Bytes,
}

/// One branch of the B leg: the INVITE sent to one of the callee's
/// contacts. A call to a user with several registered phones rings them
/// all (parallel forking); the first to answer becomes the B leg.
#[derive(Debug)]
pub struct Fork {
    pub tx: TxId,
    pub dialog: Dialog,
    /// The final failure response it gave, once it has.
    pub failed: Option<u16>,
    /// The SDP answer of a reliable provisional response the PBX
    /// acknowledged itself, while another fork spoke for the B leg: it
    /// binds (RFC 3262), so a 2xx of this fork need not repeat it, and the
    /// caller gets it with that 2xx.
    pub early_answer: Option<Bytes>,
}

#[derive(Debug)]
pub struct Call {
    pub key: CallKey,
    pub state: CallState,
    pub parties: CallParties,
    pub a: Dialog,
    /// The B leg's branches; once one answers, only that one.
    pub forks: Vec<Fork>,
    /// The fork that is the B leg: the one that answered, or while ringing
    /// the first that sent a provisional response (its early dialog is
    /// the one the caller sees).
    pub b: Option<usize>,
    /// The caller's INVITE and its server transaction.
    pub a_invite: Message,
    pub a_invite_tx: TxId,
    /// The best final failure from the forks so far, as relayed to the
    /// caller when every fork has failed.
    pub best_failure: Option<Message>,
    pub media: MediaSessionId,
    pub started: DateTime<Utc>,
    pub answered: Option<DateTime<Utc>>,
    pub ringing_sent: bool,
    pub awaited_ack: Option<AwaitedAck>,
    /// The last ACK sent on each leg, with the CSeq number of the INVITE
    /// whose 2xx it acknowledges: resent when that 2xx repeats, as it does
    /// when the ACK was lost.
    pub acks: HashMap<LegSide, (u32, Bytes)>,
    /// Side with an SDP offer not yet answered (RFC 3264).
    pub open_offer: Option<LegSide>,
    /// The SDP answer in a provisional response the caller got, and the
    /// fork it came from: if that fork's 2xx carries no SDP, the early
    /// answer stands.
    pub early_answer: Option<HeldAnswer>,
    /// Client transactions of BYEs still running, per leg.
    pub byes: HashMap<LegSide, TxId>,
    /// How the call ended, once it has.
    pub outcome: Option<Outcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub disposition: Disposition,
    pub sip_code: u16,
    pub end_reason: Option<EndReason>,
}

impl Call {
    /// Acknowledges the 2xx to the INVITE last sent on `side`, with `body`
    /// (an answer to an offer in that 2xx), and keeps the ACK for repeats.
    pub fn send_ack(&mut self, side: LegSide, body: Option<Bytes>, txl: &mut TransactionLayer) {
        let Some(leg) = self.leg_mut(side) else {
            return;
        };
        let mut ack = leg.request(Method::Ack);
        if let Some(body) = body {
            ack.set_body(Some("application/sdp"), body);
        }
        let (seq, peer) = (leg.invite_seq, leg.peer);
        let wire = txl.send_ack(ack, peer);
        self.acks.insert(side, (seq, wire));
    }

    /// Sends again the ACK for `response`, a repeated 2xx from `side`,
    /// once the PBX has acknowledged that 2xx (until then the ACK is on
    /// its way from the other leg).
    pub fn repeat_ack(&self, side: LegSide, response: &Message, txl: &mut TransactionLayer) {
        let seq = response.cseq().map(|c| c.seq);
        if let (Some((acked, wire)), Some(leg)) = (self.acks.get(&side), self.leg(side)) {
            if Some(*acked) == seq {
                txl.resend(leg.peer, wire.clone());
            }
        }
    }

    pub fn leg(&self, side: LegSide) -> Option<&Dialog> {
        match side {
            LegSide::A => Some(&self.a),
            LegSide::B => self.b.and_then(|i| self.forks.get(i)).map(|f| &f.dialog),
        }
    }

    pub fn leg_mut(&mut self, side: LegSide) -> Option<&mut Dialog> {
        match side {
            LegSide::A => Some(&mut self.a),
            LegSide::B => self
                .b
                .and_then(|i| self.forks.get_mut(i))
                .map(|f| &mut f.dialog),
        }
    }

    /// Offer or answer for an SDP body in a request from `from`.
    pub fn request_sdp_role(&mut self, from: LegSide, method: &Method) -> SdpRole {
        let answers =
            matches!(method, Method::Prack | Method::Ack) && self.open_offer == Some(from.other());
        if answers {
            self.open_offer = None;
            SdpRole::Answer
        } else {
            self.open_offer = Some(from);
            SdpRole::Offer
        }
    }

    /// Offer or answer for an SDP body in response `code` from `from` to
    /// a request that did (or did not) carry an offer.
    pub fn response_sdp_role(
        &mut self,
        from: LegSide,
        code: u16,
        request_had_offer: bool,
    ) -> SdpRole {
        if request_had_offer {
            self.open_offer = None;
            if code < 200 {
                SdpRole::ProvisionalAnswer
            } else {
                SdpRole::Answer
            }
        } else {
            self.open_offer = Some(from);
            SdpRole::Offer
        }
    }
}

/// Whether final failure `code` from one fork is a better answer for the
/// caller than `best` from another (RFC 3261 §16.7: a 6xx ends the search,
/// else the lowest class wins; among equals the first stays).
pub fn better_failure(code: u16, best: Option<u16>) -> bool {
    let rank = |c: u16| if c >= 600 { 0 } else { c / 100 };
    best.is_none_or(|b| rank(code) < rank(b))
}

/// CDR disposition of a call that ended with final response `code`.
pub fn disposition_for(code: u16) -> Disposition {
    match code {
        200..=299 => Disposition::Answered,
        486 | 600 => Disposition::Busy,
        408 | 480 => Disposition::NoAnswer,
        487 => Disposition::Cancelled,
        403 | 603 | 401 | 407 | 488 | 606 => Disposition::Rejected,
        _ => Disposition::Failed,
    }
}

/// A random token for tags and Call-IDs.
pub fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}
