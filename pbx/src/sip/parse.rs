//! Turning bytes from the wire into `Message`s: framing by Content-Length
//! (datagram and stream), header unfolding, compact names, splitting of
//! list headers, and the checks of RFC 3261 §8.2/§18 and RFC 4475 that
//! decide whether a request is answered 400/505 or a response discarded.

use bytes::Bytes;

use super::message::{delta_seconds, CSeq, Header, Headers, Message, Method, StartLine, Via};
use super::uri::{split_unquoted, NameAddr, Uri};

/// Largest message the PBX accepts, on any transport.
pub const MAX_MESSAGE: usize = 65_535;

/// Why bytes could not become a message at all: they are dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("incomplete message")]
    Incomplete,
    #[error("not a SIP message: {0}")]
    Garbage(String),
}

/// What is wrong with a message that was framed: a request gets `code`,
/// a response is discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defect {
    pub code: u16,
    pub why: String,
}

fn defect(code: u16, why: impl Into<String>) -> Defect {
    Defect {
        code,
        why: why.into(),
    }
}

/// A framed message, with the first defect found in it if any.
#[derive(Debug)]
pub struct Parsed {
    pub message: Message,
    pub defect: Option<Defect>,
}

/// Compact header forms (RFC 3261 §7.3.3 and the extensions' registrations).
fn expand_compact(name: &str) -> &str {
    if name.len() != 1 {
        return name;
    }
    match name.as_bytes()[0].to_ascii_lowercase() {
        b'i' => "Call-ID",
        b'm' => "Contact",
        b'f' => "From",
        b't' => "To",
        b'v' => "Via",
        b'e' => "Content-Encoding",
        b'l' => "Content-Length",
        b'c' => "Content-Type",
        b's' => "Subject",
        b'k' => "Supported",
        b'o' => "Event",
        b'r' => "Refer-To",
        b'b' => "Referred-By",
        b'u' => "Allow-Events",
        b'x' => "Session-Expires",
        _ => name,
    }
}

/// Headers whose comma-separated values are separate entries (§7.3.1).
const LIST_HEADERS: [&str; 12] = [
    "Via",
    "Contact",
    "Route",
    "Record-Route",
    "Allow",
    "Supported",
    "Require",
    "Proxy-Require",
    "Unsupported",
    "Accept",
    "Path",
    "Service-Route",
];

/// List headers whose grammar allows an empty value (RFC 3261 §25.1:
/// `Supported: ` says no extension is supported).
const MAY_BE_EMPTY: [&str; 3] = ["Allow", "Supported", "Accept"];

const SINGLE_HEADERS: [&str; 6] = [
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Max-Forwards",
    "Content-Length",
];

fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

fn find_head_end(data: &[u8]) -> Option<(usize, usize)> {
    if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some((i, i + 4));
    }
    data.windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2))
}

/// Frames one message from a UDP datagram; bytes past Content-Length are
/// ignored (RFC 3261 §18.3).
pub fn parse_datagram(data: &[u8]) -> Result<Parsed, FrameError> {
    let data = trim_keepalive(data);
    let (head_end, body_start) = match find_head_end(data) {
        Some(found) => found,
        // A datagram without the blank line is a head with no body.
        None => (data.len(), data.len()),
    };
    let (mut message, declared, mut found) = parse_head(&data[..head_end])?;
    let available = &data[body_start.min(data.len())..];
    let body = match declared {
        Some(len) if len > available.len() => {
            found.get_or_insert(defect(
                400,
                format!(
                    "Content-Length {len} exceeds the {} body bytes received",
                    available.len()
                ),
            ));
            available
        }
        Some(len) => &available[..len],
        None => available,
    };
    message.body = Bytes::copy_from_slice(body);
    Ok(Parsed {
        message,
        defect: found,
    })
}

/// Frames one message from the front of a stream buffer; returns it and
/// how many bytes it used, or `Incomplete` to wait for more.
pub fn parse_stream(data: &[u8]) -> Result<(Parsed, usize), FrameError> {
    let skipped = data.len() - trim_keepalive(data).len();
    let data = &data[skipped..];
    let Some((head_end, body_start)) = find_head_end(data) else {
        if data.len() > MAX_MESSAGE {
            return Err(FrameError::Garbage("header section too large".into()));
        }
        return Err(FrameError::Incomplete);
    };
    let (mut message, declared, found) = parse_head(&data[..head_end])?;
    let len = declared.unwrap_or(0);
    if len > MAX_MESSAGE {
        return Err(FrameError::Garbage(format!(
            "Content-Length {len} too large"
        )));
    }
    let end = body_start + len;
    if data.len() < end {
        return Err(FrameError::Incomplete);
    }
    message.body = Bytes::copy_from_slice(&data[body_start..end]);
    Ok((
        Parsed {
            message,
            defect: found,
        },
        skipped + end,
    ))
}

