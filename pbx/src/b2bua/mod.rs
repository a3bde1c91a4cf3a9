//! The back-to-back user agent: the transaction user that turns each
//! caller's INVITE into a call of two legs and relays between them —
//! provisional and final responses, ACK, BYE from either side, CANCEL,
//! re-INVITE, UPDATE, PRACK, INFO — with SDP passing through the media
//! hook. It publishes call events and never touches a socket: it works
//! through the transaction layer it is handed.

pub mod call;
pub mod checks;
pub mod routing;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;

use self::call::{
    better_failure, disposition_for, token, AwaitedAck, Call, CallKey, CallState, Dialog, Fork,
    HeldAnswer, Outcome, Relay,
};
use self::checks::{
    check_body, check_new_request, check_require, Refusal, ACCEPT, ALLOW, SUPPORTED,
};
use self::routing::{RouteOutcome, Target};
use crate::auth::{Authenticator, Verdict};
use crate::events::{CallParties, CallSummary, Disposition, EndReason, Event, EventBus};
use crate::media::{sdp, LegSide, MediaError, SdpRole, SessionMedia};
use crate::registrar::store::Binding;
use crate::registrar::{self, Limits, RegisterError, Registration};
use crate::sip::message::{delta_seconds, Message, Method, StartLine};
use crate::sip::timer::TimerQueue;
use crate::sip::transaction::{TransactionLayer, TuEvent, TxId};
use crate::sip::transport::{Peer, Protocol};
use crate::sip::uri::{NameAddr, SipUri, Uri};
use crate::status::PbxStatus;

/// Seconds a refused caller is told to wait (Retry-After).
const RETRY_AFTER_BUSY: u32 = 5;
const RETRY_AFTER_DRAIN: u32 = 30;

/// Times the PBX offers a leg its session again before it gives up.
const RESTORE_ATTEMPTS: u8 = 3;
/// The longest Retry-After the PBX waits out to offer a session again
/// (RFC 3261 §14.2 has a phone ask for 0 to 10 s).
const RESTORE_RETRY_AFTER_LIMIT: Duration = Duration::from_secs(10);

/// Headers relayed from one leg to the other with a request.
const REQUEST_HEADERS: [&str; 19] = [
    "Supported",
    "Require",
    "Allow",
    "Accept",
    "Session-Expires",
    "Min-SE",
    "Subject",
    "Alert-Info",
    "Call-Info",
    "P-Asserted-Identity",
    "Privacy",
    "Priority",
    "Content-Disposition",
    "Event",
    "Subscription-State",
    "Info-Package",
    "Recv-Info",
    "Reason",
    "User-Agent",
];

/// Headers relayed with a response.
const RESPONSE_HEADERS: [&str; 13] = [
    "Supported",
    "Require",
    "RSeq",
    "Allow",
    "Accept",
    "Session-Expires",
    "Min-SE",
    "Unsupported",
    "Retry-After",
    "Warning",
    "Reason",
    "Server",
    "Content-Disposition",
];

/// Settings of the B2BUA from `sip:`.
#[derive(Debug, Clone)]
pub struct CallSettings {
    pub max_calls: usize,
    pub ring_timeout: Duration,
    /// How long copies of an INVITE's 2xx can still arrive (64*T1): a late
    /// 2xx to a cancelled INVITE, or repeats of one whose ACK was lost.
    pub late_2xx_window: Duration,
}

/// A routing job for the runtime: route `user` and hand back the outcome.
#[derive(Debug, Clone)]
pub struct RouteRequest {
    pub call: CallKey,
    pub user: String,
    /// Handed over by another instance: this instance's bindings only.
    pub local_only: bool,
}

/// A registrar job for the runtime: apply `registration` and hand the
/// result back to `on_registered` with the request.
#[derive(Debug, Clone)]
pub struct RegisterJob {
    pub tx: TxId,
    pub request: Message,
    pub registration: Registration,
    pub source: Peer,
}

/// What a client transaction of ours is for. CANCELs, and PRACKs the PBX
/// sends itself, are not tracked: their answers change nothing.
#[derive(Debug)]
enum ClientPurpose {
    Invite(CallKey),
    Relay(Box<Relay>),
    /// An INVITE of ours, relayed or restoring, that the leg on this side
    /// answered with a 2xx: repeats of the 2xx get the ACK again.
    Answered(CallKey, LegSide),
    /// The PBX's own re-INVITE that puts the leg on this side back into
    /// the session the relay carries; its attempt, from 1.
    Restore(CallKey, LegSide, u8),
    Bye(CallKey, LegSide),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CallTimer {
    /// The callee has rung for `ring_timeout` (key: call).
    Ring,
    /// Forget how to hang up a cancelled INVITE (key: its transaction).
    Orphan,
    /// Forget how to acknowledge repeats of the 2xx to an in-dialog INVITE
    /// of ours (key: its transaction).
    Answered,
    /// Offer the leg its session again, attempt n (key: call).
    Restore(LegSide, u8),
}

/// Reason of the CANCEL sent to the phones that lost the race to answer
/// (RFC 3326), so that they do not show a missed call.
const COMPLETED_ELSEWHERE: &str = "SIP;cause=200;text=\"Call completed elsewhere\"";

/// Warning (RFC 3261 §20.43) of a refusal caused by the far end's SDP.
const UNRELAYABLE_SDP: &str = "399 sip-pbx \"the far end's SDP could not be relayed\"";

/// Reason of the BYE to a callee whose answer's SDP cannot be relayed.
const UNUSABLE_ANSWER: &str = "SIP;cause=488;text=\"SDP answer not acceptable\"";

pub struct B2bua {
    settings: CallSettings,
    calls: HashMap<CallKey, Call>,
    dialogs: HashMap<(String, String), (CallKey, LegSide)>,
    invite_server_txs: HashMap<TxId, CallKey>,
    client_txs: HashMap<TxId, ClientPurpose>,
    orphans: HashMap<TxId, Dialog>,
    timers: TimerQueue<(CallKey, CallTimer)>,
    media: Box<dyn SessionMedia>,
    bus: EventBus,
    status: Arc<PbxStatus>,
    routing: Vec<RouteRequest>,
    registering: Vec<RegisterJob>,
    auth: Authenticator,
    limits: Limits,
    next_key: CallKey,
}

impl B2bua {
    pub fn new(
        settings: CallSettings,
        media: Box<dyn SessionMedia>,
        bus: EventBus,
        status: Arc<PbxStatus>,
        auth: Authenticator,
        limits: Limits,
    ) -> Self {
        Self {
            settings,
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            invite_server_txs: HashMap::new(),
            client_txs: HashMap::new(),
            orphans: HashMap::new(),
            timers: TimerQueue::default(),
            media,
            bus,
            status,
            routing: Vec::new(),
            registering: Vec::new(),
            auth,
            limits,
            next_key: 0,
        }
    }

    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    /// Routing jobs started since the last call.
    pub fn take_route_requests(&mut self) -> Vec<RouteRequest> {
        std::mem::take(&mut self.routing)
    }

