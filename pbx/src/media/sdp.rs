//! SDP (RFC 4566) as the relay needs it: reading where each stream of a body
//! wants media sent and in which codecs, and rewriting a body so that every
//! relayed stream points at the PBX (RFC 3264 offer/answer). Pure functions:
//! the body is bytes from the network, so nothing here panics on it, and
//! every line not named below is copied byte for byte.

use std::net::IpAddr;

use super::MediaError;

/// `a=sendrecv` and friends, media level over session level (RFC 3264 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    fn from_attribute(line: &[u8]) -> Option<Self> {
        match line {
            b"a=sendrecv" => Some(Self::SendRecv),
            b"a=sendonly" => Some(Self::SendOnly),
            b"a=recvonly" => Some(Self::RecvOnly),
            b"a=inactive" => Some(Self::Inactive),
            _ => None,
        }
    }
}

/// One m-line of a body and what its section says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    pub media: String,
    pub port: u16,
    pub proto: String,
    pub formats: Vec<String>,
    /// Media-level c= or else session-level c=; `None` when absent or a
    /// host name (the relay then waits for the first packet to latch).
    pub addr: Option<IpAddr>,
    /// `a=rtcp:` port and optional address (RFC 3605).
    pub rtcp: Option<(u16, Option<IpAddr>)>,
    pub direction: Direction,
    rtpmap: Vec<(String, String)>,
}

impl Stream {
    /// Whether the relay can carry this stream (datagrams, not TCP).
    pub fn relayable(&self) -> bool {
        !self.proto.to_ascii_uppercase().contains("TCP")
    }

    pub fn is_audio(&self) -> bool {
        self.media.eq_ignore_ascii_case("audio")
    }

    /// The encoding name of a payload type: its rtpmap, or the static
    /// assignment of RFC 3551 for the types `media.codecs` can name.
    pub fn encoding(&self, pt: &str) -> Option<&str> {
        self.rtpmap
            .iter()
            .find(|(p, _)| p == pt)
            .map(|(_, name)| name.as_str())
            .or(match pt {
                "0" => Some("PCMU"),
                "8" => Some("PCMA"),
                _ => None,
            })
    }

    /// The payload types of the allowed codecs, in `codecs` order, each
    /// codec's types in the order of the body.
    pub fn allowed_formats(&self, codecs: &[String]) -> Vec<String> {
        codecs
            .iter()
            .flat_map(|codec| {
                self.formats.iter().filter(move |pt| {
                    self.encoding(pt)
                        .is_some_and(|name| name.eq_ignore_ascii_case(codec))
                })
            })
            .cloned()
            .collect()
    }

    /// Whether `formats` holds a codec that carries voice, not only DTMF.
    pub fn has_voice(&self, formats: &[String]) -> bool {
        formats.iter().any(|pt| {
            self.encoding(pt)
                .is_some_and(|name| !name.eq_ignore_ascii_case("telephone-event"))
        })
    }
}

/// The streams of a body, in m-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub streams: Vec<Stream>,
}

impl Description {
    /// The codec of the first live audio stream: its first payload type
    /// that carries voice (an answer may list telephone-event first).
    pub fn codec(&self) -> Option<String> {
        let stream = self.streams.iter().find(|s| s.is_audio() && s.port != 0)?;
        stream
            .formats
            .iter()
            .filter_map(|pt| stream.encoding(pt))
            .find(|name| !name.eq_ignore_ascii_case("telephone-event"))
            .map(str::to_string)
    }
}

/// What to do with one m-line when rewriting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Relay through `port` (RTCP on `port + 1`); `formats`, when given,
    /// replaces the m-line's payload types.
    Relay {
        port: u16,
        formats: Option<Vec<String>>,
    },
    /// Port 0: the stream is refused (RFC 3264 §6) or disabled (§8.2).
    Reject,
    /// Leave the section as it came (it is already port 0).
    Keep,
}

/// A line without its terminator, and the terminator as it came.
struct Line<'a> {
    text: &'a [u8],
    eol: &'a [u8],
}

