//! `media.mode: bypass`: the `SessionMedia` the B2BUA uses when RTP flows
//! through the PBX. It owns the calls' media bookkeeping on the signalling
//! side (which m-line uses which ports, where each leg said to send, the
//! settled codec, the SDP the PBX has sent each leg) and drives the relay
//! threads with quick, non-blocking commands.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;

use super::port_pool::PortPool;
use super::relay::{Counters, Latch, MediaCounters, Relay, Remote};
use super::sdp::{self, Action, Description, Direction, Origin, Stream};
use super::{LegSide, MediaError, MediaEvent, MediaSessionId, SdpRole, SessionMedia};
use crate::config::MediaConfig;
use crate::status::PbxStatus;

/// Descriptors kept for everything but media sockets: SIP sockets and
/// TCP connections, files, the relay's eventfds and rings.
const RESERVED_FILES: usize = 256;

/// The relay as the B2BUA sees it.
#[derive(Debug)]
pub struct RelayMedia {
    codecs: Vec<String>,
    advertised: IpAddr,
    pool: Arc<PortPool>,
    relay: Relay,
    next: u64,
    sessions: HashMap<MediaSessionId, Session>,
    stats: MediaStats,
}

/// The relay's figures, readable from anywhere (metrics, HTTP, CDR) while
/// the B2BUA owns the `RelayMedia`.
#[derive(Debug, Clone)]
pub struct MediaStats {
    packets: Arc<AtomicU64>,
    sessions: Arc<Mutex<HashMap<MediaSessionId, Arc<Counters>>>>,
}

impl MediaStats {
    /// Packets relayed since start, for `sip_pbx_media_packets_total`.
    pub fn packets_total(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }

