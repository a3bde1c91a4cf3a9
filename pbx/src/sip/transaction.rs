//! The transaction layer of RFC 3261 §17 (with RFC 6026's Accepted states),
//! written without I/O: messages come in with the time, and what must be
//! sent and what the transaction user (the B2BUA) must hear come out. Over
//! UDP it retransmits (Timers A, E, G and 2xx), absorbs retransmissions,
//! and times out (B, F, H, L); over TCP it only keeps the state.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::message::{CSeq, Message, Method, StartLine, BRANCH_COOKIE};
use super::timer::TimerQueue;
use super::transport::{Outbound, Peer};
use super::uri::Host;

pub type TxId = u64;

/// What the transaction layer tells its user.
#[derive(Debug)]
pub enum TuEvent {
    /// A new request (other than ACK and CANCEL) in a new server transaction.
    Request {
        tx: TxId,
        request: Message,
        peer: Peer,
    },
    /// A CANCEL, with the INVITE server transaction it cancels if any.
    Cancel {
        tx: TxId,
        request: Message,
        peer: Peer,
        invite: Option<TxId>,
    },
    /// An ACK for a 2xx: it belongs to the dialog, not to a transaction.
    Ack { request: Message, peer: Peer },
    /// A response to one of our requests; 2xx to INVITE may repeat.
    Response { tx: TxId, response: Message },
    /// Our request got no final response in time (Timer B or F).
    Timeout { tx: TxId },
    /// Our 2xx to an INVITE was never acknowledged (64*T1).
    AckTimeout { tx: TxId },
}

/// RFC 3261 timer values.
#[derive(Debug, Clone, Copy)]
pub struct TimerValues {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl TimerValues {
    pub fn from_t1(t1: Duration) -> Self {
        Self {
            t1,
            t2: Duration::from_secs(4).max(t1 * 2),
            t4: Duration::from_secs(5).max(t1 * 2),
        }
    }