fn split_lines(body: &[u8]) -> Vec<Line<'_>> {
    body.split_inclusive(|&b| b == b'\n')
        .map(|raw| {
            let cut = if raw.ends_with(b"\r\n") {
                2
            } else if raw.ends_with(b"\n") {
                1
            } else {
                0
            };
            let (text, eol) = raw.split_at(raw.len() - cut);
            Line { text, eol }
        })
        .collect()
}

fn bad(what: impl Into<String>) -> MediaError {
    MediaError::BadSdp(what.into())
}

fn as_str(text: &[u8]) -> Result<&str, MediaError> {
    std::str::from_utf8(text).map_err(|_| bad("line is not UTF-8"))
}

/// The address of `c=IN IP4 198.51.100.1[/ttl]`; `None` for a host name.
fn connection_addr(line: &[u8]) -> Result<Option<IpAddr>, MediaError> {
    let text = as_str(line)?;
    let mut fields = text.trim_start_matches("c=").split_whitespace();
    let (Some(_net), Some(_kind), Some(addr)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(bad(format!("bad connection line {text:?}")));
    };
    let addr = addr.split('/').next().unwrap_or(addr);
    Ok(addr.parse().ok())
}

fn parse_media_line(line: &[u8]) -> Result<Stream, MediaError> {
    let text = as_str(line)?;
    let mut fields = text.trim_start_matches("m=").split_whitespace();
    let (Some(media), Some(port), Some(proto)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(bad(format!("bad media line {text:?}")));
    };
    let port = port
        .split('/')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad(format!("bad port in {text:?}")))?;
    Ok(Stream {
        media: media.to_string(),
        port,
        proto: proto.to_string(),
        formats: fields.map(str::to_string).collect(),
        addr: None,
        rtcp: None,
        direction: Direction::SendRecv,
        rtpmap: Vec::new(),
    })
}

/// `a=rtcp:53020 IN IP4 126.16.64.4` (RFC 3605).
fn parse_rtcp(value: &str) -> Result<(u16, Option<IpAddr>), MediaError> {
    let mut fields = value.split_whitespace();
    let port = fields
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad(format!("bad a=rtcp {value:?}")))?;
    Ok((port, fields.nth(2).and_then(|a| a.parse().ok())))
}

/// The payload type an `a=rtpmap:`, `a=fmtp:` or `a=rtcp-fb:` line is about.
fn format_attribute(line: &[u8]) -> Option<&[u8]> {
    let rest = [&b"a=rtpmap:"[..], b"a=fmtp:", b"a=rtcp-fb:"]
        .iter()
        .find_map(|prefix| line.strip_prefix(*prefix))?;
    rest.split(|&b| b == b' ').next()
}

/// Whether a line is ICE (RFC 8839): the PBX anchors the media on its own
/// port and does not do ICE, so candidates would only lead a peer around
/// the relay, or into connectivity checks nobody answers.
fn is_ice_attribute(line: &[u8]) -> bool {
    const ICE: [&[u8]; 8] = [
        b"a=candidate:",
        b"a=remote-candidates:",
        b"a=end-of-candidates",
        b"a=ice-ufrag:",
        b"a=ice-pwd:",
        b"a=ice-options:",
        b"a=ice-lite",
        b"a=ice-mismatch",
    ];
    ICE.iter().any(|prefix| line.starts_with(prefix))
}