/// Leading CRLFs are keep-alives (RFC 5626 §3.5.1), not messages.
fn trim_keepalive(data: &[u8]) -> &[u8] {
    let start = data
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(data.len());
    &data[start..]
}

type Head = (Message, Option<usize>, Option<Defect>);

fn parse_head(head: &[u8]) -> Result<Head, FrameError> {
    if head.is_empty() {
        return Err(FrameError::Garbage("empty".into()));
    }
    let text = std::str::from_utf8(head)
        .map_err(|_| FrameError::Garbage("header section is not UTF-8".into()))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let mut found: Option<Defect> = None;
    let start = parse_start_line(first, &mut found)?;

    let mut raw: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            match raw.last_mut() {
                Some((_, value)) => {
                    value.push(' ');
                    value.push_str(line.trim());
                }
                None => {
                    found.get_or_insert(defect(400, "folded line before any header"));
                }
            }
            continue;
        }
        match line.split_once(':') {
            Some((name, value)) if is_token(name.trim_end()) => {
                raw.push((name.trim_end().to_string(), value.trim().to_string()));
            }
            _ => {
                found.get_or_insert(defect(400, format!("malformed header line {line:?}")));
            }
        }
    }

    let mut headers = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let name = expand_compact(&name);
        let name = SINGLE_HEADERS
            .iter()
            .chain(LIST_HEADERS.iter())
            .find(|known| known.eq_ignore_ascii_case(name))
            .map_or_else(|| name.to_string(), |known| known.to_string());
        if MAY_BE_EMPTY.contains(&name.as_str()) && value.trim().is_empty() {
            continue;
        }
        if LIST_HEADERS.contains(&name.as_str()) && value != "*" {
            for part in split_unquoted(&value, b',') {
                let part = part.trim();
                if part.is_empty() {
                    found.get_or_insert(defect(400, format!("empty value in {name}")));
                } else {
                    headers.push(Header {
                        name: name.clone(),
                        value: part.to_string(),
                    });
                }
            }
        } else {
            headers.push(Header { name, value });
        }
    }
    let headers = Headers::from_vec(headers);

    let declared = match headers.count("Content-Length") {
        0 => None,
        1 => match headers.get("Content-Length").map(|v| v.parse::<usize>()) {
            Some(Ok(len)) => Some(len),
            _ => {
                found.get_or_insert(defect(400, "malformed Content-Length"));
                Some(0)
            }
        },
        _ => {
            found.get_or_insert(defect(400, "more than one Content-Length"));
            Some(0)
        }
    };
    let message = Message {
        start,
        headers,
        body: Bytes::new(),
    };
    if found.is_none() {
        found = check(&message).err();
    }
    Ok((message, declared, found))
}

fn parse_start_line(line: &str, found: &mut Option<Defect>) -> Result<StartLine, FrameError> {
    if let Some(rest) = line.strip_prefix("SIP/") {
        let mut parts = rest.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let code = parts.next().unwrap_or_default();
        let reason = parts.next().unwrap_or_default();
        if version != "2.0" {
            return Err(FrameError::Garbage(format!(
                "response version SIP/{version}"
            )));
        }
        let code = code
            .parse::<u16>()
            .ok()
            .filter(|c| code.len() == 3 && (100..700).contains(c))
            .ok_or_else(|| FrameError::Garbage(format!("status code {code:?}")))?;
        return Ok(StartLine::Response {
            code,
            reason: reason.to_string(),
        });
    }
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, uri, version] = parts.as_slice() else {
        let method = parts.first().copied().unwrap_or_default();
        if !is_token(method) {
            return Err(FrameError::Garbage(format!("start line {line:?}")));
        }
        found.get_or_insert(defect(400, "malformed Request-Line"));
        return Ok(StartLine::Request {
            method: Method::parse(method),
            uri: opaque_uri(parts.get(1).copied().unwrap_or_default()),
        });
    };
    if !is_token(method) {
        return Err(FrameError::Garbage(format!("start line {line:?}")));
    }
    let uri = match Uri::parse(uri) {
        Ok(Uri::Sip(s)) if s.headers.is_some() => {
            found.get_or_insert(defect(400, "headers in the Request-URI"));
            Uri::Sip(s)
        }
        Ok(u) => u,
        Err(e) => {
            found.get_or_insert(defect(400, format!("Request-URI: {e}")));
            opaque_uri(uri)
        }
    };
    if *version != "SIP/2.0" {
        let malformed = !version.starts_with("SIP/") || version.contains(char::is_whitespace);
        let code = if malformed { 400 } else { 505 };
        found.get_or_insert(defect(code, format!("version {version:?}")));
    }
    Ok(StartLine::Request {
        method: Method::parse(method),
        uri,
    })
}