    /// Registrar jobs started since the last call.
    pub fn take_register_jobs(&mut self) -> Vec<RegisterJob> {
        std::mem::take(&mut self.registering)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    pub fn handle(&mut self, event: TuEvent, txl: &mut TransactionLayer, now: Instant) {
        match event {
            TuEvent::Request { tx, request, peer } => self.on_request(tx, request, peer, txl, now),
            TuEvent::Cancel {
                tx,
                request,
                invite,
                ..
            } => self.on_cancel(tx, request, invite, txl, now),
            TuEvent::Ack { request, .. } => self.on_ack(request, txl, now),
            TuEvent::Response { tx, response } => self.on_response(tx, response, txl, now),
            TuEvent::Timeout { tx } => self.on_client_timeout(tx, txl, now),
            TuEvent::AckTimeout { tx } => self.on_ack_timeout(tx, txl, now),
        }
    }

    fn on_request(
        &mut self,
        tx: TxId,
        request: Message,
        peer: Peer,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        if request.to_tag().is_some() {
            return self.in_dialog(tx, request, txl, now);
        }
        if let Err(refusal) = check_new_request(&request) {
            return refuse(txl, tx, &request, refusal, now);
        }
        // OPTIONS stays open: keep-alives and balancers' health probes.
        if request.method() != Some(&Method::Options)
            && !self.authorised(tx, &request, peer, txl, now)
        {
            return;
        }
        match request.method() {
            Some(Method::Invite) => self.new_call(tx, request, peer, txl, now),
            Some(Method::Options) => self.options(tx, &request, txl, now),
            Some(Method::Register) => self.register(tx, request, peer, txl, now),
            _ => reply(txl, tx, &request, 481, now),
        }
    }

    /// Digest authentication of an out-of-dialog request; answers it (401,
    /// 407, 403) and returns false when it may not go on.
    fn authorised(
        &mut self,
        tx: TxId,
        request: &Message,
        peer: Peer,
        txl: &mut TransactionLayer,
        now: Instant,
    ) -> bool {
        match self.auth.check(request, peer.addr.ip(), now) {
            Verdict::Pass(_) => true,
            Verdict::Challenge { stale } => {
                let register = request.method() == Some(&Method::Register);
                let (code, header) = if register {
                    (401, "WWW-Authenticate")
                } else {
                    (407, "Proxy-Authenticate")
                };
                let mut response = Message::response_to(request, code, Some(&token()));
                for challenge in self.auth.challenges(stale) {
                    response.headers.push(header, challenge);
                }
                txl.respond(tx, &response, now);
                false
            }
            Verdict::Forbidden(why) => {
                tracing::info!(%peer, why, "request forbidden");
                reply(txl, tx, request, 403, now);
                false
            }
        }
    }

    /// REGISTER: checked here, applied by a registrar job.
    fn register(
        &mut self,
        tx: TxId,
        request: Message,
        peer: Peer,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        if self.status.draining() {
            let mut response = Message::response_to(&request, 503, Some(&token()));
            response
                .headers
                .push("Retry-After", RETRY_AFTER_DRAIN.to_string());
            return txl.respond(tx, &response, now);
        }
        match registrar::parse(&request, self.limits) {
            Ok(registration) => self.registering.push(RegisterJob {
                tx,
                request,
                registration,
                source: peer,
            }),
            Err(refusal) => refuse(txl, tx, &request, refusal, now),
        }
    }

    /// The registrar's answer to a REGISTER.
    pub fn on_registered(
        &mut self,
        tx: TxId,
        request: &Message,
        result: Result<Vec<Binding>, RegisterError>,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let response = match result {
            Ok(bindings) => registrar::ok_response(request, &bindings, &token()),
            Err(e) => {
                if matches!(e, RegisterError::Store(_)) {
                    tracing::error!(error = %e, "REGISTER failed: registrar store unavailable");
                } else {
                    tracing::info!(error = %e, "REGISTER refused");
                }
                Message::response_to(request, 500, Some(&token()))
            }
        };
        txl.respond(tx, &response, now);
    }

    /// OPTIONS to the PBX: its capabilities, or 503 while draining so that
    /// SIP-aware balancers stop sending.
    fn options(&mut self, tx: TxId, request: &Message, txl: &mut TransactionLayer, now: Instant) {
        let draining = self.status.draining();
        let mut response =
            Message::response_to(request, if draining { 503 } else { 200 }, Some(&token()));
        if draining {
            response
                .headers
                .push("Retry-After", RETRY_AFTER_DRAIN.to_string());
        }
        response.headers.push("Allow", ALLOW);
        response.headers.push("Accept", ACCEPT);
        response.headers.push("Supported", SUPPORTED.join(", "));
        txl.respond(tx, &response, now);
    }

    fn new_call(
        &mut self,
        tx: TxId,
        request: Message,
        peer: Peer,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let refuse_busy = |txl: &mut TransactionLayer, code: u16, after: u32| {
            let mut response = Message::response_to(&request, code, Some(&token()));
            response.headers.push("Retry-After", after.to_string());
            txl.respond(tx, &response, now);
        };
        if self.status.draining() {
            return refuse_busy(txl, 503, RETRY_AFTER_DRAIN);
        }
        if self.calls.len() >= self.settings.max_calls {
            return refuse_busy(txl, 503, RETRY_AFTER_BUSY);
        }
        if self.is_loop(&request, txl) {
            return reply(txl, tx, &request, 482, now);
        }
        if let Err(refusal) = checks::forwarded_max_forwards(&request) {
            return refuse(txl, tx, &request, refusal, now);
        }
        let media = match self.media.open() {
            Ok(session) => session,
            Err(e) => {
                tracing::warn!(error = %e, "no media for a new call");
                return refuse_busy(txl, 503, RETRY_AFTER_BUSY);
            }
        };
        let (Some(call_id), Some(from), Some(to), Some(Uri::Sip(ruri))) = (
            request.call_id().map(str::to_string),
            request.from(),
            request.to(),
            request.request_uri().cloned(),
        ) else {
            self.media.close(media);
            return reply(txl, tx, &request, 400, now);
        };
        self.next_key += 1;
        let key = self.next_key;
        let local_tag = token();
        let mut a = Dialog {
            call_id: call_id.clone(),
            local_tag: local_tag.clone(),
            remote_tag: None,
            local: strip_tag(&to),
            remote: strip_tag(&from),
            local_seq: 0,
            invite_seq: 0,
            remote_target: request.contact_uri().unwrap_or(Uri::Sip(ruri.clone())),
            route_set: Vec::new(),
            peer,
            contact: contact(txl, peer.protocol),
        };
        a.learn(&request, false);
        let user = ruri.user_unescaped().unwrap_or_default();
        let local_only = registrar::is_local_only(&request);
        let parties = CallParties {
            call_id: call_id.clone(),
            caller: from.uri.to_string(),
            callee: user.clone(),
        };
        self.dialogs.insert((call_id, local_tag), (key, LegSide::A));
        self.invite_server_txs.insert(tx, key);
        self.calls.insert(
            key,
            Call {
                key,
                state: CallState::Routing,
                parties: parties.clone(),
                a,
                forks: Vec::new(),
                b: None,
                a_invite: request,
                a_invite_tx: tx,
                best_failure: None,
                media,
                started: Utc::now(),
                answered: None,
                ringing_sent: false,
                awaited_ack: None,
                acks: HashMap::new(),
                open_offer: None,
                early_answer: None,
                byes: HashMap::new(),
                outcome: None,
            },
        );
        self.status
            .active_calls
            .store(self.calls.len(), Ordering::Relaxed);
        self.status.total_calls.fetch_add(1, Ordering::Relaxed);
        self.bus.publish(Event::CallStarted { call: parties });
        self.routing.push(RouteRequest {
            call: key,
            user,
            local_only,
        });
    }

    /// A request that came back to us: one of our own branches in its Via
    /// (on top when a B leg was routed straight back to this PBX).
    fn is_loop(&self, request: &Message, txl: &TransactionLayer) -> bool {
        let local = txl.local();
        request.vias().any(|via| {
            via.host == local.host
                && via.port.unwrap_or(5060) == local.port
                && via.branch().is_some_and(|b| txl.is_own_branch(b))
        })
    }

    /// The router's answer for a call waiting in `Routing`.
    pub fn on_route(
        &mut self,
        key: CallKey,
        outcome: RouteOutcome,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self.calls.get(&key) else {
            return;
        };
        if call.state != CallState::Routing {
            return;
        }
        match outcome {
            RouteOutcome::Reject(code) => self.fail_call(key, code, txl, now),
            RouteOutcome::Targets(targets) if targets.is_empty() => {
                self.fail_call(key, 404, txl, now)
            }
            RouteOutcome::Targets(targets) => self.start_b_leg(key, targets, txl, now),
        }
    }

    /// Sends the B leg's INVITE to every target at once, with one offer.
    fn start_b_leg(
        &mut self,
        key: CallKey,
        targets: Vec<Target>,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let offer = match call.a_invite.sdp() {
            Some(sdp) => {
                call.open_offer = Some(LegSide::A);
                match self
                    .media
                    .relay_sdp(call.media, LegSide::A, SdpRole::Offer, sdp)
                {
                    Ok(body) => Some(body),
                    Err(e) => return self.fail_call(key, media_error_code(&e), txl, now),
                }
            }
            None => None,
        };
        let max_forwards = checks::forwarded_max_forwards(&call.a_invite).unwrap_or(69);
        for target in targets {
            let mut dialog = b_dialog(call, &target, txl);
            let mut invite = dialog.request(Method::Invite);
            invite.headers.set("Max-Forwards", max_forwards.to_string());
            copy_headers(&call.a_invite, &mut invite, &REQUEST_HEADERS);
            if let Some(body) = &offer {
                invite.set_body(Some("application/sdp"), body.clone());
            }
            self.dialogs.insert(
                (dialog.call_id.clone(), dialog.local_tag.clone()),
                (key, LegSide::B),
            );
            let tx = txl.send_request(invite, target.peer, now);
            self.client_txs.insert(tx, ClientPurpose::Invite(key));
            call.forks.push(Fork {
                tx,
                dialog,
                failed: None,
                early_answer: None,
            });
        }
        call.state = CallState::Early;
        self.timers
            .schedule(now + self.settings.ring_timeout, (key, CallTimer::Ring));
    }

    /// Gives up on the call's ringing forks except `keep`: each is
    /// cancelled (the transaction layer holds the CANCEL until a
    /// provisional response allows it) and remembered as an orphan, so
    /// that a 2xx crossing the CANCEL is acknowledged and hung up.
    fn abandon_forks(
        &mut self,
        key: CallKey,
        keep: Option<usize>,
        reason: Option<&str>,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        call.b = None;
        for (index, fork) in std::mem::take(&mut call.forks).into_iter().enumerate() {
            if Some(index) == keep {
                call.b = Some(call.forks.len());
                call.forks.push(fork);
                continue;
            }
            self.dialogs
                .remove(&(fork.dialog.call_id.clone(), fork.dialog.local_tag.clone()));
            if fork.failed.is_some() {
                continue;
            }
            txl.cancel(fork.tx, reason, now);
            self.client_txs.remove(&fork.tx);
            self.orphans.insert(fork.tx, fork.dialog);
            self.timers.schedule(
                now + self.settings.late_2xx_window,
                (fork.tx, CallTimer::Orphan),
            );
        }
    }

    /// Ends a call that never reached the callee, with `code` to the caller.
    fn fail_call(&mut self, key: CallKey, code: u16, txl: &mut TransactionLayer, now: Instant) {
        self.abandon_forks(key, None, None, txl, now);
        let Some(call) = self.calls.get(&key) else {
            return;
        };
        let response = Message::response_to(&call.a_invite, code, Some(&call.a.local_tag));
        txl.respond(call.a_invite_tx, &response, now);
        self.finish(key, outcome(code, None));
    }

    fn on_cancel(
        &mut self,
        tx: TxId,
        request: Message,
        invite: Option<TxId>,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let key = invite.and_then(|i| self.invite_server_txs.get(&i).copied());
        let Some(key) = key.filter(|k| self.calls.contains_key(k)) else {
            return reply(txl, tx, &request, 481, now);
        };
        reply(txl, tx, &request, 200, now);
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        if !matches!(call.state, CallState::Routing | CallState::Early) {
            return;
        }
        let terminated = Message::response_to(&call.a_invite, 487, Some(&call.a.local_tag));
        txl.respond(call.a_invite_tx, &terminated, now);
        self.abandon_forks(key, None, reasons(&request).as_deref(), txl, now);
        self.finish(key, outcome(487, None));
    }

    fn on_response(
        &mut self,
        tx: TxId,
        response: Message,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let purpose = match self.client_txs.get(&tx) {
            Some(ClientPurpose::Invite(key)) => ClientPurpose::Invite(*key),
            Some(ClientPurpose::Relay(relay)) => ClientPurpose::Relay(relay.clone()),
            Some(ClientPurpose::Answered(key, side)) => ClientPurpose::Answered(*key, *side),
            Some(ClientPurpose::Restore(key, side, attempt)) => {
                ClientPurpose::Restore(*key, *side, *attempt)
            }
            Some(ClientPurpose::Bye(key, side)) => ClientPurpose::Bye(*key, *side),
            None => return self.on_orphan_response(tx, &response, txl, now),
        };
        let code = response.code().unwrap_or(500);
        // An INVITE's 2xx may repeat (RFC 6026): keep its purpose until the call goes.
        let repeats = matches!(
            purpose,
            ClientPurpose::Invite(_) | ClientPurpose::Answered(..)
        ) && (200..300).contains(&code);
        if code >= 200 && !repeats {
            self.client_txs.remove(&tx);
        }
        match purpose {
            ClientPurpose::Invite(key) => self.on_b_invite_response(key, tx, response, txl, now),
            ClientPurpose::Relay(relay) => {
                if relay.request.method() == Some(&Method::Invite) && (200..300).contains(&code) {
                    self.await_repeats(tx, relay.call, relay.origin.other(), now);
                }
                self.relay_response(*relay, response, txl, now)
            }
            ClientPurpose::Restore(key, side, _) if (200..300).contains(&code) => {
                self.await_repeats(tx, key, side, now);
                self.on_restored(key, side, &response, txl);
            }
            ClientPurpose::Restore(key, side, _) if matches!(code, 408 | 481) => {
                self.restore_found_no_dialog(key, side, code, txl, now);
            }
            ClientPurpose::Restore(key, side, attempt) if code >= 300 => {
                match restore_retry(&response, side).filter(|_| attempt < RESTORE_ATTEMPTS) {
                    Some(wait) => self
                        .timers
                        .schedule(now + wait, (key, CallTimer::Restore(side, attempt + 1))),
                    None => tracing::warn!(
                        call = key,
                        code,
                        attempt,
                        "the re-INVITE restoring the session was refused"
                    ),
                }
            }
            ClientPurpose::Restore(..) => {}
            ClientPurpose::Answered(key, side) => {
                if let Some(call) = self.calls.get(&key) {
                    call.repeat_ack(side, &response, txl);
                }
            }
            ClientPurpose::Bye(key, side) => {
                if code >= 200 {
                    self.bye_done(key, side);
                }
            }
        }
    }

    /// Keeps `tx`, an INVITE of ours that `side` answered with a 2xx, so
    /// that repeats of the 2xx get the ACK again.
    fn await_repeats(&mut self, tx: TxId, key: CallKey, side: LegSide, now: Instant) {
        self.client_txs
            .insert(tx, ClientPurpose::Answered(key, side));
        self.timers.schedule(
            now + self.settings.late_2xx_window,
            (tx, CallTimer::Answered),
        );
    }

    /// A leg took up an answer the PBX could not relay, or kept the early
    /// answer of a phone that did not answer, so it believes in a session
    /// the call does not have: the PBX offers it the session last agreed
    /// with it again, in a re-INVITE of its own.
    fn restore_session(
        &mut self,
        key: CallKey,
        side: LegSide,
        attempt: u8,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self
            .calls
            .get_mut(&key)
            .filter(|c| c.state == CallState::Active && c.outcome.is_none())
        else {
            return;
        };
        let Some(offer) = self.media.restoring_offer(call.media, side) else {
            return;
        };
        let Some(leg) = call.leg_mut(side) else {
            return;
        };
        let mut invite = leg.request(Method::Invite);
        invite.set_body(Some("application/sdp"), offer);
        let tx = txl.send_request(invite, leg.peer, now);
        self.client_txs
            .insert(tx, ClientPurpose::Restore(key, side, attempt));
    }

    /// The leg answered the restoring re-INVITE 481 or 408, or never
    /// answered it: its dialog is gone (RFC 3261 §12.2.1.2), and with it
    /// the call's media, so the other leg is hung up at once rather than
    /// left in silence until `media.rtp_timeout`, with `code` as the
    /// BYE's Reason.
    fn restore_found_no_dialog(
        &mut self,
        key: CallKey,
        side: LegSide,
        code: u16,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        if self.calls.get(&key).is_none_or(|c| c.outcome.is_some()) {
            return;
        }
        tracing::info!(
            call = key,
            code,
            leg = ?side,
            "the leg lost the dialog the PBX tried to restore its session in: hanging up"
        );
        let reason = format!("SIP;cause={code};text=\"The far leg lost the dialog\"");
        self.hang_up(key, Some(side), EndReason::Error, Some(&reason), txl, now);
    }

    fn on_restored(
        &mut self,
        key: CallKey,
        side: LegSide,
        response: &Message,
        txl: &mut TransactionLayer,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        call.send_ack(side, None, txl);
        let result = match response.sdp() {
            Some(answer) => self.media.restored(call.media, side, answer),
            None => Err(MediaError::BadSdp("no SDP in the answer".to_string())),
        };
        if let Err(error) = result {
            tracing::warn!(call = key, %error, "the answer to the re-INVITE restoring the session cannot be used either");
        }
    }

    fn on_b_invite_response(
        &mut self,
        key: CallKey,
        tx: TxId,
        response: Message,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let code = response.code().unwrap_or(500);
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let Some(index) = call.forks.iter().position(|f| f.tx == tx) else {
            return;
        };
        if (200..300).contains(&code) && call.acks.contains_key(&LegSide::B) {
            // The callee did not hear our ACK: repeat it.
            call.repeat_ack(LegSide::B, &response, txl);
            return;
        }
        if call.state != CallState::Early {
            return;
        }
        if let Some(fork) = call.forks.get_mut(index) {
            if code > 100 && response.to_tag().is_some() {
                fork.dialog.learn(&response, true);
            }
        }
        match code {
            ..=199 => self.fork_ringing(key, index, &response, txl, now),
            200..=299 => {
                self.abandon_forks(key, Some(index), Some(COMPLETED_ELSEWHERE), txl, now);
                self.answered(key, &response, txl, now);
            }
            _ => self.fork_failed(key, index, Some(&response), txl, now),
        }
    }

    /// A provisional response from a fork. The first fork to send one
    /// speaks for the B leg; the caller already hears the ringing of the
    /// others, whose reliable provisionals the PBX acknowledges itself.
    fn fork_ringing(
        &mut self,
        key: CallKey,
        index: usize,
        response: &Message,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let leader = *call.b.get_or_insert(index);
        let answer = response.sdp().filter(|_| call.a_invite.sdp().is_some());
        if leader != index {
            if let (Some(rseq), Some(fork)) =
                (response.headers.get("RSeq"), call.forks.get_mut(index))
            {
                if answer.is_some() {
                    fork.early_answer = answer;
                }
                let mut prack = fork.dialog.request(Method::Prack);
                prack.headers.push(
                    "RAck",
                    format!("{} {} INVITE", rseq.trim(), fork.dialog.invite_seq),
                );
                txl.send_request(prack, fork.dialog.peer, now);
            }
            return;
        }
        let code = response.code().unwrap_or(180);
        // Early media is optional: the caller still hears that it rings.
        let relayed = match callee_response_to_caller(
            self.media.as_mut(),
            call,
            response,
            response.sdp(),
        ) {
            Ok(relayed) => {
                let held = relayed.sdp().filter(|_| answer.is_some());
                if let (Some(fork), Some(body)) = (call.forks.get_mut(index), held) {
                    // The caller holds this answer now, not one the fork gave before it led.
                    fork.early_answer = None;
                    call.early_answer = Some(HeldAnswer {
                        from: fork.tx,
                        body,
                    });
                }
                relayed
            }
            Err(e) => {
                tracing::warn!(call = call.key, error = %e, "early SDP from the callee not relayed");
                to_caller(call, response)
            }
        };
        txl.respond(call.a_invite_tx, &relayed, now);
        if !call.ringing_sent {
            call.ringing_sent = true;
            self.bus.publish(Event::CallRinging {
                call: call.parties.clone(),
                code,
            });
        }
    }

    /// The B leg answered (its other forks are already abandoned).
    fn answered(
        &mut self,
        key: CallKey,
        response: &Message,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let had_offer = call.a_invite.sdp().is_some();
        let (answerer, early_answer) = call
            .b
            .and_then(|b| call.forks.get_mut(b))
            .map(|fork| (Some(fork.tx), fork.early_answer.take()))
            .unwrap_or_default();
        let held = call.early_answer.clone();
        let early_answer_stands = response.sdp().is_none()
            && answerer.is_some()
            && held.as_ref().map(|h| h.from) == answerer;
        let sdp = response.sdp().or(early_answer);
        let relayed = callee_response_to_caller(self.media.as_mut(), call, response, sdp);
        call.state = CallState::Answered;
        let relayed = match relayed {
            Ok(relayed) => relayed,
            Err(e) => {
                tracing::warn!(call = key, error = %e, "the callee's SDP cannot be relayed: the call fails with 502");
                return self.refuse_answer(key, txl, now);
            }
        };
        if early_answer_stands {
            self.media.early_answer_stands(call.media);
        }
        // The caller keeps another phone's early SDP as the answer (the
        // first it gets, RFC 3261 §13.2.1) and ignores this 2xx's, unless
        // both say the same.
        let reoffer = had_offer
            && held.is_some_and(|held| {
                Some(held.from) != answerer
                    && relayed
                        .sdp()
                        .is_some_and(|now| !sdp::same_session(&held.body, &now))
            });
        call.answered = Some(Utc::now());
        call.awaited_ack = Some(AwaitedAck {
            origin: LegSide::A,
            server_tx: call.a_invite_tx,
            offer_in_2xx: !had_offer && response.sdp().is_some(),
            reoffer,
        });
        txl.respond(call.a_invite_tx, &relayed, now);
        let codec = self.media.codec(call.media);
        self.bus.publish(Event::CallAnswered {
            call: call.parties.clone(),
            codec,
        });
    }

    /// The callee answered with SDP the PBX cannot relay (unparsable, or
    /// no stream it can carry): a call set up on it would have no media.
    /// The callee's 2xx is acknowledged and hung up with the reason, and
    /// the caller gets 502 Bad Gateway, as from a gateway whose downstream
    /// answered what it cannot use (RFC 3261 §21.5.3).
    fn refuse_answer(&mut self, key: CallKey, txl: &mut TransactionLayer, now: Instant) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        call.send_ack(LegSide::B, None, txl);
        let mut refusal = Message::response_to(&call.a_invite, 502, Some(&call.a.local_tag));
        refusal.headers.push("Warning", UNRELAYABLE_SDP);
        txl.respond(call.a_invite_tx, &refusal, now);
        self.send_bye(key, LegSide::B, Some(UNUSABLE_ANSWER), txl, now);
        self.finish(key, outcome(502, None));
    }