/// Reads the streams of a body.
pub fn parse(body: &[u8]) -> Result<Description, MediaError> {
    let lines = split_lines(body);
    if !lines.first().is_some_and(|l| l.text.starts_with(b"v=")) {
        return Err(bad("does not start with v="));
    }
    let mut session_addr = None;
    let mut session_direction = Direction::SendRecv;
    let mut streams: Vec<Stream> = Vec::new();
    let mut media_addr: Vec<Option<Option<IpAddr>>> = Vec::new();
    let mut media_direction: Vec<Option<Direction>> = Vec::new();
    for line in &lines {
        let text = line.text;
        if text.starts_with(b"m=") {
            streams.push(parse_media_line(text)?);
            media_addr.push(None);
            media_direction.push(None);
            continue;
        }
        let in_media = streams.len().checked_sub(1);
        if text.starts_with(b"c=") {
            let addr = connection_addr(text)?;
            match in_media.and_then(|i| media_addr.get_mut(i)) {
                Some(slot) => *slot = Some(addr),
                None => session_addr = addr,
            }
        } else if let Some(direction) = Direction::from_attribute(text) {
            match in_media.and_then(|i| media_direction.get_mut(i)) {
                Some(slot) => *slot = Some(direction),
                None => session_direction = direction,
            }
        } else if let Some(stream) = in_media.and_then(|i| streams.get_mut(i)) {
            if let Some(value) = text.strip_prefix(b"a=rtcp:") {
                stream.rtcp = Some(parse_rtcp(as_str(value)?)?);
            } else if let Some(value) = text.strip_prefix(b"a=rtpmap:") {
                let value = as_str(value)?;
                let mut fields = value.split_whitespace();
                if let (Some(pt), Some(encoding)) = (fields.next(), fields.next()) {
                    let name = encoding.split('/').next().unwrap_or(encoding);
                    stream.rtpmap.push((pt.to_string(), name.to_string()));
                }
            }
        }
    }
    for ((stream, addr), direction) in streams.iter_mut().zip(media_addr).zip(media_direction) {
        stream.addr = addr.unwrap_or(session_addr);
        stream.direction = direction.unwrap_or(session_direction);
    }
    Ok(Description { streams })
}

fn addr_type(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IP4"
    } else {
        "IP6"
    }
}

fn rewrite_origin(text: &[u8], addr: IpAddr) -> Result<String, MediaError> {
    let text = as_str(text)?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        [user, id, version, net, _, _] => Ok(format!(
            "{user} {id} {version} {net} {} {addr}",
            addr_type(addr)
        )),
        _ => Err(bad(format!("bad origin line {text:?}"))),
    }
}

/// The username, session id and version of a body's o= line (RFC 4566
/// §5.2): who made the session description, and which edition of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub user: String,
    pub session: String,
    pub version: u64,
}

fn origin_line<'a>(line: &Line<'a>) -> Option<&'a str> {
    std::str::from_utf8(line.text).ok()?.strip_prefix("o=")
}

/// The origin of `body`, when it has an o= line that reads.
pub fn origin(body: &[u8]) -> Option<Origin> {
    let lines = split_lines(body);
    let mut fields = lines.iter().find_map(origin_line)?.split(' ');
    let (user, session, version) = (fields.next()?, fields.next()?, fields.next()?);
    Some(Origin {
        user: user.to_string(),
        session: session.to_string(),
        version: version.parse().ok()?,
    })
}

/// `body` with the username, session id and version of its o= line
/// replaced by `origin`'s; the rest of the line and the body as they were.
pub fn with_origin(body: &[u8], origin: &Origin) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut stamped = false;
    for line in split_lines(body) {
        match origin_line(&line).filter(|_| !stamped) {
            Some(fields) => {
                let address = fields.splitn(4, ' ').nth(3).unwrap_or_default();
                let Origin {
                    user,
                    session,
                    version,
                } = origin;
                out.extend_from_slice(format!("o={user} {session} {version} {address}").as_bytes());
                stamped = true;
            }
            None => out.extend_from_slice(line.text),
        }
        out.extend_from_slice(line.eol);
    }
    out
}

/// Whether two bodies describe the same session whatever their o= lines
/// say: a body sent again unchanged keeps its version (RFC 3264 §8).
pub fn same_session(a: &[u8], b: &[u8]) -> bool {
    let content = |body| {
        split_lines(body)
            .into_iter()
            .filter(|l| origin_line(l).is_none())
            .map(|l| l.text)
            .collect::<Vec<_>>()
    };
    content(a) == content(b)
}