/// Stands in for a Request-URI that did not parse, so the request can
/// still be answered 400.
fn opaque_uri(text: &str) -> Uri {
    Uri::Other {
        scheme: String::new(),
        rest: text.to_string(),
    }
}

/// RFC 3261 §8.2 / RFC 4475 checks on a framed message.
fn check(message: &Message) -> Result<(), Defect> {
    let h = &message.headers;
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        if h.get(name).is_none_or(|v| v.trim().is_empty()) {
            return Err(defect(400, format!("missing {name}")));
        }
    }
    for name in SINGLE_HEADERS {
        if h.count(name) > 1 {
            return Err(defect(400, format!("more than one {name}")));
        }
    }
    for via in h.get_all("Via") {
        Via::parse(via).map_err(|e| defect(400, format!("Via: {e}")))?;
    }
    for name in ["From", "To"] {
        if let Some(v) = h.get(name) {
            NameAddr::parse(v).map_err(|e| defect(400, format!("{name}: {e}")))?;
        }
    }
    for contact in h.get_all("Contact") {
        if contact.trim() != "*" {
            let n = NameAddr::parse(contact).map_err(|e| defect(400, format!("Contact: {e}")))?;
            if let Some(exp) = n.param("expires") {
                exp.parse::<u32>()
                    .map_err(|_| defect(400, format!("Contact expires {exp:?}")))?;
            }
        }
    }
    let cseq = h
        .get("CSeq")
        .map(CSeq::parse)
        .transpose()
        .map_err(|e| defect(400, e))?;
    if let Some(mf) = h.get("Max-Forwards") {
        mf.parse::<u8>()
            .map_err(|_| defect(400, format!("Max-Forwards {mf:?}")))?;
    }
    for name in ["Expires", "Retry-After"] {
        if let Some(v) = h.get(name) {
            delta_seconds(v).ok_or_else(|| defect(400, format!("{name} {v:?}")))?;
        }
    }
    if let Some(w) = h.get("Warning") {
        let code = w.split_whitespace().next().unwrap_or_default();
        if code.len() != 3 || code.parse::<u16>().is_err() {
            return Err(defect(400, format!("Warning code {code:?}")));
        }
    }
    if let (StartLine::Request { method, .. }, Some(cseq)) = (&message.start, cseq) {
        // An unknown method is answered 501 by the application; a CSeq
        // mismatch only matters for methods we implement.
        let known = !matches!(method, Method::Extension(_));
        if known && cseq.method != *method {
            return Err(defect(
                400,
                format!("CSeq method {} does not match {method}", cseq.method),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_framing_waits_for_the_body() {
        let msg = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 4\r\n\r\nab";
        assert_eq!(parse_stream(msg).err(), Some(FrameError::Incomplete));
        let mut full = msg.to_vec();
        full.extend_from_slice(b"cdOPTIONS");
        let (parsed, used) = parse_stream(&full).expect("framed");
        assert_eq!(used, msg.len() + 2);
        assert_eq!(&parsed.message.body[..], b"abcd");
        assert!(parsed.defect.is_none());
    }

    #[test]
    fn keepalives_are_skipped() {
        assert!(matches!(
            parse_datagram(b"\r\n\r\n"),
            Err(FrameError::Garbage(_))
        ));
    }

    #[test]
    fn serialised_message_parses_back() {
        let text = b"INVITE sip:bob@[2001:db8::1]:5062 SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bK1, SIP/2.0/UDP g;branch=z9hG4bK2\r\nf: <sip:a@b>;tag=1\r\nt: <sip:bob@b>\r\ni: x\r\nCSeq: 1 INVITE\r\nc: application/sdp\r\nl: 3\r\n\r\n\0\x01\x02";
        let parsed = parse_datagram(text).expect("framed");
        assert!(parsed.defect.is_none(), "{:?}", parsed.defect);
        let m = parsed.message;
        assert_eq!(m.headers.count("Via"), 2);
        assert_eq!(m.call_id(), Some("x"));
        assert_eq!(&m.body[..], b"\0\x01\x02");
        let again = parse_datagram(&m.to_bytes()).expect("reparsed");
        assert_eq!(again.message, m);
    }
}