    /// Packets and bytes a call relayed so far; `None` once it is closed,
    /// so read it for the CDR before `close`.
    pub fn counters(&self, session: MediaSessionId) -> Option<MediaCounters> {
        self.sessions().get(&session).map(|c| c.snapshot())
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<MediaSessionId, Arc<Counters>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct Session {
    /// By m-line index; `None` where the call holds no ports: never given,
    /// or given back when an answer refused the m-line.
    streams: Vec<Option<StreamPorts>>,
    codec: Option<String>,
    counters: Arc<Counters>,
    /// What the PBX said to leg A and leg B.
    sent: [SentSdp; 2],
    /// The answerer (leg index) and refusals of the last answer, when it
    /// came in a provisional response: its streams keep their ports until
    /// a final response settles it (`early_answer_stands`).
    early_refusals: Option<(usize, Vec<Action>)>,
}

/// The SDP the PBX has sent one leg. The PBX is the origin of every body
/// a leg receives: one o= session, whose version goes up by one whenever
/// the body changes (RFC 3264 §8), whichever phone on the far side the
/// body came from. So the PBX can offer the leg a body of its own.
#[derive(Debug, Default)]
struct SentSdp {
    origin: Option<Origin>,
    last: Option<Bytes>,
    /// The body of the last offer/answer exchange with the leg that
    /// completed: the session in force with it.
    settled: Option<Bytes>,
    /// An offer sent to the leg and not answered yet.
    offered: Option<Bytes>,
}

impl SentSdp {
    /// `body`, bound for this leg, under the leg's origin; a new version
    /// when it differs from the last body sent, or when `new_version`. A
    /// body without a readable o= line goes as it is.
    fn stamp(&mut self, body: Vec<u8>, new_version: bool) -> Bytes {
        let Some(incoming) = sdp::origin(&body) else {
            return Bytes::from(body);
        };
        let origin = match self.origin.take() {
            None => incoming,
            Some(mut origin) => {
                let unchanged = self
                    .last
                    .as_deref()
                    .is_some_and(|last| sdp::same_session(last, &body));
                if new_version || !unchanged {
                    origin.version = origin.version.wrapping_add(1);
                }
                origin
            }
        };
        let body = Bytes::from(sdp::with_origin(&body, &origin));
        self.origin = Some(origin);
        self.last = Some(body.clone());
        body
    }

    /// The leg answered the offer the PBX sent it; the m-lines its answer
    /// refused (`Action::Reject` by m-line) are disabled (port 0) in the
    /// session now in force with it. A provisional answer leaves the offer
    /// open: another phone the call forked to may still answer it otherwise.
    fn answered(&mut self, role: SdpRole, refusals: &[Action], advertised: IpAddr) {
        let offer = match role {
            SdpRole::ProvisionalAnswer => self.offered.clone(),
            _ => self.offered.take(),
        };
        let Some(offer) = offer else {
            return;
        };
        let settled = if refusals.contains(&Action::Reject) {
            sdp::rewrite(&offer, advertised, refusals).map_or(offer, Bytes::from)
        } else {
            offer
        };
        self.settled = Some(settled);
    }
}

#[derive(Debug)]
struct StreamPorts {
    /// The PBX's even port facing leg A and leg B.
    ports: [u16; 2],
    /// What each leg's SDP last said, to see when a leg moves.
    remote: [Option<Remote>; 2],
    /// Where a leg was before its offer, not yet answered, moved it.
    before_offer: [Option<Remote>; 2],
    /// Opened for the offer not yet answered: it goes if that offer fails.
    added_by_offer: bool,
}

/// m-lines of one call the relay carries (audio, video, a second video or
/// T.38): a body listing hundreds must not empty the pool.
const MAX_STREAMS: usize = 4;

/// What one m-line asks for; `Relay` carries the codec-filtered payload
/// types of an offer's audio.
enum Wanted {
    Keep,
    Reject,
    Relay(Option<Vec<String>>),
}

fn leg_index(leg: LegSide) -> usize {
    match leg {
        LegSide::A => 0,
        LegSide::B => 1,
    }
}

/// Where a stream's SDP says to send its RTP and RTCP; `None` when it gives
/// no usable address (a host name, or 0.0.0.0 for "do not send").
fn remote_of(stream: &Stream) -> Option<Remote> {
    let addr = stream.addr.filter(|a| !a.is_unspecified())?;
    let (rtcp_port, rtcp_addr) = match stream.rtcp {
        Some((port, addr)) => (port, addr),
        None => (stream.port.checked_add(1)?, None),
    };
    Some(Remote {
        rtp: SocketAddr::new(addr, stream.port),
        rtcp: SocketAddr::new(rtcp_addr.unwrap_or(addr), rtcp_port),
    })
}

impl RelayMedia {
    /// One relay thread per core but one, which is left to signalling.
    pub fn new(
        config: &MediaConfig,
        advertised: IpAddr,
        status: Arc<PbxStatus>,
        events: UnboundedSender<MediaEvent>,
    ) -> io::Result<Self> {
        let threads =
            std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1));
        Self::with_threads(config, advertised, status, events, threads)
    }

    pub fn with_threads(
        config: &MediaConfig,
        advertised: IpAddr,
        status: Arc<PbxStatus>,
        events: UnboundedSender<MediaEvent>,
        threads: usize,
    ) -> io::Result<Self> {
        let pool = Arc::new(PortPool::new(config.port_pool, status));
        let (limit, needed) = (
            crate::limits::open_files(),
            pool.capacity() + RESERVED_FILES,
        );
        if limit < needed {
            tracing::warn!(
                limit,
                needed,
                calls = limit.saturating_sub(RESERVED_FILES) / 4,
                "the open-file limit is below what media.port_pool needs: beyond about `calls` relayed calls, new calls are refused with 503; raise the limit (ulimit -n, systemd LimitNOFILE=, the container runtime's nofile)"
            );
        }
        let timeout = Duration::from_secs(config.rtp_timeout);
        let relay = Relay::start(
            threads,
            config.relay_io,
            advertised,
            pool.clone(),
            timeout,
            events,
        )?;
        let stats = MediaStats {
            packets: relay.packets(),
            sessions: Arc::default(),
        };
        Ok(Self {
            codecs: config.codecs.clone(),
            advertised,
            pool,
            relay,
            next: 0,
            sessions: HashMap::new(),
            stats,
        })
    }

