//! SIP requests and responses as the rest of the PBX sees them: a start
//! line, headers in order (unknown ones kept verbatim), and the body as
//! bytes; plus typed views of the headers every layer needs (Via, CSeq,
//! From/To) and serialisation with a Content-Length that frames the body.

use std::fmt::{self, Write as _};

use bytes::{BufMut, Bytes, BytesMut};

use super::multipart;
use super::uri::{find_param, parse_params, split_host_port, Host, NameAddr, Param, Uri};

/// Request methods; anything else is kept as an extension method.
/// Methods are case-sensitive (RFC 3261 §7.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Options,
    Register,
    Prack,
    Update,
    Info,
    Message,
    Notify,
    Subscribe,
    Refer,
    Publish,
    Extension(String),
}

impl Method {
    pub fn parse(text: &str) -> Method {
        match text {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            "REGISTER" => Method::Register,
            "PRACK" => Method::Prack,
            "UPDATE" => Method::Update,
            "INFO" => Method::Info,
            "MESSAGE" => Method::Message,
            "NOTIFY" => Method::Notify,
            "SUBSCRIBE" => Method::Subscribe,
            "REFER" => Method::Refer,
            "PUBLISH" => Method::Publish,
            other => Method::Extension(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Register => "REGISTER",
            Method::Prack => "PRACK",
            Method::Update => "UPDATE",
            Method::Info => "INFO",
            Method::Message => "MESSAGE",
            Method::Notify => "NOTIFY",
            Method::Subscribe => "SUBSCRIBE",
            Method::Refer => "REFER",
            Method::Publish => "PUBLISH",
            Method::Extension(m) => m,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: Method, uri: Uri },
    Response { code: u16, reason: String },
}

/// One header line; list headers are split into one entry per value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<Header>);

impl Headers {
    pub fn iter(&self) -> impl Iterator<Item = &Header> {
        self.0.iter()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    pub fn count(&self, name: &str) -> usize {
        self.get_all(name).count()
    }

    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push(Header {
            name: name.into(),
            value: value.into(),
        });
    }

    /// Inserts before every other header (a new top Via).
    pub fn push_front(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(
            0,
            Header {
                name: name.into(),
                value: value.into(),
            },
        );
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|h| !h.name.eq_ignore_ascii_case(name));
    }

    /// Replaces every value of `name` with one.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self
            .0
            .iter()
            .position(|h| h.name.eq_ignore_ascii_case(name))
        {
            Some(i) => {
                self.0[i].value = value;
                let mut seen = 0;
                self.0.retain(|h| {
                    if h.name.eq_ignore_ascii_case(name) {
                        seen += 1;
                        seen == 1
                    } else {
                        true
                    }
                });
            }
            None => self.push(name.to_string(), value),
        }
    }

    /// The first value of `name` rewritten in place.
    pub fn first_mut(&mut self, name: &str) -> Option<&mut String> {
        self.0
            .iter_mut()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| &mut h.value)
    }

    /// Option tags of Supported/Require-like headers, lower-cased.
    pub fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = String> + 'a {
        self.get_all(name)
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
    }

    pub(crate) fn from_vec(headers: Vec<Header>) -> Self {
        Headers(headers)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start: StartLine,
    pub headers: Headers,
    pub body: Bytes,
}

/// The magic cookie of RFC 3261 branches.
pub const BRANCH_COOKIE: &str = "z9hG4bK";

/// A parsed Via value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub transport: String,
    pub host: Host,
    pub port: Option<u16>,
    pub params: Vec<Param>,
}