    /// 64*T1: how long a transaction may last.
    pub fn timeout(&self) -> Duration {
        self.t1 * 64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Retransmit a request (A, E) or a response (G, 2xx).
    Retransmit,
    /// Give up waiting (B, F, H, L).
    Timeout,
    /// Leave a finished state (D, I, J, K, M).
    Linger,
    /// A cancelled INVITE still has no final response (RFC 3261 §9.1).
    CancelGiveUp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TxKey {
    /// RFC 3261 §17.2.3: branch, sent-by and method (ACK as INVITE).
    Branch {
        branch: String,
        sent_by: String,
        method: String,
    },
    /// RFC 2543 fallback for requests without a z9hG4bK branch.
    Legacy {
        call_id: String,
        from_tag: String,
        cseq: u32,
        via: String,
        method: String,
    },
}

fn key_method(method: &Method) -> String {
    match method {
        Method::Ack => "INVITE".into(),
        m => m.as_str().to_string(),
    }
}

fn server_key(request: &Message, method: &Method) -> Option<TxKey> {
    let via = request.top_via()?;
    let sent_by = format!("{}:{}", via.host, via.port.unwrap_or(5060));
    if let Some(branch) = via.rfc3261_branch() {
        return Some(TxKey::Branch {
            branch: branch.to_string(),
            sent_by,
            method: key_method(method),
        });
    }
    Some(TxKey::Legacy {
        call_id: request.call_id()?.to_string(),
        from_tag: request.from_tag().unwrap_or_default(),
        cseq: request.cseq()?.seq,
        via: format!("{sent_by};{}", via.branch().unwrap_or_default()),
        method: key_method(method),
    })
}

fn client_key(branch: &str, method: &Method) -> TxKey {
    TxKey::Branch {
        branch: branch.to_string(),
        sent_by: String::new(),
        method: method.as_str().to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Request received or sent, nothing final yet.
    Proceeding,
    /// Client: request sent, no response at all yet.
    Calling,
    /// INVITE 2xx sent or received (RFC 6026).
    Accepted,
    /// Final non-2xx sent or received.
    Completed,
    /// Server INVITE: ACK for the non-2xx arrived.
    Confirmed,
}

#[derive(Debug)]
struct ServerTx {
    key: TxKey,
    invite: bool,
    state: State,
    peer: Peer,
    last_response: Option<Bytes>,
    interval: Duration,
    acked: bool,
}

#[derive(Debug)]
struct ClientTx {
    key: TxKey,
    invite: bool,
    state: State,
    peer: Peer,
    request: Message,
    wire: Bytes,
    interval: Duration,
    cancel: Option<Cancel>,
}

/// The CANCEL of a client INVITE transaction.
#[derive(Debug)]
enum Cancel {
    /// Waits for a provisional response: sent earlier, it could overtake
    /// the INVITE and be answered 481 (RFC 3261 §9.1).
    Deferred(Box<Message>),
    Sent,
}

/// Where our own Via and Contact point: the advertised address and port.
#[derive(Debug, Clone)]
pub struct LocalAddress {
    pub host: Host,
    pub port: u16,
}

pub struct TransactionLayer {
    local: LocalAddress,
    timers: TimerValues,
    server: HashMap<TxId, ServerTx>,
    client: HashMap<TxId, ClientTx>,
    by_key: HashMap<TxKey, TxId>,
    queue: TimerQueue<(TxId, Timer)>,
    next_id: TxId,
    branch_salt: u64,
    outbox: Vec<Outbound>,
    events: Vec<TuEvent>,
}

impl TransactionLayer {
    pub fn new(local: LocalAddress, timers: TimerValues) -> Self {
        Self {
            local,
            timers,
            server: HashMap::new(),
            client: HashMap::new(),
            by_key: HashMap::new(),
            queue: TimerQueue::default(),
            next_id: 0,
            branch_salt: rand::random::<u64>() >> 16,
            outbox: Vec::new(),
            events: Vec::new(),
        }
    }

    pub fn local(&self) -> &LocalAddress {
        &self.local
    }

    /// Live transactions, for metrics.
    pub fn len(&self) -> usize {
        self.server.len() + self.client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn take_outbox(&mut self) -> Vec<Outbound> {
        std::mem::take(&mut self.outbox)
    }

    pub fn take_events(&mut self) -> Vec<TuEvent> {
        std::mem::take(&mut self.events)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.next_deadline()
    }

    fn new_id(&mut self) -> TxId {
        self.next_id += 1;
        self.next_id
    }

    /// A fresh RFC 3261 branch, unique to this process.
    pub fn new_branch(&mut self) -> String {
        self.next_id += 1;
        format!("{BRANCH_COOKIE}{:x}.{:x}", self.branch_salt, self.next_id)
    }

    /// Whether `branch` was made by this process (loop detection).
    pub fn is_own_branch(&self, branch: &str) -> bool {
        branch
            .strip_prefix(BRANCH_COOKIE)
            .and_then(|b| b.split_once('.'))
            .is_some_and(|(salt, _)| salt == format!("{:x}", self.branch_salt))
    }

    fn send(&mut self, peer: Peer, data: Bytes) {
        self.outbox.push(Outbound { peer, data });
    }

    /// A request from the network (already framed and checked).
    pub fn on_request(&mut self, request: Message, peer: Peer, now: Instant) {
        let Some(method) = request.method().cloned() else {
            return;
        };
        let Some(key) = server_key(&request, &method) else {
            return;
        };
        if let Some(&id) = self.by_key.get(&key) {
            self.absorb(id, &method, request, peer, now);
            return;
        }
        match method {
            Method::Ack => self.events.push(TuEvent::Ack { request, peer }),
            _ => {
                let invite = method == Method::Invite;
                let response_peer = response_destination(&request, peer);
                let id = self.new_id();
                self.by_key.insert(key.clone(), id);
                self.server.insert(
                    id,
                    ServerTx {
                        key,
                        invite,
                        state: State::Proceeding,
                        peer: response_peer,
                        last_response: None,
                        interval: self.timers.t1,
                        acked: false,
                    },
                );
                if invite {
                    // RFC 3261 §17.2.1: stop the caller's retransmissions now.
                    let trying = Message::response_to(&request, 100, None);
                    self.respond(id, &trying, now);
                }
                let event = if method == Method::Cancel {
                    let invite = server_key(&request, &Method::Invite)
                        .and_then(|k| self.by_key.get(&k).copied())
                        .filter(|i| self.server.get(i).is_some_and(|t| t.invite));
                    TuEvent::Cancel {
                        tx: id,
                        request,
                        peer,
                        invite,
                    }
                } else {
                    TuEvent::Request {
                        tx: id,
                        request,
                        peer,
                    }
                };
                self.events.push(event);
            }
        }
    }

    /// A retransmission or an ACK matching an existing server transaction.
    fn absorb(&mut self, id: TxId, method: &Method, request: Message, peer: Peer, now: Instant) {
        let Some(tx) = self.server.get_mut(&id) else {
            return;
        };
        if *method == Method::Ack {
            match tx.state {
                State::Completed => {
                    tx.state = State::Confirmed;
                    let linger = if tx.peer.reliable() {
                        Duration::ZERO
                    } else {
                        self.timers.t4
                    };
                    self.queue.schedule(now + linger, (id, Timer::Linger));
                }
                // RFC 2543 peers reuse the INVITE's branch for a 2xx ACK.
                State::Accepted => self.events.push(TuEvent::Ack { request, peer }),
                _ => {}
            }
            return;
        }
        if let Some(last) = tx.last_response.clone() {
            let to = tx.peer;
            self.send(to, last);
        }
    }

    /// Sends a response in server transaction `tx`.
    pub fn respond(&mut self, id: TxId, response: &Message, now: Instant) {
        let Some(tx) = self.server.get_mut(&id) else {
            return;
        };
        let code = response.code().unwrap_or(500);
        if matches!(tx.state, State::Completed | State::Confirmed) {
            return;
        }
        // A 2xx may be sent once more when a reliable provisional precedes it.
        if tx.state == State::Accepted && code >= 200 {
            return;
        }
        let wire = response.to_bytes();
        tx.last_response = Some(wire.clone());
        let peer = tx.peer;
        let unreliable = !peer.reliable();
        if code >= 200 {
            let interval = self.timers.t1;
            tx.interval = interval;
            if tx.invite && code < 300 {
                tx.state = State::Accepted;
                if unreliable {
                    self.queue.schedule(now + interval, (id, Timer::Retransmit));
                }
                self.queue
                    .schedule(now + self.timers.timeout(), (id, Timer::Timeout));
            } else if tx.invite {
                tx.state = State::Completed;
                if unreliable {
                    self.queue.schedule(now + interval, (id, Timer::Retransmit));
                }
                self.queue
                    .schedule(now + self.timers.timeout(), (id, Timer::Timeout));
            } else {
                tx.state = State::Completed;
                let linger = if unreliable {
                    self.timers.timeout()
                } else {
                    Duration::ZERO
                };
                self.queue.schedule(now + linger, (id, Timer::Linger));
            }
        }
        self.send(peer, wire);
    }

    /// The dialog saw the ACK for the 2xx sent in `tx`: stop resending it.
    pub fn ack_received(&mut self, id: TxId) {
        if let Some(tx) = self.server.get_mut(&id) {
            tx.acked = true;
        }
    }

    /// Sends `request` to `peer` in a new client transaction; adds our Via.
    pub fn send_request(&mut self, mut request: Message, peer: Peer, now: Instant) -> TxId {
        let branch = self.new_branch();
        request.headers.push_front("Via", self.via(peer, &branch));
        self.start_client(request, branch, peer, now)
    }

    fn start_client(&mut self, request: Message, branch: String, peer: Peer, now: Instant) -> TxId {
        let method = request.method().cloned().unwrap_or(Method::Options);
        let invite = method == Method::Invite;
        let id = self.new_id();
        let key = client_key(&branch, &method);
        let wire = request.to_bytes();
        self.by_key.insert(key.clone(), id);
        if !peer.reliable() {
            self.queue
                .schedule(now + self.timers.t1, (id, Timer::Retransmit));
        }
        self.queue
            .schedule(now + self.timers.timeout(), (id, Timer::Timeout));
        self.client.insert(
            id,
            ClientTx {
                key,
                invite,
                state: State::Calling,
                peer,
                request,
                wire: wire.clone(),
                interval: self.timers.t1,
                cancel: None,
            },
        );
        self.send(peer, wire);
        id
    }

    /// Our Via for a request to `peer`.
    fn via(&self, peer: Peer, branch: &str) -> String {
        format!(
            "SIP/2.0/{} {}:{};branch={branch};rport",
            peer.protocol.via_name(),
            self.local.host,
            self.local.port
        )
    }

    /// CANCELs the INVITE of client transaction `invite` (RFC 3261 §9.1),
    /// with `reason` as its Reason header (RFC 3326). Before any provisional
    /// response the CANCEL waits for one; once sent, an INVITE still without
    /// a final response after 64*T1 is given up.
    pub fn cancel(&mut self, invite: TxId, reason: Option<&str>, now: Instant) {
        let Some(tx) = self.client.get_mut(&invite) else {
            return;
        };
        if !tx.invite || tx.cancel.is_some() {
            return;
        }
        let Some(cancel) = cancel_request(&tx.request, reason) else {
            return;
        };
        match tx.state {
            State::Calling => tx.cancel = Some(Cancel::Deferred(Box::new(cancel))),
            State::Proceeding => self.send_cancel(invite, cancel, now),
            _ => {}
        }
    }

    fn send_cancel(&mut self, invite: TxId, cancel: Message, now: Instant) {
        let Some(tx) = self.client.get_mut(&invite) else {
            return;
        };
        tx.cancel = Some(Cancel::Sent);
        let peer = tx.peer;
        let Some(branch) = cancel
            .top_via()
            .and_then(|v| v.branch().map(str::to_string))
        else {
            return;
        };
        self.start_client(cancel, branch, peer, now);
        self.queue
            .schedule(now + self.timers.timeout(), (invite, Timer::CancelGiveUp));
    }

    /// Sends an ACK for a 2xx (a request outside any transaction).
    pub fn send_ack(&mut self, mut ack: Message, peer: Peer) -> Bytes {
        let branch = self.new_branch();
        ack.headers.push_front("Via", self.via(peer, &branch));
        let wire = ack.to_bytes();
        self.send(peer, wire.clone());
        wire
    }

    /// Sends bytes built earlier (an ACK resent for a repeated 2xx).
    pub fn resend(&mut self, peer: Peer, wire: Bytes) {
        self.send(peer, wire);
    }

    /// Sends a response without a transaction (e.g. 400 to a broken request).
    pub fn respond_stateless(&mut self, request: &Message, response: &Message, peer: Peer) {
        let to = response_destination(request, peer);
        self.send(to, response.to_bytes());
    }

    /// A response from the network.
    pub fn on_response(&mut self, response: Message, now: Instant) {
        let (Some(via), Some(cseq), Some(code)) =
            (response.top_via(), response.cseq(), response.code())
        else {
            return;
        };
        let Some(branch) = via.branch() else {
            return;
        };
        let key = client_key(branch, &cseq.method);
        let Some(&id) = self.by_key.get(&key) else {
            return;
        };
        let Some(tx) = self.client.get_mut(&id) else {
            return;
        };
        match (tx.state, code) {
            (State::Calling | State::Proceeding, 100..=199) => {
                tx.state = State::Proceeding;
                let deferred = match tx.cancel.take() {
                    Some(Cancel::Deferred(cancel)) => Some(*cancel),
                    other => {
                        tx.cancel = other;
                        None
                    }
                };
                if tx.invite {
                    // Timer B only guards the Calling state.
                    tx.interval = Duration::MAX;
                } else {
                    tx.interval = self.timers.t2;
                }
                if code > 100 || !tx.invite {
                    self.events.push(TuEvent::Response { tx: id, response });
                }
                if let Some(cancel) = deferred {
                    self.send_cancel(id, cancel, now);
                }
            }
            (State::Calling | State::Proceeding, 200..=299) if tx.invite => {
                tx.state = State::Accepted;
                self.queue
                    .schedule(now + self.timers.timeout(), (id, Timer::Linger));
                self.events.push(TuEvent::Response { tx: id, response });
            }
            (State::Accepted, 200..=299) => {
                self.events.push(TuEvent::Response { tx: id, response });
            }
            (State::Calling | State::Proceeding, _) => {
                tx.state = State::Completed;
                let linger = if tx.peer.reliable() {
                    Duration::ZERO
                } else if tx.invite {
                    Duration::from_secs(32)
                } else {
                    self.timers.t4
                };
                self.queue.schedule(now + linger, (id, Timer::Linger));
                if tx.invite {
                    let ack = non_2xx_ack(&tx.request, &response);
                    let peer = tx.peer;
                    self.send(peer, ack);
                }
                self.events.push(TuEvent::Response { tx: id, response });
            }
            (State::Completed, 300..) if tx.invite => {
                let ack = non_2xx_ack(&tx.request, &response);
                let peer = tx.peer;
                self.send(peer, ack);
            }
            _ => {}
        }
    }

    /// Fires every timer due at `now`.
    pub fn on_timers(&mut self, now: Instant) {
        while let Some((id, timer)) = self.queue.pop_due(now) {
            if self.server.contains_key(&id) {
                self.server_timer(id, timer, now);
            } else if self.client.contains_key(&id) {
                self.client_timer(id, timer, now);
            }
        }
    }

    fn server_timer(&mut self, id: TxId, timer: Timer, now: Instant) {
        let Some(tx) = self.server.get_mut(&id) else {
            return;
        };
        match (timer, tx.state) {
            (Timer::Retransmit, State::Completed) | (Timer::Retransmit, State::Accepted)
                if !tx.acked =>
            {
                tx.interval = (tx.interval * 2).min(self.timers.t2);
                let next = now + tx.interval;
                let (peer, last) = (tx.peer, tx.last_response.clone());
                if let Some(last) = last {
                    self.send(peer, last);
                }
                self.queue.schedule(next, (id, Timer::Retransmit));
            }
            (Timer::Timeout, State::Accepted) => {
                let acked = tx.acked;
                self.remove_server(id);
                if !acked {
                    self.events.push(TuEvent::AckTimeout { tx: id });
                }
            }
            (Timer::Timeout, State::Completed) | (Timer::Linger, _) => self.remove_server(id),
            _ => {}
        }
    }

    fn client_timer(&mut self, id: TxId, timer: Timer, now: Instant) {
        let Some(tx) = self.client.get_mut(&id) else {
            return;
        };
        match (timer, tx.state) {
            (Timer::Retransmit, State::Calling | State::Proceeding)
                if tx.interval != Duration::MAX =>
            {
                let cap = if tx.invite {
                    Duration::MAX
                } else {
                    self.timers.t2
                };
                tx.interval = (tx.interval * 2).min(cap);
                let next = now + tx.interval;
                let (peer, wire) = (tx.peer, tx.wire.clone());
                self.send(peer, wire);
                self.queue.schedule(next, (id, Timer::Retransmit));
            }
            (Timer::Timeout, State::Calling) | (Timer::Timeout, State::Proceeding)
                if !tx.invite || tx.state == State::Calling =>
            {
                self.remove_client(id);
                self.events.push(TuEvent::Timeout { tx: id });
            }
            (Timer::Linger, State::Completed | State::Accepted) => self.remove_client(id),
            (Timer::CancelGiveUp, State::Proceeding) => self.remove_client(id),
            _ => {}
        }
    }

    fn remove_server(&mut self, id: TxId) {
        if let Some(tx) = self.server.remove(&id) {
            self.by_key.remove(&tx.key);
        }
    }

    fn remove_client(&mut self, id: TxId) {
        if let Some(tx) = self.client.remove(&id) {
            self.by_key.remove(&tx.key);
        }
    }
}

/// RFC 3261 §18.2.2 with RFC 3581: where responses to `request` go.
pub fn response_destination(request: &Message, source: Peer) -> Peer {
    if source.reliable() {
        return source;
    }
    let Some(via) = request.top_via() else {
        return source;
    };
    if via.param("rport").is_some() {
        return source;
    }
    let ip = via
        .param("received")
        .and_then(|p| p.value.as_deref())
        .and_then(|v| v.parse().ok())
        .or_else(|| via.host.ip())
        .unwrap_or(source.addr.ip());
    Peer {
        addr: std::net::SocketAddr::new(ip, via.port.unwrap_or(5060)),
        protocol: source.protocol,
    }
}

/// The CANCEL of `invite` (RFC 3261 §9.1): its Request-URI, top Via,
/// Route, From, To, Call-ID and CSeq number.
fn cancel_request(invite: &Message, reason: Option<&str>) -> Option<Message> {
    let mut cancel = Message::request(Method::Cancel, invite.request_uri()?.clone());
    cancel.headers.push("Via", invite.headers.get("Via")?);
    for name in ["Route", "From", "To", "Call-ID"] {
        for value in invite.headers.get_all(name) {
            cancel.headers.push(name, value);
        }
    }
    let seq = invite.cseq()?.seq;
    cancel.headers.push(
        "CSeq",
        CSeq {
            seq,
            method: Method::Cancel,
        }
        .to_string(),
    );
    cancel.headers.push("Max-Forwards", "70");
    if let Some(reason) = reason {
        cancel.headers.push("Reason", reason);
    }
    Some(cancel)
}

/// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3).
fn non_2xx_ack(request: &Message, response: &Message) -> Bytes {
    let StartLine::Request { uri, .. } = &request.start else {
        return Bytes::new();
    };
    let mut ack = Message::request(Method::Ack, uri.clone());
    if let Some(via) = request.headers.get("Via") {
        ack.headers.push("Via", via);
    }
    for name in ["Route", "From", "Call-ID"] {
        for value in request.headers.get_all(name) {
            ack.headers.push(name, value);
        }
    }
    if let Some(to) = response.headers.get("To") {
        ack.headers.push("To", to);
    }
    if let Some(cseq) = request.cseq() {
        ack.headers.push(
            "CSeq",
            CSeq {
                seq: cseq.seq,
                method: Method::Ack,
            }
            .to_string(),
        );
    }
    ack.headers.push("Max-Forwards", "70");
    ack.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::parse_datagram;
    use crate::sip::transport::Protocol;

    fn layer() -> TransactionLayer {
        TransactionLayer::new(
            LocalAddress {
                host: Host::Ip("127.0.0.1".parse().unwrap()),
                port: 5060,
            },
            TimerValues::from_t1(Duration::from_millis(500)),
        )
    }

    fn peer() -> Peer {
        Peer {
            addr: "127.0.0.1:5070".parse().unwrap(),
            protocol: Protocol::Udp,
        }
    }

    fn msg(text: &str) -> Message {
        let parsed = parse_datagram(text.replace('\n', "\r\n").as_bytes()).expect("framed");
        assert!(parsed.defect.is_none(), "{:?}", parsed.defect);
        parsed.message
    }

    fn invite(branch: &str) -> Message {
        msg(&format!(
            "INVITE sip:bob@127.0.0.1 SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\nFrom: <sip:a@x>;tag=1\nTo: <sip:bob@x>\nCall-ID: c1\nCSeq: 1 INVITE\nMax-Forwards: 70\n\n"
        ))
    }

    fn codes(out: &[Outbound]) -> Vec<String> {
        out.iter()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.data);
                text.lines().next().unwrap_or_default().to_string()
            })
            .collect()
    }

    #[test]
    fn invite_gets_100_and_retransmissions_are_absorbed() {
        let mut txl = layer();
        let now = Instant::now();
        txl.on_request(invite("z9hG4bKa"), peer(), now);
        assert_eq!(codes(&txl.take_outbox()), vec!["SIP/2.0 100 Trying"]);
        assert_eq!(txl.take_events().len(), 1);
        txl.on_request(invite("z9hG4bKa"), peer(), now);
        assert_eq!(codes(&txl.take_outbox()), vec!["SIP/2.0 100 Trying"]);
        assert!(
            txl.take_events().is_empty(),
            "a retransmission is not a new call"
        );
    }

    #[test]
    fn non_2xx_final_is_retransmitted_until_ack_then_lingers() {
        let mut txl = layer();
        let t0 = Instant::now();
        let req = invite("z9hG4bKb");
        txl.on_request(req.clone(), peer(), t0);
        let Some(TuEvent::Request { tx, .. }) = txl.take_events().pop() else {
            panic!("no request event");
        };
        txl.take_outbox();
        txl.respond(tx, &Message::response_to(&req, 486, Some("t")), t0);
        assert_eq!(codes(&txl.take_outbox()), vec!["SIP/2.0 486 Busy Here"]);
        txl.on_timers(t0 + Duration::from_millis(500));
        assert_eq!(
            codes(&txl.take_outbox()),
            vec!["SIP/2.0 486 Busy Here"],
            "Timer G"
        );
        let ack = msg("ACK sip:bob@127.0.0.1 SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKb\nFrom: <sip:a@x>;tag=1\nTo: <sip:bob@x>;tag=t\nCall-ID: c1\nCSeq: 1 ACK\n\n");
        txl.on_request(ack, peer(), t0 + Duration::from_millis(600));
        assert!(txl.take_events().is_empty(), "ACK of a non-2xx is absorbed");
        txl.on_timers(t0 + Duration::from_secs(2));
        assert!(txl.take_outbox().is_empty(), "no retransmission after ACK");
        txl.on_timers(t0 + Duration::from_secs(40));
        assert!(txl.is_empty());
    }

    #[test]
    fn unacknowledged_2xx_is_resent_then_reported() {
        let mut txl = layer();
        let t0 = Instant::now();
        let req = invite("z9hG4bKc");
        txl.on_request(req.clone(), peer(), t0);
        let Some(TuEvent::Request { tx, .. }) = txl.take_events().pop() else {
            panic!("no request event");
        };
        txl.respond(tx, &Message::response_to(&req, 200, Some("t")), t0);
        txl.take_outbox();
        let mut resent = 0;
        let mut t = t0;
        while t < t0 + Duration::from_secs(33) {
            t += Duration::from_millis(250);
            txl.on_timers(t);
            resent += txl.take_outbox().len();
        }
        assert!((6..=12).contains(&resent), "resent {resent} times");
        assert!(matches!(
            txl.take_events().as_slice(),
            [TuEvent::AckTimeout { .. }]
        ));
    }

    #[test]
    fn client_invite_times_out_with_timer_b_and_acks_failures() {
        let mut txl = layer();
        let t0 = Instant::now();
        let mut req = invite("unused");
        req.headers.remove("Via");
        let tx = txl.send_request(req.clone(), peer(), t0);
        assert_eq!(txl.take_outbox().len(), 1);
        txl.on_timers(t0 + Duration::from_millis(500));
        assert_eq!(txl.take_outbox().len(), 1, "Timer A");
        txl.on_timers(t0 + Duration::from_secs(32));
        assert!(matches!(txl.take_events().as_slice(), [TuEvent::Timeout { tx: t }] if *t == tx));
        txl.take_outbox();

        let tx = txl.send_request(req, peer(), t0);
        let sent = txl.take_outbox().remove(0).data;
        let sent = parse_datagram(&sent).expect("ours").message;
        let mut busy = Message::response_to(&sent, 486, Some("b"));
        busy.headers
            .set("Via", sent.headers.get("Via").unwrap_or_default());
        txl.on_response(busy.clone(), t0);
        assert_eq!(
            codes(&txl.take_outbox()),
            vec![format!("ACK sip:bob@127.0.0.1 SIP/2.0")]
        );
        assert!(
            matches!(txl.take_events().as_slice(), [TuEvent::Response { tx: t, .. }] if *t == tx)
        );
        txl.on_response(busy, t0);
        assert_eq!(
            txl.take_outbox().len(),
            1,
            "a repeated final is ACKed again"
        );
        assert!(txl.take_events().is_empty());
    }

    #[test]
    fn cancel_waits_for_a_provisional_then_gives_the_invite_up() {
        let mut txl = layer();
        let t0 = Instant::now();
        let mut req = invite("unused");
        req.headers.remove("Via");
        let tx = txl.send_request(req, peer(), t0);
        let sent = parse_datagram(&txl.take_outbox().remove(0).data)
            .expect("ours")
            .message;
        txl.cancel(tx, Some("SIP;cause=200"), t0);
        assert!(txl.take_outbox().is_empty(), "no CANCEL before a 1xx");
        let mut trying = Message::response_to(&sent, 100, None);
        trying
            .headers
            .set("Via", sent.headers.get("Via").unwrap_or_default());
        txl.on_response(trying, t0 + Duration::from_millis(100));
        let out = txl.take_outbox();
        assert_eq!(codes(&out), vec!["CANCEL sip:bob@127.0.0.1 SIP/2.0"]);
        let cancel = parse_datagram(&out[0].data).expect("ours").message;
        assert_eq!(
            cancel.top_via(),
            sent.top_via(),
            "same branch as the INVITE"
        );
        assert_eq!(cancel.headers.get("Reason"), Some("SIP;cause=200"));
        txl.cancel(tx, None, t0 + Duration::from_millis(200));
        assert!(txl.take_outbox().is_empty(), "one CANCEL per INVITE");
        txl.on_timers(t0 + Duration::from_secs(40));
        assert!(
            !txl.client.contains_key(&tx),
            "an INVITE never answered after its CANCEL is given up"
        );
    }

    #[test]
    fn cancel_matches_its_invite() {
        let mut txl = layer();
        let t0 = Instant::now();
        txl.on_request(invite("z9hG4bKd"), peer(), t0);
        let Some(TuEvent::Request { tx: invite_tx, .. }) = txl.take_events().pop() else {
            panic!("no request event");
        };
        let cancel = msg("CANCEL sip:bob@127.0.0.1 SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKd\nFrom: <sip:a@x>;tag=1\nTo: <sip:bob@x>\nCall-ID: c1\nCSeq: 1 CANCEL\n\n");
        txl.on_request(cancel, peer(), t0);
        assert!(matches!(
            txl.take_events().as_slice(),
            [TuEvent::Cancel { invite: Some(i), .. }] if *i == invite_tx
        ));
    }

    #[test]
    fn responses_follow_rport_and_received() {
        let src = Peer {
            addr: "192.0.2.9:40000".parse().unwrap(),
            protocol: Protocol::Udp,
        };
        let with_rport = msg("OPTIONS sip:x@y SIP/2.0\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport\nFrom: <sip:a@x>;tag=1\nTo: <sip:b@x>\nCall-ID: c\nCSeq: 1 OPTIONS\n\n");
        assert_eq!(response_destination(&with_rport, src).addr, src.addr);
        let without = msg("OPTIONS sip:x@y SIP/2.0\nVia: SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK1;received=192.0.2.9\nFrom: <sip:a@x>;tag=1\nTo: <sip:b@x>\nCall-ID: c\nCSeq: 1 OPTIONS\n\n");
        assert_eq!(
            response_destination(&without, src).addr,
            "192.0.2.9:5062".parse().unwrap()
        );
    }
}