    /// A handle on the relay's counters.
    pub fn stats(&self) -> MediaStats {
        self.stats.clone()
    }

    /// Binds both legs of a new stream and hands them to the relay.
    fn add_stream(
        &self,
        session: MediaSessionId,
        index: usize,
        counters: &Arc<Counters>,
    ) -> Result<StreamPorts, MediaError> {
        let a = self.relay.bind_pair(&self.pool, session)?;
        let b = match self.relay.bind_pair(&self.pool, session) {
            Ok(b) => b,
            Err(e) => {
                let (port, sockets) = a;
                drop(sockets);
                self.pool.release(port);
                return Err(e);
            }
        };
        let ports = [a.0, b.0];
        self.relay.add(session, index, [a, b], counters.clone());
        Ok(StreamPorts {
            ports,
            remote: [None, None],
            before_offer: [None, None],
            added_by_offer: false,
        })
    }

    /// What each m-line asks for, decided before any port is taken so that
    /// a refused offer holds nothing: offers' audio is cut to `media.codecs`.
    fn wanted(&self, description: &Description, role: SdpRole) -> Result<Vec<Wanted>, MediaError> {
        let mut audio_offered = false;
        let mut voice_kept = false;
        let wanted = description
            .streams
            .iter()
            .enumerate()
            .map(|(index, stream)| {
                if stream.port == 0 {
                    return Wanted::Keep;
                }
                if index >= MAX_STREAMS || !stream.relayable() {
                    return Wanted::Reject;
                }
                if role.is_answer() || !stream.is_audio() {
                    return Wanted::Relay(None);
                }
                audio_offered = true;
                let kept = stream.allowed_formats(&self.codecs);
                if !stream.has_voice(&kept) {
                    return Wanted::Reject;
                }
                voice_kept = true;
                Wanted::Relay(Some(kept))
            })
            .collect();
        if audio_offered && !voice_kept {
            return Err(MediaError::NoCommonCodec);
        }
        Ok(wanted)
    }

    /// The port the other leg is to send this m-line to (`None`: refuse the
    /// stream), registering where `from` wants media.
    fn plan_stream(
        &self,
        session: &mut Session,
        id: MediaSessionId,
        index: usize,
        stream: &Stream,
        from: usize,
        role: SdpRole,
    ) -> Option<u16> {
        if session.streams.len() <= index {
            session.streams.resize_with(index + 1, || None);
        }
        let slot = session.streams.get_mut(index)?;
        if slot.is_none() && role == SdpRole::Offer {
            *slot = self
                .add_stream(id, index, &session.counters)
                .ok()
                .map(|ports| StreamPorts {
                    added_by_offer: true,
                    ..ports
                });
        }
        let ports = slot.as_mut()?;
        let remote = remote_of(stream);
        if let (Some(last), Some(before)) =
            (ports.remote.get_mut(from), ports.before_offer.get_mut(from))
        {
            let moved = matches!((*last, remote), (Some(l), Some(r)) if l != r);
            if role == SdpRole::Offer {
                *before = if moved { *last } else { None };
            }
            *last = remote.or(*last);
            let latch = if moved { Latch::SetAside } else { Latch::Keep };
            self.relay.set_remote(id, index, from, remote, latch);
        }
        ports.ports.get(1 - from).copied()
    }

    /// Gives back the ports of stream `index`, which the call no longer
    /// carries: a phone offering video to one without it must not hold
    /// twice the ports of a voice call.
    fn release_stream(&self, session: &mut Session, id: MediaSessionId, index: usize) {
        if session
            .streams
            .get_mut(index)
            .and_then(Option::take)
            .is_some()
        {
            self.relay.remove_stream(id, index);
        }
    }