    /// A fork ended with a failure (`response`, or none when it timed
    /// out). When every fork has failed, or one declined with a 6xx, the
    /// caller gets the best of their answers.
    fn fork_failed(
        &mut self,
        key: CallKey,
        index: usize,
        response: Option<&Message>,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let code = response.and_then(Message::code).unwrap_or(408);
        if let Some(fork) = call.forks.get_mut(index) {
            fork.failed = Some(code);
        }
        if call.b == Some(index) {
            call.b = None;
        }
        if better_failure(code, call.best_failure.as_ref().and_then(Message::code)) {
            call.best_failure = Some(match response {
                Some(response) => to_caller(call, response),
                None => Message::response_to(&call.a_invite, code, Some(&call.a.local_tag)),
            });
        }
        if code < 600 && call.forks.iter().any(|f| f.failed.is_none()) {
            return;
        }
        let Some(best) = call.best_failure.take() else {
            return;
        };
        let code = best.code().unwrap_or(code);
        self.abandon_forks(key, None, None, txl, now);
        if let Some(call) = self.calls.get(&key) {
            txl.respond(call.a_invite_tx, &best, now);
        }
        self.finish(key, outcome(code, None));
    }

    /// A response for the INVITE of a call that has ended before the callee
    /// answered: a late 2xx is acknowledged and hung up at once.
    fn on_orphan_response(
        &mut self,
        tx: TxId,
        response: &Message,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        if !response.code().is_some_and(|c| (200..300).contains(&c)) {
            return;
        }
        let Some(mut b) = self.orphans.remove(&tx) else {
            return;
        };
        b.learn(response, true);
        let ack = b.request(Method::Ack);
        txl.send_ack(ack, b.peer);
        let bye = b.request(Method::Bye);
        txl.send_request(bye, b.peer, now);
    }

