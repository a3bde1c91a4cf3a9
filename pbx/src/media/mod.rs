//! Media handling of calls: the one place where SDP bodies travelling
//! between the legs of a call are seen and may be rewritten. `direct` passes
//! them through untouched; `bypass` (the relay) maps every stream onto the
//! PBX's port pool.

pub mod bypass;
pub mod port_pool;
pub mod relay;
pub mod sdp;

pub use bypass::{MediaStats, RelayMedia};
pub use relay::MediaCounters;

use std::collections::hash_map::Entry;

use bytes::Bytes;

/// The caller's leg (A) or the callee's leg (B) of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LegSide {
    A,
    B,
}

impl LegSide {
    pub fn other(self) -> Self {
        match self {
            LegSide::A => LegSide::B,
            LegSide::B => LegSide::A,
        }
    }
}

/// Whether an SDP body is an offer or the answer to one (RFC 3264).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpRole {
    Offer,
    Answer,
    /// An answer in a provisional response: another phone the call forked
    /// to may still answer the same offer, and take up a stream this one
    /// refuses, so the stream keeps its ports.
    ProvisionalAnswer,
}

impl SdpRole {
    pub fn is_answer(self) -> bool {
        matches!(self, SdpRole::Answer | SdpRole::ProvisionalAnswer)
    }
}

/// A call's media as the media layer knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MediaSessionId(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaError {
    /// The port pool is exhausted: answer 503.
    #[error("media port pool exhausted")]
    PoolExhausted,
    /// The process may open no more sockets: answer 503.
    #[error("no file descriptors left for media sockets")]
    OutOfFiles,
    /// No codec of the offer is allowed by `media.codecs`: answer 488.
    #[error("no acceptable codec in the offer")]
    NoCommonCodec,
    /// The body is not usable SDP: answer 400 (or 488 for an answer).
    #[error("malformed SDP: {0}")]
    BadSdp(String),
    /// The call's media is already released (the call has ended).
    #[error("media session {0} already released")]
    Released(u64),
}

/// What happened to a call's media that signalling must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaEvent {
    /// No RTP in either direction for `media.rtp_timeout` seconds.
    RtpTimeout(MediaSessionId),
}

/// The SDP offer/answer hook the B2BUA calls for every body it relays.
pub trait SessionMedia: Send {
    /// Reserves what a new call needs; fails before any leg is created.
    fn open(&mut self) -> Result<MediaSessionId, MediaError>;
    /// Rewrites an SDP body travelling from leg `from` to the other leg.
    fn relay_sdp(
        &mut self,
        session: MediaSessionId,
        from: LegSide,
        role: SdpRole,
        sdp: Bytes,
    ) -> Result<Bytes, MediaError>;
    /// The last offer leg `offerer` made was refused, or its answer was
    /// unusable: the session stays as it was before (RFC 3264 §8), so
    /// streams the offer moved go back to where they were.
    fn offer_failed(&mut self, session: MediaSessionId, offerer: LegSide);
    /// An offer of the session last agreed with leg `leg`, for a leg that
    /// took up an answer the PBX could not relay (a re-INVITE puts it back
    /// in step with the relay); `None` when there is nothing to offer.
    fn restoring_offer(&mut self, session: MediaSessionId, leg: LegSide) -> Option<Bytes>;
    /// `leg`'s answer to the restoring offer.
    fn restored(
        &mut self,
        session: MediaSessionId,
        leg: LegSide,
        answer: Bytes,
    ) -> Result<(), MediaError>;
    /// The answerer's final response carried no SDP, so the answer of its
    /// provisional response is the final one (RFC 3262): streams it
    /// refused give their ports back.
    fn early_answer_stands(&mut self, session: MediaSessionId);
    /// The codec the call settled on, for the CDR.
    fn codec(&self, session: MediaSessionId) -> Option<String>;
    /// Frees everything the call held.
    fn close(&mut self, session: MediaSessionId);
}

/// `media.mode: direct`: media flows end to end, SDP untouched except that
/// the settled codec is remembered for the CDR, and what each leg was sent
/// last, for an offer of the PBX's own.
#[derive(Debug, Default)]
pub struct DirectMedia {
    next: u64,
    codecs: std::collections::HashMap<MediaSessionId, String>,
    sent: std::collections::HashMap<(MediaSessionId, LegSide), Sent>,
}

/// The last body a leg was sent, and the o= session it saw first: an offer
/// of the PBX's own is a new version of that session (RFC 3264 §8).
#[derive(Debug)]
struct Sent {
    origin: sdp::Origin,
    last: Bytes,
}

impl SessionMedia for DirectMedia {
    fn open(&mut self) -> Result<MediaSessionId, MediaError> {
        self.next += 1;
        Ok(MediaSessionId(self.next))
    }