    /// Makes the answer of leg `answerer` final: the m-lines it refused
    /// (`Action::Reject` in `refusals`) give their ports back, and the
    /// session in force with the answerer no longer has them.
    fn settle(
        &self,
        session: &mut Session,
        id: MediaSessionId,
        answerer: usize,
        refusals: &[Action],
    ) {
        session.early_refusals = None;
        for (index, refusal) in refusals.iter().enumerate() {
            if *refusal == Action::Reject {
                self.release_stream(session, id, index);
            }
        }
        if let Some(sent) = session.sent.get_mut(answerer) {
            sent.answered(SdpRole::Answer, refusals, self.advertised);
        }
    }

    /// Runs `work` on session `id`, out of the table meanwhile so that
    /// `work` may use the rest of the relay's state.
    fn with_session<T>(
        &mut self,
        id: MediaSessionId,
        work: impl FnOnce(&Self, &mut Session) -> Result<T, MediaError>,
    ) -> Result<T, MediaError> {
        let mut session = self
            .sessions
            .remove(&id)
            .ok_or(MediaError::Released(id.0))?;
        let result = work(self, &mut session);
        self.sessions.insert(id, session);
        result
    }

    /// Plans the streams of `sdp`, a body from leg `from`, and rewrites
    /// it for the other leg. An answer also settles the codec, whether the
    /// call is on hold, and where the offerer's streams are.
    fn negotiate(
        &self,
        session: &mut Session,
        id: MediaSessionId,
        from: LegSide,
        role: SdpRole,
        sdp: &[u8],
    ) -> Result<Vec<u8>, MediaError> {
        let description = sdp::parse(sdp)?;
        let wanted = self.wanted(&description, role)?;
        let from = leg_index(from);
        let actions: Vec<Action> = wanted
            .into_iter()
            .zip(&description.streams)
            .enumerate()
            .map(|(index, (want, stream))| match want {
                Wanted::Keep => Action::Keep,
                Wanted::Reject => Action::Reject,
                Wanted::Relay(formats) => {
                    match self.plan_stream(session, id, index, stream, from, role) {
                        Some(port) => Action::Relay { port, formats },
                        None => Action::Reject,
                    }
                }
            })
            .collect();
        let body = sdp::rewrite(sdp, self.advertised, &actions)?;
        if role == SdpRole::Offer {
            // The early answer no longer stands alone: a stream this offer
            // takes up again must keep its ports.
            session.early_refusals = None;
        }
        if role.is_answer() {
            let offerer = 1 - from;
            for ports in session.streams.iter_mut().flatten() {
                if let Some(before) = ports.before_offer.get_mut(offerer) {
                    *before = None;
                }
                ports.added_by_offer = false;
            }
            let refusals: Vec<Action> = (description.streams.iter())
                .map(|stream| match stream.port {
                    0 => Action::Reject,
                    _ => Action::Keep,
                })
                .collect();
            if role == SdpRole::ProvisionalAnswer {
                if let Some(answerer) = session.sent.get_mut(from) {
                    answerer.answered(role, &refusals, self.advertised);
                }
                session.early_refusals = Some((from, refusals));
            } else {
                self.settle(session, id, from, &refusals);
            }
            session.codec = description.codec();
            let live: Vec<&Stream> = description.streams.iter().filter(|s| s.port != 0).collect();
            let held = !live.is_empty() && live.iter().all(|s| s.direction != Direction::SendRecv);
            self.relay.pause(id, held);
        }
        Ok(body)
    }
}

impl SessionMedia for RelayMedia {
    fn open(&mut self) -> Result<MediaSessionId, MediaError> {
        self.next += 1;
        let id = MediaSessionId(self.next);
        let counters = Arc::new(Counters::default());
        let first = self.add_stream(id, 0, &counters)?;
        self.stats.sessions().insert(id, counters.clone());
        self.sessions.insert(
            id,
            Session {
                streams: vec![Some(first)],
                codec: None,
                counters,
                sent: Default::default(),
                early_refusals: None,
            },
        );
        Ok(id)
    }