/// A c= line pointing at `addr`, unless the line says "do not send"
/// (0.0.0.0, the hold of RFC 2543), which must reach the other leg as is.
fn rewrite_connection(text: &[u8], addr: IpAddr) -> Result<Option<String>, MediaError> {
    if connection_addr(text)?.is_some_and(|a| a.is_unspecified()) {
        return Ok(None);
    }
    Ok(Some(format!("c=IN {} {addr}", addr_type(addr))))
}

fn rewrite_media_line(stream: &Stream, port: u16, formats: Option<&Vec<String>>) -> String {
    let formats = formats.unwrap_or(&stream.formats).join(" ");
    format!("m={} {port} {} {formats}", stream.media, stream.proto)
}

/// Rewrites a body: o= and c= name `addr`, each m-line follows its action
/// (a missing action is `Keep`), a=rtcp of relayed streams names `port + 1`,
/// and format attributes of removed payload types are dropped.
pub fn rewrite(body: &[u8], addr: IpAddr, actions: &[Action]) -> Result<Vec<u8>, MediaError> {
    let description = parse(body)?;
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut current: Option<(&Stream, &Action)> = None;
    let mut index = 0;
    let relays = actions.iter().any(|a| matches!(a, Action::Relay { .. }));
    for line in split_lines(body) {
        let text = line.text;
        let relayed_here = match current {
            None => relays,
            Some((_, action)) => matches!(action, Action::Relay { .. }),
        };
        if relayed_here && is_ice_attribute(text) {
            continue;
        }
        let replaced = if text.starts_with(b"m=") {
            let stream = description
                .streams
                .get(index)
                .ok_or_else(|| bad("media lines changed while rewriting"))?;
            let action = actions.get(index).unwrap_or(&Action::Keep);
            index += 1;
            current = Some((stream, action));
            match action {
                Action::Relay { port, formats } => {
                    Some(rewrite_media_line(stream, *port, formats.as_ref()))
                }
                Action::Reject => Some(rewrite_media_line(stream, 0, None)),
                Action::Keep => None,
            }
        } else {
            match current {
                None if text.starts_with(b"o=") => Some(rewrite_origin(text, addr)?),
                None if text.starts_with(b"c=") => rewrite_connection(text, addr)?,
                None => None,
                Some((_, Action::Keep | Action::Reject)) => None,
                Some((stream, Action::Relay { port, formats })) => {
                    if text.starts_with(b"c=") {
                        rewrite_connection(text, addr)?
                    } else if text.starts_with(b"a=rtcp:") {
                        let rtcp = port.wrapping_add(1);
                        Some(match stream.rtcp {
                            Some((_, Some(_))) => {
                                format!("a=rtcp:{rtcp} IN {} {addr}", addr_type(addr))
                            }
                            _ => format!("a=rtcp:{rtcp}"),
                        })
                    } else if let (Some(pt), Some(kept)) = (format_attribute(text), formats) {
                        if pt != b"*" && !kept.iter().any(|k| k.as_bytes() == pt) {
                            continue;
                        }
                        None
                    } else {
                        None
                    }
                }
            }
        };
        match replaced {
            Some(new) => out.extend_from_slice(new.as_bytes()),
            None => out.extend_from_slice(text),
        }
        out.extend_from_slice(line.eol);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_read_and_replaced_leaving_the_rest_of_the_body() {
        let body =
            b"v=0\r\no=alice 2890844526 7 IN IP4 203.0.113.5\r\ns=-\r\nm=audio 4000 RTP/AVP 0\r\n";
        let read = origin(body).expect("an origin");
        assert_eq!(
            read,
            Origin {
                user: "alice".into(),
                session: "2890844526".into(),
                version: 7,
            }
        );
        let pbx = Origin {
            user: "bob".into(),
            session: "42".into(),
            version: 8,
        };
        let stamped = with_origin(body, &pbx);
        assert_eq!(
            String::from_utf8_lossy(&stamped),
            "v=0\r\no=bob 42 8 IN IP4 203.0.113.5\r\ns=-\r\nm=audio 4000 RTP/AVP 0\r\n"
        );
        assert!(same_session(body, &stamped));
        assert!(!same_session(
            body,
            b"v=0\r\no=a 1 1 IN IP4 203.0.113.5\r\ns=-\r\nm=audio 4002 RTP/AVP 0\r\n"
        ));
    }

    #[test]
    fn bodies_without_a_readable_origin_have_none() {
        for body in [
            &b"v=0\r\ns=-\r\n"[..],
            b"v=0\r\no=alice 1\r\n",
            b"v=0\r\no=alice 1 seven IN IP4 192.0.2.1\r\n",
            b"v=0\r\no=\xff 1 1 IN IP4 192.0.2.1\r\n",
            b"",
        ] {
            assert_eq!(origin(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    const OFFER: &str = "v=0\r\n\
o=alice 2890844526 2890844527 IN IP4 192.0.2.10\r\n\
s=call\r\n\
c=IN IP4 192.0.2.10\r\n\
t=0 0\r\n\
a=tool:phone 1.0\r\n\
m=audio 49170 RTP/AVP 18 8 0 111 101\r\n\
a=rtpmap:18 G729/8000\r\n\
a=fmtp:18 annexb=no\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=fmtp:111 useinbandfec=1\r\n\
a=rtcp-fb:111 nack\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=rtcp:49175 IN IP4 192.0.2.11\r\n\
a=ptime:20\r\n\
a=sendonly\r\n\
m=video 51372 RTP/AVP 99\r\n\
c=IN IP4 192.0.2.12\r\n\
a=rtpmap:99 H264/90000\r\n";

    fn pbx() -> IpAddr {
        "203.0.113.5".parse().expect("literal")
    }

    fn codecs(names: &[&str]) -> Vec<String> {
        names.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn parse_reads_addresses_ports_rtcp_and_direction() {
        let d = parse(OFFER.as_bytes()).expect("valid");
        assert_eq!(d.streams.len(), 2);
        let audio = &d.streams[0];
        assert_eq!(audio.port, 49170);
        assert_eq!(audio.addr, Some("192.0.2.10".parse().expect("ip")));
        assert_eq!(
            audio.rtcp,
            Some((49175, Some("192.0.2.11".parse().expect("ip"))))
        );
        assert_eq!(audio.direction, Direction::SendOnly);
        assert_eq!(audio.encoding("8"), Some("PCMA"));
        assert_eq!(audio.encoding("111"), Some("opus"));
        let video = &d.streams[1];
        assert_eq!(video.addr, Some("192.0.2.12".parse().expect("ip")));
        assert_eq!(video.direction, Direction::SendRecv);
        assert_eq!(d.codec().as_deref(), Some("G729"));
    }

    #[test]
    fn codec_filter_follows_configured_order_and_drops_attributes() {
        let d = parse(OFFER.as_bytes()).expect("valid");
        let kept =
            d.streams[0].allowed_formats(&codecs(&["opus", "PCMU", "PCMA", "telephone-event"]));
        assert_eq!(kept, ["111", "0", "8", "101"]);
        let actions = [
            Action::Relay {
                port: 10000,
                formats: Some(kept),
            },
            Action::Relay {
                port: 10002,
                formats: None,
            },
        ];
        let out = rewrite(OFFER.as_bytes(), pbx(), &actions).expect("rewrite");
        let expected = OFFER
            .replace("192.0.2.10\r\n", "203.0.113.5\r\n")
            .replace("192.0.2.11\r\n", "203.0.113.5\r\n")
            .replace("192.0.2.12\r\n", "203.0.113.5\r\n")
            .replace("49170 RTP/AVP 18 8 0 111 101", "10000 RTP/AVP 111 0 8 101")
            .replace("a=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\n", "")
            .replace("a=rtcp:49175", "a=rtcp:10001")
            .replace("m=video 51372", "m=video 10002");
        assert!(expected.contains("o=alice 2890844526 2890844527 IN IP4 203.0.113.5\r\n"));
        assert_eq!(String::from_utf8_lossy(&out), expected);
    }

    #[test]
    fn ice_is_removed_from_relayed_streams_only() {
        let body = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n\
a=ice-options:trickle\r\n\
m=audio 49170 RTP/AVP 0\r\n\
a=ice-ufrag:F7gI\r\na=ice-pwd:x9cml/YzichV2+XlhiMu8g\r\n\
a=candidate:1 1 UDP 2130706431 192.0.2.10 49170 typ host\r\n\
a=candidate:2 1 UDP 1694498815 198.51.100.7 61665 typ srflx raddr 192.0.2.10 rport 49170\r\n\
a=end-of-candidates\r\na=sendrecv\r\n\
m=video 51372 RTP/AVP 99\r\n\
a=candidate:1 1 UDP 2130706431 192.0.2.10 51372 typ host\r\n";
        let actions = [
            Action::Relay {
                port: 10000,
                formats: None,
            },
            Action::Keep,
        ];
        let out = rewrite(body.as_bytes(), pbx(), &actions).expect("rewrite");
        let expected =
            "v=0\r\no=- 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n\
m=audio 10000 RTP/AVP 0\r\na=sendrecv\r\n\
m=video 51372 RTP/AVP 99\r\n\
a=candidate:1 1 UDP 2130706431 192.0.2.10 51372 typ host\r\n";
        assert_eq!(String::from_utf8_lossy(&out), expected);
    }

    #[test]
    fn only_dtmf_or_unknown_codecs_have_no_voice() {
        let body = b"v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 18 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";
        let d = parse(body).expect("valid");
        let kept = d.streams[0].allowed_formats(&codecs(&["PCMA", "telephone-event"]));
        assert_eq!(kept, ["101"]);
        assert!(!d.streams[0].has_voice(&kept));
        let kept = d.streams[0].allowed_formats(&codecs(&["telephone-event", "pcmu"]));
        assert_eq!(kept, ["101", "0"]);
        assert!(d.streams[0].has_voice(&kept));
        let answer = b"v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 101 0\r\na=rtpmap:101 telephone-event/8000\r\n";
        assert_eq!(
            parse(answer).expect("valid").codec().as_deref(),
            Some("PCMU")
        );
    }

    #[test]
    fn video_is_rejected_with_port_zero_and_left_otherwise_intact() {
        let actions = [
            Action::Relay {
                port: 10000,
                formats: None,
            },
            Action::Reject,
        ];
        let out = rewrite(OFFER.as_bytes(), pbx(), &actions).expect("rewrite");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.ends_with(
                "m=video 0 RTP/AVP 99\r\nc=IN IP4 192.0.2.12\r\na=rtpmap:99 H264/90000\r\n"
            ),
            "{text}"
        );
        assert!(text.contains("a=rtpmap:18 G729/8000\r\n"));
        assert!(text.contains("m=audio 10000 RTP/AVP 18 8 0 111 101\r\n"));
    }

    #[test]
    fn ipv6_bodies_parse_and_rewrite_both_ways() {
        let body = "v=0\no=- 1 1 IN IP6 2001:db8::10\ns=-\nc=IN IP6 2001:db8::10\nt=0 0\nm=audio 5004 RTP/AVP 0\na=rtcp:5005\n";
        let d = parse(body.as_bytes()).expect("valid");
        assert_eq!(d.streams[0].addr, Some("2001:db8::10".parse().expect("ip")));
        assert_eq!(d.streams[0].rtcp, Some((5005, None)));
        let relay = [Action::Relay {
            port: 20000,
            formats: None,
        }];
        let out = rewrite(body.as_bytes(), pbx(), &relay).expect("v6 to v4");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "v=0\no=- 1 1 IN IP4 203.0.113.5\ns=-\nc=IN IP4 203.0.113.5\nt=0 0\nm=audio 20000 RTP/AVP 0\na=rtcp:20001\n"
        );
        let v6: IpAddr = "2001:db8::5".parse().expect("ip");
        let out = rewrite(body.as_bytes(), v6, &relay).expect("v6 to v6");
        assert!(String::from_utf8_lossy(&out).contains("\nc=IN IP6 2001:db8::5\n"));
        assert!(String::from_utf8_lossy(&out).contains("\no=- 1 1 IN IP6 2001:db8::5\n"));
    }

    #[test]
    fn hold_with_unspecified_address_and_inactive_is_kept() {
        let body = b"v=0\r\no=- 1 2 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=inactive\r\n";
        let d = parse(body).expect("valid");
        assert_eq!(d.streams[0].direction, Direction::Inactive);
        assert_eq!(d.streams[0].addr, Some("0.0.0.0".parse().expect("ip")));
        let relay = [Action::Relay {
            port: 10000,
            formats: None,
        }];
        let out = rewrite(body, pbx(), &relay).expect("rewrite");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "v=0\r\no=- 1 2 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 10000 RTP/AVP 0\r\na=inactive\r\n"
        );
    }

    #[test]
    fn session_direction_applies_unless_a_stream_overrides_it() {
        let body = b"v=0\r\nc=IN IP4 192.0.2.1\r\na=recvonly\r\nm=audio 4000 RTP/AVP 0\r\nm=audio 4002 RTP/AVP 0\r\na=sendrecv\r\n";
        let d = parse(body).expect("valid");
        assert_eq!(d.streams[0].direction, Direction::RecvOnly);
        assert_eq!(d.streams[1].direction, Direction::SendRecv);
    }

    #[test]
    fn rejected_input_streams_are_kept_byte_for_byte() {
        let body = b"v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0\r\nm=video 0 RTP/AVP 99\r\na=x\r\n";
        let actions = [Action::Relay {
            port: 10000,
            formats: None,
        }];
        let out = rewrite(body, pbx(), &actions).expect("rewrite");
        assert!(out.ends_with(b"m=video 0 RTP/AVP 99\r\na=x\r\n"));
        let bfcp = parse(b"v=0\nm=application 9 TCP/BFCP *\n").expect("valid");
        assert!(!bfcp.streams[0].relayable());
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"hello",
            b"v=0\r\nm=audio\r\n",
            b"v=0\r\nm=audio x RTP/AVP 0\r\n",
            b"v=0\r\nm=audio 99999 RTP/AVP 0\r\n",
            b"v=0\r\nc=IN\r\n",
            b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtcp:\r\n",
            b"v=0\r\nm=audio 1 RTP/AVP 0\r\nc=IN IP4 \xff\r\n",
        ] {
            assert!(
                matches!(parse(body), Err(MediaError::BadSdp(_))),
                "{body:?}"
            );
        }
        assert!(rewrite(b"v=0\r\no=short\r\n", pbx(), &[]).is_err());
        let odd = b"v=0\r\nm=audio 1 RTP/AVP\r\na=rtpmap:\r\na=rtcp:5 IN\r\nc=IN IP4 host.example/127\r\n";
        let d = parse(odd).expect("tolerated");
        assert_eq!(d.streams[0].addr, None);
        assert_eq!(d.codec(), None);
    }

    /// Bodies from the network may be anything: mutated offers must give
    /// errors or rewritten bodies, never a panic.
    #[test]
    fn mutated_bodies_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b" =:/\r\n0123456789amcov.IP46";
        let relay = [
            Action::Relay {
                port: 10000,
                formats: Some(vec!["0".into(), "999".into()]),
            },
            Action::Reject,
        ];
        for _ in 0..5000 {
            let mut body = OFFER.as_bytes().to_vec();
            for _ in 0..(next() % 8 + 1) {
                let at = (next() as usize) % body.len().max(1);
                let byte = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 => body.insert(at, byte),
                    1 if !body.is_empty() => {
                        body.remove(at);
                    }
                    _ => body.truncate(at),
                }
            }
            if let Ok(d) = parse(&body) {
                let _ = d.codec();
                let _ = rewrite(&body, pbx(), &relay);
            }
        }
    }
}