    fn relay_sdp(
        &mut self,
        session: MediaSessionId,
        from: LegSide,
        role: SdpRole,
        sdp: Bytes,
    ) -> Result<Bytes, MediaError> {
        if role.is_answer() {
            if let Some(codec) = first_codec(&sdp) {
                self.codecs.insert(session, codec);
            }
        }
        let origin = sdp::origin(&sdp);
        match self.sent.entry((session, from.other())) {
            Entry::Occupied(mut sent) => {
                let sent = sent.get_mut();
                if let Some(origin) = origin
                    .filter(|o| (&o.user, &o.session) == (&sent.origin.user, &sent.origin.session))
                {
                    sent.origin.version = sent.origin.version.max(origin.version);
                }
                sent.last = sdp.clone();
            }
            Entry::Vacant(slot) => {
                if let Some(origin) = origin {
                    slot.insert(Sent {
                        origin,
                        last: sdp.clone(),
                    });
                }
            }
        }
        Ok(sdp)
    }

    fn offer_failed(&mut self, _session: MediaSessionId, _offerer: LegSide) {}

    /// The last body `leg` was sent, as a new version of the session it saw
    /// first: after forking, that may be another phone's.
    fn restoring_offer(&mut self, session: MediaSessionId, leg: LegSide) -> Option<Bytes> {
        let sent = self.sent.get_mut(&(session, leg))?;
        sent.origin.version = sent.origin.version.wrapping_add(1);
        Some(Bytes::from(sdp::with_origin(&sent.last, &sent.origin)))
    }

    fn restored(
        &mut self,
        _session: MediaSessionId,
        _leg: LegSide,
        _answer: Bytes,
    ) -> Result<(), MediaError> {
        Ok(())
    }

    fn early_answer_stands(&mut self, _session: MediaSessionId) {}

    fn codec(&self, session: MediaSessionId) -> Option<String> {
        self.codecs.get(&session).cloned()
    }

    fn close(&mut self, session: MediaSessionId) {
        self.codecs.remove(&session);
        for leg in [LegSide::A, LegSide::B] {
            self.sent.remove(&(session, leg));
        }
    }
}

/// The encoding name of the first payload type of the first audio stream.
pub fn first_codec(sdp: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(sdp).ok()?;
    let mut lines = text.lines();
    let payload = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("m=audio "))?
        .split_whitespace()
        .nth(2)?
        .to_string();
    let static_name = match payload.as_str() {
        "0" => Some("PCMU"),
        "8" => Some("PCMA"),
        "9" => Some("G722"),
        "18" => Some("G729"),
        _ => None,
    };
    let prefix = format!("a=rtpmap:{payload} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|enc| enc.split('/').next())
        .map(str::to_string)
        .or_else(|| static_name.map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_media_offers_a_leg_its_last_body_as_a_new_version_of_its_first_session() {
        let mut media = DirectMedia::default();
        let id = media.open().expect("open");
        let body = |origin: &str, port: u16| {
            Bytes::from(format!(
                "v=0\r\no={origin} IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 8\r\n"
            ))
        };
        assert_eq!(
            media.restoring_offer(id, LegSide::A),
            None,
            "nothing sent yet"
        );
        let early = body("desk 7 3", 5000);
        let relayed = media.relay_sdp(id, LegSide::B, SdpRole::ProvisionalAnswer, early.clone());
        assert_eq!(relayed, Ok(early), "untouched");
        media
            .relay_sdp(id, LegSide::B, SdpRole::Answer, body("mobile 9 1", 6000))
            .expect("relayed");
        let offer = media.restoring_offer(id, LegSide::A).expect("an offer");
        assert_eq!(offer, body("desk 7 4", 6000));
        let again = media.restoring_offer(id, LegSide::A).expect("an offer");
        assert_eq!(again, body("desk 7 5", 6000), "each offer a new version");
        assert_eq!(
            media.restoring_offer(id, LegSide::B),
            None,
            "B was sent nothing"
        );
        media.close(id);
        assert_eq!(media.restoring_offer(id, LegSide::A), None, "forgotten");
    }

    #[test]
    fn first_codec_reads_rtpmap_or_static_type() {
        let sdp = b"v=0\r\nm=audio 4000 RTP/AVP 8 0\r\na=rtpmap:8 PCMA/8000\r\n";
        assert_eq!(first_codec(sdp).as_deref(), Some("PCMA"));
        let sdp = b"v=0\r\nm=audio 4000 RTP/AVP 0\r\n";
        assert_eq!(first_codec(sdp).as_deref(), Some("PCMU"));
        let sdp = b"v=0\r\nm=audio 4000 RTP/AVP 111\r\na=rtpmap:111 opus/48000/2\r\n";
        assert_eq!(first_codec(sdp).as_deref(), Some("opus"));
        assert_eq!(first_codec(b"v=0\r\n"), None);
    }
}