    fn relay_sdp(
        &mut self,
        id: MediaSessionId,
        from: LegSide,
        role: SdpRole,
        sdp: Bytes,
    ) -> Result<Bytes, MediaError> {
        self.with_session(id, |media, session| {
            let body = media.negotiate(session, id, from, role, &sdp)?;
            let [a, b] = &mut session.sent;
            let to = match from {
                LegSide::A => b,
                LegSide::B => a,
            };
            let body = to.stamp(body, false);
            match role {
                SdpRole::Offer => to.offered = Some(body.clone()),
                SdpRole::Answer | SdpRole::ProvisionalAnswer => to.settled = Some(body.clone()),
            }
            Ok(body)
        })
    }

    fn restoring_offer(&mut self, id: MediaSessionId, leg: LegSide) -> Option<Bytes> {
        let sent = self.sessions.get_mut(&id)?.sent.get_mut(leg_index(leg))?;
        let settled = sent.settled.as_deref()?.to_vec();
        let body = sent.stamp(settled, true);
        sent.offered = Some(body.clone());
        Some(body)
    }

    fn restored(
        &mut self,
        id: MediaSessionId,
        leg: LegSide,
        answer: Bytes,
    ) -> Result<(), MediaError> {
        self.with_session(id, |media, session| {
            media.negotiate(session, id, leg, SdpRole::Answer, &answer)?;
            Ok(())
        })
    }

    fn offer_failed(&mut self, id: MediaSessionId, offerer: LegSide) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        let leg = leg_index(offerer);
        for (index, slot) in session.streams.iter_mut().enumerate() {
            if slot.take_if(|ports| ports.added_by_offer).is_some() {
                self.relay.remove_stream(id, index);
            }
            let Some(ports) = slot else {
                continue;
            };
            let before = ports.before_offer.get_mut(leg).and_then(Option::take);
            if let (Some(before), Some(remote)) = (before, ports.remote.get_mut(leg)) {
                *remote = Some(before);
                self.relay
                    .set_remote(id, index, leg, Some(before), Latch::Restore);
            }
        }
    }

    fn early_answer_stands(&mut self, id: MediaSessionId) {
        // A call already released has nothing left to settle.
        let _ = self.with_session(id, |media, session| {
            if let Some((answerer, refusals)) = session.early_refusals.take() {
                media.settle(session, id, answerer, &refusals);
            }
            Ok(())
        });
    }

    fn codec(&self, session: MediaSessionId) -> Option<String> {
        self.sessions.get(&session).and_then(|s| s.codec.clone())
    }

    fn close(&mut self, session: MediaSessionId) {
        if self.sessions.remove(&session).is_some() {
            self.stats.sessions().remove(&session);
            self.relay.remove(session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_stream(body: &str) -> Stream {
        let description = sdp::parse(body.as_bytes()).expect("valid");
        description.streams.into_iter().next().expect("one m-line")
    }

    #[test]
    fn rtcp_goes_to_a_rtcp_or_the_next_port() {
        let explicit = first_stream(
            "v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:5000 IN IP4 192.0.2.9\r\n",
        );
        let remote = remote_of(&explicit).expect("address");
        assert_eq!(remote.rtp, "192.0.2.1:4000".parse().expect("literal"));
        assert_eq!(remote.rtcp, "192.0.2.9:5000".parse().expect("literal"));
        let implicit = first_stream("v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0\r\n");
        let remote = remote_of(&implicit).expect("address");
        assert_eq!(remote.rtcp, "192.0.2.1:4001".parse().expect("literal"));
    }

    #[test]
    fn no_usable_address_means_no_remote() {
        for body in [
            "v=0\r\nc=IN IP4 0.0.0.0\r\nm=audio 4000 RTP/AVP 0\r\n",
            "v=0\r\nc=IN IP4 pbx.example\r\nm=audio 4000 RTP/AVP 0\r\n",
            "v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 65535 RTP/AVP 0\r\n",
        ] {
            assert_eq!(remote_of(&first_stream(body)), None, "{body}");
        }
    }
}