    fn on_ack(&mut self, ack: Message, txl: &mut TransactionLayer, now: Instant) {
        let Some((key, side)) = self.dialog_of(&ack) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let Some(awaited) = call.awaited_ack.filter(|a| a.origin == side) else {
            return;
        };
        call.awaited_ack = None;
        txl.ack_received(awaited.server_tx);
        if call.state == CallState::Answered {
            call.state = CallState::Active;
        }
        let body = match ack.sdp() {
            Some(sdp) if awaited.offer_in_2xx => {
                let role = call.request_sdp_role(side, &Method::Ack);
                self.media.relay_sdp(call.media, side, role, sdp).ok()
            }
            _ => None,
        };
        call.send_ack(side.other(), body, txl);
        if awaited.reoffer {
            self.restore_session(key, side, 0, txl, now);
        }
    }

    /// The dialog and leg a request belongs to, by Call-ID and our tag.
    fn dialog_of(&self, request: &Message) -> Option<(CallKey, LegSide)> {
        let call_id = request.call_id()?.to_string();
        let tag = request.to_tag()?;
        self.dialogs.get(&(call_id, tag)).copied()
    }

    fn in_dialog(&mut self, tx: TxId, request: Message, txl: &mut TransactionLayer, now: Instant) {
        let Some((key, side)) = self.dialog_of(&request) else {
            return reply(txl, tx, &request, 481, now);
        };
        let method = request.method().cloned().unwrap_or(Method::Options);
        if method == Method::Bye {
            reply(txl, tx, &request, 200, now);
            let reason = if side == LegSide::A {
                EndReason::CallerBye
            } else {
                EndReason::CalleeBye
            };
            let why = reasons(&request);
            return self.hang_up(key, Some(side), reason, why.as_deref(), txl, now);
        }
        if let Err(refusal) = check_require(&request) {
            return refuse(txl, tx, &request, refusal, now);
        }
        if carries_offer_answer(&method) {
            if let Err(refusal) = check_body(&request) {
                return refuse(txl, tx, &request, refusal, now);
            }
        }
        self.relay_request(key, side, tx, request, method, txl, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn relay_request(
        &mut self,
        key: CallKey,
        side: LegSide,
        tx: TxId,
        request: Message,
        method: Method,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        // A request crossing the PBX's BYE: the call is over and its media
        // released, and the other leg is being hung up.
        let Some(call) = self.calls.get_mut(&key).filter(|c| c.outcome.is_none()) else {
            return reply(txl, tx, &request, 481, now);
        };
        if let Some(origin) = call.leg_mut(side) {
            origin.learn(&request, false);
        }
        let other_ready = call
            .leg(side.other())
            .is_some_and(|d| d.remote_tag.is_some());
        if !other_ready {
            // The far leg has no dialog yet to carry the request.
            return reply(txl, tx, &request, 491, now);
        }
        let rack = request.headers.get("RAck").map(str::to_string);
        let body = match request.sdp() {
            Some(sdp) => {
                let role = call.request_sdp_role(side, &method);
                match self.media.relay_sdp(call.media, side, role, sdp) {
                    Ok(body) => Some((Some("application/sdp".to_string()), body)),
                    Err(e) => return reply(txl, tx, &request, media_error_code(&e), now),
                }
            }
            None if !request.body.is_empty() => Some((
                request.headers.get("Content-Type").map(str::to_string),
                request.body.clone(),
            )),
            None => None,
        };
        let Some(other) = call.leg_mut(side.other()) else {
            return;
        };
        let mut relayed = other.request(method.clone());
        copy_headers(&request, &mut relayed, &REQUEST_HEADERS);
        for h in request
            .headers
            .iter()
            .filter(|h| h.name.to_ascii_lowercase().starts_with("x-"))
        {
            relayed.headers.push(h.name.clone(), h.value.clone());
        }
        if let Some(rack) = rack {
            // RAck names the INVITE of the far leg: its CSeq, our RSeq.
            let mut parts = rack.split_whitespace();
            if let (Some(rseq), Some(_), Some(m)) = (parts.next(), parts.next(), parts.next()) {
                relayed
                    .headers
                    .push("RAck", format!("{rseq} {} {m}", other.invite_seq));
            }
        }
        if let Some((content_type, body)) = body {
            relayed.set_body(content_type.as_deref(), body);
        }
        let peer = other.peer;
        let carried_offer = request.sdp().is_some();
        let client = txl.send_request(relayed, peer, now);
        self.client_txs.insert(
            client,
            ClientPurpose::Relay(Box::new(Relay {
                call: key,
                origin: side,
                server_tx: tx,
                request,
                carried_offer,
            })),
        );
    }

    fn relay_response(
        &mut self,
        relay: Relay,
        response: Message,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let code = response.code().unwrap_or(500);
        let Some(call) = self.calls.get_mut(&relay.call) else {
            return;
        };
        let responder = relay.origin.other();
        if let Some(far) = call.leg_mut(responder) {
            if (200..300).contains(&code) && relay.request.method() == Some(&Method::Invite) {
                far.learn(&response, true);
            }
        }
        let Some(origin) = call.leg(relay.origin) else {
            return;
        };
        let origin_tag = origin.local_tag.clone();
        let mut relayed = Message::response_to(&relay.request, code, Some(&origin_tag));
        if let StartLine::Response { reason, .. } = &response.start {
            relayed.start = StartLine::Response {
                code,
                reason: reason.clone(),
            };
        }
        copy_headers(&response, &mut relayed, &RESPONSE_HEADERS);
        if (101..300).contains(&code) {
            relayed.headers.push("Contact", origin.contact.clone());
        }
        let offers_or_answers = relay.request.method().is_some_and(carries_offer_answer);
        let sdp = response.sdp();
        let unrelayable = if call.outcome.is_some() && sdp.is_some() {
            // Answered after the call ended: its media is released.
            tracing::debug!(
                call = relay.call,
                "SDP of a response after the call ended dropped"
            );
            None
        } else if let Some(sdp) = sdp.clone() {
            let role = call.response_sdp_role(responder, code, relay.carried_offer);
            match self.media.relay_sdp(call.media, responder, role, sdp) {
                Ok(body) => {
                    relayed.set_body(Some("application/sdp"), body);
                    None
                }
                Err(e) => Some(e.to_string()),
            }
        } else if response.body.is_empty() {
            None
        } else if offers_or_answers {
            // As for requests (415), only SDP answers an offer here: another
            // body may carry the far end's own addresses, which the PBX
            // cannot rewrite.
            Some("a body that is not SDP".to_string())
        } else {
            let ct = response.headers.get("Content-Type").map(str::to_string);
            relayed.set_body(ct.as_deref(), response.body.clone());
            None
        };
        let is_invite = relay.request.method() == Some(&Method::Invite);
        // A 2xx to INVITE always completes an offer/answer exchange, and a
        // 2xx to an UPDATE or PRACK that offered does: relayed without its
        // SDP it would leave the offerer with no answer. The offer fails
        // instead, and the call keeps the media it had.
        let refused = unrelayable.is_some()
            && (200..300).contains(&code)
            && (relay.carried_offer || is_invite);
        if relay.carried_offer && (code >= 300 || refused) {
            self.media.offer_failed(call.media, relay.origin);
        }
        if let Some(error) = unrelayable {
            if refused {
                tracing::warn!(call = relay.call, %error, "the far end's 2xx cannot be relayed: 488 to the offerer");
                if is_invite {
                    call.send_ack(responder, None, txl);
                }
                let mut refusal = Message::response_to(&relay.request, 488, Some(&origin_tag));
                refusal.headers.push("Warning", UNRELAYABLE_SDP);
                txl.respond(relay.server_tx, &refusal, now);
                return self.restore_session(relay.call, responder, 1, txl, now);
            }
            tracing::warn!(call = relay.call, %error, "body of a response not relayed");
        }
        if is_invite && (200..300).contains(&code) {
            call.awaited_ack = Some(AwaitedAck {
                origin: relay.origin,
                server_tx: relay.server_tx,
                offer_in_2xx: !relay.carried_offer && sdp.is_some(),
                reoffer: false,
            });
        }
        txl.respond(relay.server_tx, &relayed, now);
    }

    fn on_client_timeout(&mut self, tx: TxId, txl: &mut TransactionLayer, now: Instant) {
        match self.client_txs.remove(&tx) {
            Some(ClientPurpose::Invite(key)) => {
                let fork = self
                    .calls
                    .get(&key)
                    .filter(|c| c.state == CallState::Early)
                    .and_then(|c| c.forks.iter().position(|f| f.tx == tx));
                if let Some(index) = fork {
                    self.fork_failed(key, index, None, txl, now);
                }
            }
            Some(ClientPurpose::Relay(relay)) => {
                if let Some(call) = self.calls.get(&relay.call).filter(|_| relay.carried_offer) {
                    self.media.offer_failed(call.media, relay.origin);
                }
                let response = Message::response_to(&relay.request, 408, None);
                txl.respond(relay.server_tx, &response, now);
            }
            Some(ClientPurpose::Bye(key, side)) => self.bye_done(key, side),
            Some(ClientPurpose::Restore(key, side, _)) => {
                self.restore_found_no_dialog(key, side, 408, txl, now);
            }
            Some(ClientPurpose::Answered(..)) | None => {}
        }
    }

    /// Our 2xx was never acknowledged: the call cannot be set up.
    fn on_ack_timeout(&mut self, tx: TxId, txl: &mut TransactionLayer, now: Instant) {
        let key = self
            .calls
            .values()
            .find_map(|c| c.awaited_ack.filter(|a| a.server_tx == tx).map(|_| c.key));
        if let Some(key) = key {
            tracing::info!(call = key, "no ACK for 2xx: hanging up");
            self.hang_up(key, None, EndReason::Error, Some(NO_ACK), txl, now);
        }
    }

    /// Ends a call: BYE to every leg except `except` (the one that sent
    /// BYE), then the record. A call still ringing has its forks cancelled.
    /// `why` is the Reason (RFC 3326) the BYEs and CANCELs carry: the one
    /// the leg's own BYE gave, or the PBX's own.
    pub fn hang_up(
        &mut self,
        key: CallKey,
        except: Option<LegSide>,
        reason: EndReason,
        why: Option<&str>,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        if call.outcome.is_some() {
            return;
        }
        match call.state {
            CallState::Routing | CallState::Early => {
                // A BYE in the early dialog ends the INVITE (RFC 3261 §15.1.2).
                let terminated = Message::response_to(&call.a_invite, 487, Some(&call.a.local_tag));
                txl.respond(call.a_invite_tx, &terminated, now);
                self.abandon_forks(key, None, why, txl, now);
            }
            CallState::Answered if !call.acks.contains_key(&LegSide::B) => {
                // The callee's 2xx still waits for an ACK: give it one first.
                call.send_ack(LegSide::B, None, txl);
            }
            _ => {}
        }
        for side in [LegSide::A, LegSide::B] {
            if Some(side) != except {
                self.send_bye(key, side, why, txl, now);
            }
        }
        let answered = self.calls.get(&key).is_some_and(|c| c.answered.is_some());
        let code = if answered { 200 } else { 487 };
        self.finish(key, outcome(code, Some(reason)));
    }

    /// BYE on one leg, with a Reason header (RFC 3326) when one is given.
    fn send_bye(
        &mut self,
        key: CallKey,
        side: LegSide,
        reason: Option<&str>,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        let Some(dialog) = call.leg_mut(side).filter(|d| d.remote_tag.is_some()) else {
            return;
        };
        let mut bye = dialog.request(Method::Bye);
        if let Some(reason) = reason {
            bye.headers.push("Reason", reason);
        }
        let peer = dialog.peer;
        let tx = txl.send_request(bye, peer, now);
        call.byes.insert(side, tx);
        self.client_txs.insert(tx, ClientPurpose::Bye(key, side));
    }

    fn bye_done(&mut self, key: CallKey, side: LegSide) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        call.byes.remove(&side);
        if call.byes.is_empty() && call.outcome.is_some() {
            self.remove(key);
        }
    }

    /// Records how the call ended and forgets it once no BYE is running.
    fn finish(&mut self, key: CallKey, done: Outcome) {
        let Some(call) = self.calls.get_mut(&key) else {
            return;
        };
        if call.outcome.is_some() {
            return;
        }
        call.outcome = Some(done);
        let end = Utc::now();
        let duration = call
            .answered
            .map(|a| (end - a).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        let codec = self.media.codec(call.media);
        let summary = CallSummary {
            start_time: call.started,
            answer_time: call.answered,
            end_time: end,
            duration,
            disposition: done.disposition,
            sip_code: done.sip_code,
            end_reason: done.end_reason,
            codec,
        };
        self.bus.publish(Event::CallEnded {
            call: call.parties.clone(),
            summary,
        });
        if call.byes.is_empty() {
            self.remove(key);
        } else {
            // Keep the dialogs until the BYEs are answered; free the rest.
            let media = call.media;
            self.media.close(media);
        }
    }

    fn remove(&mut self, key: CallKey) {
        let Some(call) = self.calls.remove(&key) else {
            return;
        };
        self.media.close(call.media);
        self.dialogs
            .remove(&(call.a.call_id.clone(), call.a.local_tag.clone()));
        for fork in &call.forks {
            self.dialogs
                .remove(&(fork.dialog.call_id.clone(), fork.dialog.local_tag.clone()));
            self.client_txs.remove(&fork.tx);
        }
        self.invite_server_txs.remove(&call.a_invite_tx);
        self.status
            .active_calls
            .store(self.calls.len(), Ordering::Relaxed);
    }

    /// Fires due call timers (ring timeout).
    pub fn on_timers(&mut self, txl: &mut TransactionLayer, now: Instant) {
        while let Some((key, timer)) = self.timers.pop_due(now) {
            match timer {
                CallTimer::Orphan => {
                    self.orphans.remove(&key);
                    continue;
                }
                CallTimer::Answered => {
                    self.client_txs.remove(&key);
                    continue;
                }
                CallTimer::Restore(side, attempt) => {
                    self.restore_session(key, side, attempt, txl, now);
                    continue;
                }
                CallTimer::Ring => {}
            }
            let Some(call) = self.calls.get(&key) else {
                continue;
            };
            if call.state != CallState::Early || call.outcome.is_some() {
                continue;
            }
            tracing::info!(call = key, "callee did not answer in time");
            self.fail_call(key, 480, txl, now);
        }
    }

    /// Hangs up every call (drain deadline, media timeout of all).
    pub fn hang_up_all(&mut self, reason: EndReason, txl: &mut TransactionLayer, now: Instant) {
        let keys: Vec<CallKey> = self.calls.keys().copied().collect();
        for key in keys {
            let early = self
                .calls
                .get(&key)
                .is_some_and(|c| matches!(c.state, CallState::Routing | CallState::Early));
            if early {
                self.fail_call(key, 503, txl, now);
            } else {
                self.hang_up(key, None, reason, own_reason(reason), txl, now);
            }
        }
    }

    /// The call whose media session timed out.
    pub fn on_media_timeout(
        &mut self,
        session: crate::media::MediaSessionId,
        txl: &mut TransactionLayer,
        now: Instant,
    ) {
        let key = self
            .calls
            .values()
            // Early media may be silent; only answered calls time out.
            .find(|c| c.media == session && c.outcome.is_none() && c.answered.is_some())
            .map(|c| c.key);
        if let Some(key) = key {
            let reason = EndReason::RtpTimeout;
            self.hang_up(key, None, reason, own_reason(reason), txl, now);
        }
    }
}

/// The Reason (RFC 3326) of the BYEs of a hang-up the PBX decides on
/// itself, so that the phones and the carrier can tell it from a user's.
/// Q.850 cause 102, recovery on timer expiry, is what gateways give when a
/// timer ended the call; 41, temporary failure, says it may be tried again.
fn own_reason(reason: EndReason) -> Option<&'static str> {
    match reason {
        EndReason::RtpTimeout => Some("Q.850;cause=102;text=\"RTP timeout\""),
        EndReason::Drain => Some("Q.850;cause=41;text=\"The PBX is shutting down\""),
        EndReason::CallerBye | EndReason::CalleeBye | EndReason::Error => None,
    }
}

/// The Reason of the BYEs that end a call whose 2xx was never acknowledged
/// (RFC 3261 §13.3.1.4).
const NO_ACK: &str = "Q.850;cause=102;text=\"No ACK for the 2xx\"";

/// When to offer a leg its session again after `refusal`, if ever: a 491
/// crossed a re-INVITE of the leg's own, and RFC 3261 §14.1 has the owner
/// of the Call-ID (the PBX, on the B leg) wait 2.1 to 4 s and the other
/// side 0 to 2 s, so that the two do not cross again; a 500 or 503 with a
/// short Retry-After came while the leg was busy. Anything else is final.
fn restore_retry(refusal: &Message, side: LegSide) -> Option<Duration> {
    match refusal.code()? {
        491 => {
            let tens_of_ms = match side {
                LegSide::A => rand::random_range(0..=200),
                LegSide::B => rand::random_range(210..=400),
            };
            Some(Duration::from_millis(10 * tens_of_ms))
        }
        500 | 503 => {
            let seconds = delta_seconds(refusal.headers.get("Retry-After")?)?;
            Some(Duration::from_secs(seconds.into())).filter(|&d| d <= RESTORE_RETRY_AFTER_LIMIT)
        }
        _ => None,
    }
}

fn outcome(code: u16, end_reason: Option<EndReason>) -> Outcome {
    let disposition = if end_reason.is_some() && code == 200 {
        Disposition::Answered
    } else {
        disposition_for(code)
    };
    Outcome {
        disposition,
        sip_code: code,
        end_reason,
    }
}

/// Methods whose bodies take part in the SDP offer/answer (RFC 3264, 3311,
/// 3262).
fn carries_offer_answer(method: &Method) -> bool {
    matches!(method, Method::Invite | Method::Update | Method::Prack)
}

fn media_error_code(error: &MediaError) -> u16 {
    match error {
        MediaError::PoolExhausted | MediaError::OutOfFiles => 503,
        MediaError::NoCommonCodec => 488,
        MediaError::BadSdp(_) => 400,
        MediaError::Released(_) => 481,
    }
}

fn strip_tag(name: &NameAddr) -> NameAddr {
    let mut n = name.clone();
    n.params.retain(|p| !p.name.eq_ignore_ascii_case("tag"));
    n
}

/// Our Contact for a leg on `protocol`.
fn contact(txl: &TransactionLayer, protocol: Protocol) -> String {
    let local = txl.local();
    let mut uri = SipUri::new(Some("pbx"), local.host.clone(), Some(local.port));
    if protocol == Protocol::Tcp {
        uri.params.push(crate::sip::uri::Param {
            name: "transport".into(),
            value: Some("tcp".into()),
        });
    }
    format!("<{uri}>")
}

/// The B leg's dialog towards `target`: its own Call-ID and tags, the
/// caller as From, and as To the dialled user for a registered phone or
/// the route's target.
fn b_dialog(call: &Call, target: &Target, txl: &TransactionLayer) -> Dialog {
    let mut from = call.a.remote.clone();
    from.params.clear();
    let to = if target.registered {
        call.a.local.clone()
    } else {
        let mut uri = target.uri.clone();
        uri.params.clear();
        NameAddr::new(Uri::Sip(uri))
    };
    Dialog {
        call_id: format!("{}@{}", token(), txl.local().host),
        local_tag: token(),
        remote_tag: None,
        local: from,
        remote: to,
        local_seq: 0,
        invite_seq: 0,
        remote_target: Uri::Sip(target.uri.clone()),
        route_set: Vec::new(),
        peer: target.peer,
        contact: contact(txl, target.peer.protocol),
    }
}

/// The B leg's response to the INVITE, as the caller gets it: same code
/// and reason, the headers worth relaying, and our Contact (the callee's
/// for a redirect).
fn to_caller(call: &Call, response: &Message) -> Message {
    let code = response.code().unwrap_or(500);
    let mut relayed = Message::response_to(&call.a_invite, code, Some(&call.a.local_tag));
    if let StartLine::Response { reason, .. } = &response.start {
        relayed.start = StartLine::Response {
            code,
            reason: reason.clone(),
        };
    }
    copy_headers(response, &mut relayed, &RESPONSE_HEADERS);
    if code < 300 {
        relayed.headers.push("Contact", call.a.contact.clone());
    } else if code < 400 {
        for contact in response.headers.get_all("Contact") {
            relayed.headers.push("Contact", contact);
        }
    }
    relayed
}

/// A provisional or 2xx response of the B leg's INVITE for the caller,
/// with `sdp` (the answer to the caller's offer, or an offer: the
/// response's own, or for a 2xx the answer its fork gave earlier) through
/// the media; an error when that SDP cannot be relayed.
fn callee_response_to_caller(
    media: &mut dyn SessionMedia,
    call: &mut Call,
    response: &Message,
    sdp: Option<Bytes>,
) -> Result<Message, MediaError> {
    let mut relayed = to_caller(call, response);
    if let Some(sdp) = sdp {
        let code = response.code().unwrap_or(500);
        let role = call.response_sdp_role(LegSide::B, code, call.a_invite.sdp().is_some());
        let body = media.relay_sdp(call.media, LegSide::B, role, sdp)?;
        relayed.set_body(Some("application/sdp"), body);
    }
    Ok(relayed)
}

/// The Reason header values (RFC 3326) of a BYE or CANCEL, as one list,
/// to pass on why a leg ended: a gateway's Q.850 cause, say.
fn reasons(request: &Message) -> Option<String> {
    let values: Vec<&str> = request.headers.get_all("Reason").collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn copy_headers(from: &Message, to: &mut Message, names: &[&str]) {
    for name in names {
        for value in from.headers.get_all(name) {
            to.headers.push(*name, value);
        }
    }
}

fn reply(txl: &mut TransactionLayer, tx: TxId, request: &Message, code: u16, now: Instant) {
    let response = Message::response_to(request, code, Some(&token()));
    txl.respond(tx, &response, now);
}

fn refuse(txl: &mut TransactionLayer, tx: TxId, request: &Message, refusal: Refusal, now: Instant) {
    let mut response = Message::response_to(request, refusal.code, Some(&token()));
    for (name, value) in refusal.headers {
        response.headers.push(name, value);
    }
    txl.respond(tx, &response, now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::parse_datagram;

    fn refusal(status: &str, extra: &str) -> Message {
        let text = format!(
            "SIP/2.0 {status}\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 2 INVITE\r\n{extra}\r\n"
        );
        parse_datagram(text.as_bytes()).expect("framed").message
    }

    #[test]
    fn a_refused_restoring_offer_is_retried_only_after_glare_or_a_short_wait() {
        let glare = refusal("491 Request Pending", "");
        for _ in 0..50 {
            let owner = restore_retry(&glare, LegSide::B).expect("retried");
            assert!((Duration::from_millis(2100)..=Duration::from_secs(4)).contains(&owner));
            let other = restore_retry(&glare, LegSide::A).expect("retried");
            assert!(other <= Duration::from_secs(2));
        }
        let busy = refusal("500 Server Internal Error", "Retry-After: 3 (busy)\r\n");
        assert_eq!(
            restore_retry(&busy, LegSide::B),
            Some(Duration::from_secs(3))
        );
        for (status, extra) in [
            ("500 Server Internal Error", ""),
            ("503 Service Unavailable", "Retry-After: 3600\r\n"),
            ("488 Not Acceptable Here", "Retry-After: 1\r\n"),
            ("481 Call/Transaction Does Not Exist", ""),
        ] {
            let refused = refusal(status, extra);
            assert_eq!(restore_retry(&refused, LegSide::B), None, "{status}");
        }
    }
}