impl Via {
    pub fn parse(text: &str) -> Result<Via, String> {
        let text = text.trim();
        // "SIP / 2.0 / UDP host" may carry LWS around the slashes.
        let mut rest = text;
        let mut proto = Vec::with_capacity(3);
        for i in 0..3 {
            let (part, tail) = if i < 2 {
                rest.split_once('/')
                    .ok_or_else(|| format!("bad Via protocol in {text:?}"))?
            } else {
                let t = rest.trim_start();
                let end = t
                    .find(|c: char| c.is_ascii_whitespace())
                    .ok_or_else(|| format!("no sent-by in Via {text:?}"))?;
                (&t[..end], &t[end..])
            };
            proto.push(part.trim());
            rest = tail;
        }
        if !proto[0].eq_ignore_ascii_case("SIP") || proto[1] != "2.0" {
            return Err(format!("bad Via protocol in {text:?}"));
        }
        let rest = rest.trim_start();
        let end = rest.find(';').unwrap_or(rest.len());
        let (host, port) = split_host_port(rest[..end].trim()).map_err(|e| e.0)?;
        let params = parse_params(&rest[end..]).map_err(|e| e.0)?;
        Ok(Via {
            transport: proto[2].to_ascii_uppercase(),
            host,
            port,
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<&Param> {
        find_param(&self.params, name)
    }

    pub fn branch(&self) -> Option<&str> {
        self.param("branch").and_then(|p| p.value.as_deref())
    }

    /// An RFC 3261 branch (magic cookie and something after it).
    pub fn rfc3261_branch(&self) -> Option<&str> {
        self.branch()
            .filter(|b| b.len() > BRANCH_COOKIE.len() && b.starts_with(BRANCH_COOKIE))
    }

    pub fn set_param(&mut self, name: &str, value: Option<String>) {
        self.params.retain(|p| !p.name.eq_ignore_ascii_case(name));
        self.params.push(Param {
            name: name.to_string(),
            value,
        });
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for p in &self.params {
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: Method,
}

impl CSeq {
    pub fn parse(text: &str) -> Result<CSeq, String> {
        let mut parts = text.split_ascii_whitespace();
        let (Some(num), Some(method), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("bad CSeq {text:?}"));
        };
        let seq = num
            .parse::<u32>()
            .ok()
            .filter(|n| *n < 1 << 31)
            .ok_or_else(|| format!("CSeq number {num:?} out of range"))?;
        Ok(CSeq {
            seq,
            method: Method::parse(method),
        })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

/// The delta-seconds an Expires or Retry-After value starts with; a comment
/// or parameters may follow (RFC 3261 §20.33).
pub fn delta_seconds(value: &str) -> Option<u32> {
    value.split([';', '(', ' ']).next()?.parse().ok()
}

/// Default reason phrases for the codes the PBX generates.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        _ => "Unknown",
    }
}

impl Message {
    pub fn request(method: Method, uri: Uri) -> Message {
        Message {
            start: StartLine::Request { method, uri },
            headers: Headers::default(),
            body: Bytes::new(),
        }
    }

    /// A response to `request` per RFC 3261 §8.2.6: Via, From, To, Call-ID
    /// and CSeq copied; `to_tag` added to To when it has none.
    pub fn response_to(request: &Message, code: u16, to_tag: Option<&str>) -> Message {
        let mut headers = Headers::default();
        for h in request.headers.iter() {
            let copy = ["Via", "From", "Call-ID", "CSeq"]
                .iter()
                .any(|n| h.name.eq_ignore_ascii_case(n));
            if copy {
                headers.push(h.name.clone(), h.value.clone());
            } else if h.name.eq_ignore_ascii_case("To") {
                let mut value = h.value.clone();
                if let Some(tag) = to_tag {
                    let has_tag = NameAddr::parse(&value)
                        .map(|n| n.tag().is_some())
                        .unwrap_or(true);
                    if !has_tag {
                        let _ = write!(value, ";tag={tag}");
                    }
                }
                headers.push("To", value);
            }
        }
        Message {
            start: StartLine::Response {
                code,
                reason: reason_phrase(code).to_string(),
            },
            headers,
            body: Bytes::new(),
        }
    }

    pub fn method(&self) -> Option<&Method> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    pub fn code(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn request_uri(&self) -> Option<&Uri> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    pub fn call_id(&self) -> Option<&str> {
        self.headers.get("Call-ID").map(str::trim)
    }

    pub fn cseq(&self) -> Option<CSeq> {
        self.headers.get("CSeq").and_then(|v| CSeq::parse(v).ok())
    }

    pub fn top_via(&self) -> Option<Via> {
        self.headers.get("Via").and_then(|v| Via::parse(v).ok())
    }

    pub fn vias(&self) -> impl Iterator<Item = Via> + '_ {
        self.headers
            .get_all("Via")
            .filter_map(|v| Via::parse(v).ok())
    }

    pub fn from(&self) -> Option<NameAddr> {
        self.headers
            .get("From")
            .and_then(|v| NameAddr::parse(v).ok())
    }

    pub fn to(&self) -> Option<NameAddr> {
        self.headers.get("To").and_then(|v| NameAddr::parse(v).ok())
    }

    pub fn from_tag(&self) -> Option<String> {
        self.from().and_then(|f| f.tag().map(str::to_string))
    }

    pub fn to_tag(&self) -> Option<String> {
        self.to().and_then(|t| t.tag().map(str::to_string))
    }

    /// First Contact URI.
    pub fn contact_uri(&self) -> Option<Uri> {
        self.headers
            .get("Contact")
            .and_then(|v| NameAddr::parse(v).ok())
            .map(|n| n.uri)
    }

    pub fn content_type(&self) -> Option<String> {
        self.headers.get("Content-Type").map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
    }

    /// The SDP session description the body is, or holds as a part of a
    /// multipart body (RFC 5621: SIP-I trunks send it beside ISUP).
    pub fn sdp(&self) -> Option<Bytes> {
        if self.body.is_empty() {
            return None;
        }
        let content_type = self.content_type()?;
        if content_type == "application/sdp" {
            return Some(self.body.clone());
        }
        if !content_type.starts_with("multipart/") {
            return None;
        }
        let boundary = self.content_type_param("boundary")?;
        multipart::part(&self.body, &boundary, "application/sdp").filter(|sdp| !sdp.is_empty())
    }

    /// A parameter of the Content-Type header, unquoted.
    fn content_type_param(&self, name: &str) -> Option<String> {
        let value = self.headers.get("Content-Type")?;
        let params = parse_params(value.get(value.find(';')?..)?).ok()?;
        let value = find_param(&params, name)?.value.as_deref()?;
        Some(value.trim_matches('"').to_string())
    }

    pub fn set_body(&mut self, content_type: Option<&str>, body: Bytes) {
        self.headers.remove("Content-Type");
        if let Some(ct) = content_type {
            self.headers.push("Content-Type", ct);
        }
        self.body = body;
    }

    /// Wire form; Content-Length always states the body's length.
    pub fn to_bytes(&self) -> Bytes {
        let mut head = String::with_capacity(512);
        match &self.start {
            StartLine::Request { method, uri } => {
                let _ = write!(head, "{method} {uri} SIP/2.0\r\n");
            }
            StartLine::Response { code, reason } => {
                let _ = write!(head, "SIP/2.0 {code} {reason}\r\n");
            }
        }
        for h in self.headers.iter() {
            if !h.name.eq_ignore_ascii_case("Content-Length") {
                let _ = write!(head, "{}: {}\r\n", h.name, h.value);
            }
        }
        let _ = write!(head, "Content-Length: {}\r\n\r\n", self.body.len());
        let mut out = BytesMut::with_capacity(head.len() + self.body.len());
        out.put_slice(head.as_bytes());
        out.put_slice(&self.body);
        out.freeze()
    }

    /// One line for logs: "INVITE sip:x" or "200 OK (INVITE)".
    pub fn summary(&self) -> String {
        match &self.start {
            StartLine::Request { method, uri } => format!("{method} {uri}"),
            StartLine::Response { code, reason } => {
                let method = self
                    .cseq()
                    .map(|c| c.method.to_string())
                    .unwrap_or_default();
                format!("{code} {reason} ({method})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_with_lws_and_ipv6() {
        let v = Via::parse("SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.branch(), Some("390skdjuw"));
        assert_eq!(v.rfc3261_branch(), None);
        let v = Via::parse("SIP/2.0/UDP [2001:db8::9:1]:5060;branch=z9hG4bKas3-111;rport").unwrap();
        assert_eq!(v.port, Some(5060));
        assert_eq!(
            v.to_string(),
            "SIP/2.0/UDP [2001:db8::9:1]:5060;branch=z9hG4bKas3-111;rport"
        );
        assert!(Via::parse("SIP/2.0/UDP 192.0.2.15;;,;,,").is_err());
        assert_eq!(
            Via::parse("SIP/2.0/UDP host;branch=z9hG4bK")
                .unwrap()
                .rfc3261_branch(),
            None
        );
    }

    #[test]
    fn cseq_bounds() {
        assert_eq!(CSeq::parse("0009\r\n  INVITE").unwrap().seq, 9);
        assert!(CSeq::parse("36893488147419103232 REGISTER").is_err());
        assert!(CSeq::parse("2147483648 INVITE").is_err());
        assert_eq!(
            CSeq::parse("29344 RE%47IST%45R").unwrap().method,
            Method::Extension("RE%47IST%45R".into())
        );
    }

    #[test]
    fn headers_set_replaces_all_values() {
        let mut h = Headers::default();
        h.push("Max-Forwards", "70");
        h.push("Via", "a");
        h.push("max-forwards", "5");
        h.set("Max-Forwards", "69");
        assert_eq!(h.get_all("Max-Forwards").collect::<Vec<_>>(), vec!["69"]);
        assert_eq!(h.get("Via"), Some("a"));
    }

    #[test]
    fn methods_are_case_sensitive() {
        assert_eq!(Method::parse("INVITE"), Method::Invite);
        assert_eq!(Method::parse("invite"), Method::Extension("invite".into()));
    }
}
