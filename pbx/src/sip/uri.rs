//! SIP URIs (RFC 3261 §19.1) and the name-addr / addr-spec forms of From,
//! To, Contact and Route (§20.10), including IPv6 references, escaped and
//! `;`-bearing user parts, URI headers, and URIs of schemes we do not serve
//! (kept opaque so they can be answered 416 or relayed).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UriError(pub String);

fn err<T>(what: impl Into<String>) -> Result<T, UriError> {
    Err(UriError(what.into()))
}

/// The host of a SIP URI or Via sent-by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    pub fn parse(text: &str) -> Result<Host, UriError> {
        if let Some(inner) = text.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| UriError(format!("unterminated IPv6 reference {text:?}")))?;
            return inner
                .parse::<Ipv6Addr>()
                .map(|ip| Host::Ip(IpAddr::V6(ip)))
                .map_err(|_| UriError(format!("bad IPv6 reference {text:?}")));
        }
        if text.is_empty() {
            return err("empty host");
        }
        if let Ok(ip) = text.parse::<std::net::Ipv4Addr>() {
            return Ok(Host::Ip(IpAddr::V4(ip)));
        }
        if !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return err(format!("bad host {text:?}"));
        }
        Ok(Host::Name(text.to_ascii_lowercase()))
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Name(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
        }
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Self {
        Host::Ip(ip)
    }
}

/// Splits `host[:port]`, where host may be an IPv6 reference.
pub fn split_host_port(text: &str) -> Result<(Host, Option<u16>), UriError> {
    let (host, port) = if text.starts_with('[') {
        match text.find(']') {
            Some(end) => {
                let rest = &text[end + 1..];
                let port = match rest.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if rest.is_empty() => None,
                    None => return err(format!("junk after IPv6 reference in {text:?}")),
                };
                (&text[..=end], port)
            }
            None => return err(format!("unterminated IPv6 reference {text:?}")),
        }
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| UriError(format!("bad port {p:?}")))?,
        ),
        None => None,
    };
    Ok((Host::parse(host)?, port))
}

/// A `;name[=value]` parameter, kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub value: Option<String>,
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, ";{}={}", self.name, v),
            None => write!(f, ";{}", self.name),
        }
    }
}

pub fn find_param<'a>(params: &'a [Param], name: &str) -> Option<&'a Param> {
    params.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

/// A SIP or SIPS URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    pub secure: bool,
    /// User part as written (still %-escaped).
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: Host,
    pub port: Option<u16>,
    pub params: Vec<Param>,
    /// `?h=v&..` as written, without the `?`.
    pub headers: Option<String>,
}

/// Any URI: SIP/SIPS parsed, other schemes kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    Sip(SipUri),
    Other { scheme: String, rest: String },
}

fn is_uri_char(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"')
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

impl Uri {
    pub fn parse(text: &str) -> Result<Uri, UriError> {
        if text.is_empty() || !text.bytes().all(is_uri_char) {
            return err(format!("bad characters in URI {text:?}"));
        }
        let (scheme, rest) = text
            .split_once(':')
            .ok_or_else(|| UriError(format!("no scheme in URI {text:?}")))?;
        let scheme_ok = scheme
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if !scheme_ok {
            return err(format!("bad URI scheme {scheme:?}"));
        }
        let secure = if scheme.eq_ignore_ascii_case("sip") {
            false
        } else if scheme.eq_ignore_ascii_case("sips") {
            true
        } else {
            return Ok(Uri::Other {
                scheme: scheme.to_string(),
                rest: rest.to_string(),
            });
        };
        // '@' cannot appear unescaped after the user part, while the user
        // part may hold '?' and ';' (RFC 3261 user-unreserved).
        let (userinfo, after_user) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (hostpart, headers) = match after_user.split_once('?') {
            Some((m, h)) => (m, Some(h.to_string())),
            None => (after_user, None),
        };
        let (user, password) = match userinfo {
            Some(info) => {
                let (u, p) = match info.split_once(':') {
                    Some((u, p)) => (u, Some(p.to_string())),
                    None => (info, None),
                };
                if u.is_empty() {
                    return err(format!("empty user in URI {text:?}"));
                }
                (Some(u.to_string()), p)
            }
            None => (None, None),
        };
        let mut pieces = hostpart.split(';');
        let hostport = pieces.next().unwrap_or_default();
        let (host, port) = split_host_port(hostport)?;
        let params = pieces
            .map(|p| {
                if p.is_empty() {
                    return err(format!("empty URI parameter in {text:?}"));
                }
                Ok(match p.split_once('=') {
                    Some((n, v)) => Param {
                        name: n.to_string(),
                        value: Some(v.to_string()),
                    },
                    None => Param {
                        name: p.to_string(),
                        value: None,
                    },
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Uri::Sip(SipUri {
            secure,
            user,
            password,
            host,
            port,
            params,
            headers,
        }))
    }

    pub fn sip(&self) -> Option<&SipUri> {
        match self {
            Uri::Sip(s) => Some(s),
            Uri::Other { .. } => None,
        }
    }

    pub fn scheme(&self) -> &str {
        match self {
            Uri::Sip(s) if s.secure => "sips",
            Uri::Sip(_) => "sip",
            Uri::Other { scheme, .. } => scheme,
        }
    }
}

impl SipUri {
    /// The user part with %-escapes decoded (RFC 3261 §19.1.4 comparison).
    pub fn user_unescaped(&self) -> Option<String> {
        self.user.as_deref().map(unescape)
    }

    pub fn param(&self, name: &str) -> Option<&Param> {
        find_param(&self.params, name)
    }

    /// A URI `sip:user@host:port` with nothing else.
    pub fn new(user: Option<&str>, host: Host, port: Option<u16>) -> SipUri {
        SipUri {
            secure: false,
            user: user.map(str::to_string),
            password: None,
            host,
            port,
            params: Vec::new(),
            headers: None,
        }
    }
}

/// Decodes %HH escapes; malformed escapes are kept literally.
pub fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Display for SipUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "sips:" } else { "sip:" })?;
        if let Some(user) = &self.user {
            f.write_str(user)?;
            if let Some(pw) = &self.password {
                write!(f, ":{pw}")?;
            }
            f.write_str("@")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for p in &self.params {
            write!(f, "{p}")?;
        }
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Sip(s) => write!(f, "{s}"),
            Uri::Other { scheme, rest } => write!(f, "{scheme}:{rest}"),
        }
    }
}

/// From, To, Contact, Route and Record-Route values:
/// `["display"] <uri> *(;param)` or `uri *(;param)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    pub uri: Uri,
    pub params: Vec<Param>,
}

impl NameAddr {
    pub fn new(uri: Uri) -> Self {
        NameAddr {
            display: None,
            uri,
            params: Vec::new(),
        }
    }

    pub fn parse(text: &str) -> Result<NameAddr, UriError> {
        let text = text.trim();
        let (display, uri, rest) = if let Some(open) = find_unquoted(text, b'<') {
            let display = parse_display_name(text[..open].trim())?;
            let close = text[open..]
                .find('>')
                .map(|c| c + open)
                .ok_or_else(|| UriError(format!("unterminated <> in {text:?}")))?;
            let uri = Uri::parse(&text[open + 1..close])?;
            (display, uri, &text[close + 1..])
        } else {
            if text.starts_with('"') {
                return err(format!("quoted display name without <uri> in {text:?}"));
            }
            // addr-spec form: parameters after the URI belong to the header.
            let end = text.find(';').unwrap_or(text.len());
            let spec = &text[..end];
            if spec.contains('?') || spec.contains(',') {
                return err(format!("addr-spec with headers must be in <>: {text:?}"));
            }
            (None, Uri::parse(spec.trim())?, &text[end..])
        };
        Ok(NameAddr {
            display,
            uri,
            params: parse_params(rest)?,
        })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        find_param(&self.params, name).and_then(|p| p.value.as_deref())
    }

    pub fn tag(&self) -> Option<&str> {
        self.param("tag")
    }

    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        self.params.retain(|p| !p.name.eq_ignore_ascii_case(name));
        self.params.push(Param {
            name: name.to_string(),
            value: value.map(str::to_string),
        });
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "\"{}\" ", d.replace('\\', "\\\\").replace('"', "\\\""))?;
        }
        write!(f, "<{}>", self.uri)?;
        for p in &self.params {
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Finds `needle` outside double quotes.
pub fn find_unquoted(text: &str, needle: u8) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in text.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if !quoted && b == needle {
            return Some(i);
        }
    }
    None
}

fn parse_display_name(text: &str) -> Result<Option<String>, UriError> {
    if text.is_empty() {
        return Ok(None);
    }
    if let Some(inner) = text.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = inner.chars();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some(c) => out.push(c),
                    None => return err("unterminated quoted display name"),
                },
                Some('"') => break,
                Some(c) => out.push(c),
                None => return err("unterminated quoted display name"),
            }
        }
        if !chars.as_str().trim().is_empty() {
            return err(format!("junk after quoted display name in {text:?}"));
        }
        return Ok(Some(out));
    }
    if text
        .split_ascii_whitespace()
        .all(|word| word.bytes().all(is_token_char))
    {
        Ok(Some(text.to_string()))
    } else {
        err(format!("display name {text:?} must be quoted"))
    }
}

/// Parses `;name[=value]` parameters after a URI or Via, with LWS allowed
/// around `;` and `=`, and values that are tokens, hosts or quoted strings.
pub fn parse_params(text: &str) -> Result<Vec<Param>, UriError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let body = text
        .strip_prefix(';')
        .ok_or_else(|| UriError(format!("expected ';' before {text:?}")))?;
    split_unquoted(body, b';')
        .into_iter()
        .map(|piece| {
            let piece = piece.trim();
            let (name, value) = match piece.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (piece, None),
            };
            if name.is_empty() || !name.bytes().all(is_token_char) {
                return err(format!("bad parameter {piece:?}"));
            }
            if let Some(v) = value {
                let quoted = v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
                let plain =
                    !v.is_empty() && v.bytes().all(|b| is_token_char(b) || b"[]:".contains(&b));
                if !quoted && !plain {
                    return err(format!("bad parameter value {piece:?}"));
                }
            }
            Ok(Param {
                name: name.to_string(),
                value: value.map(str::to_string),
            })
        })
        .collect()
}

/// Splits on `sep` outside quotes and angle brackets.
pub fn split_unquoted(text: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    let mut angle = 0usize;
    for (i, b) in text.bytes().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'<' if !quoted => angle += 1,
            b'>' if !quoted => angle = angle.saturating_sub(1),
            _ if b == sep && !quoted && angle == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sip(text: &str) -> SipUri {
        match Uri::parse(text) {
            Ok(Uri::Sip(s)) => s,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn ipv6_hosts_and_ports() {
        let u = sip("sip:alice@[2001:db8::10]:5070;transport=udp");
        assert_eq!(u.host, Host::Ip("2001:db8::10".parse().unwrap()));
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.to_string(), "sip:alice@[2001:db8::10]:5070;transport=udp");
        assert_eq!(sip("sip:[::1]").host, Host::Ip("::1".parse().unwrap()));
    }

    #[test]
    fn user_part_with_semicolons_and_escapes() {
        let u = sip("sip:user;par=u%40example.net@example.com");
        assert_eq!(u.user.as_deref(), Some("user;par=u%40example.net"));
        assert_eq!(u.host, Host::Name("example.com".into()));
        assert_eq!(
            u.user_unescaped().as_deref(),
            Some("user;par=u@example.net")
        );
        let u = sip("sip:sip%3Auser%40example.com@company.com;other-param=summit");
        assert_eq!(u.user_unescaped().as_deref(), Some("sip:user@example.com"));
        assert_eq!(
            u.param("other-param").and_then(|p| p.value.as_deref()),
            Some("summit")
        );
    }

    #[test]
    fn headers_and_other_schemes() {
        let u = sip("sip:alice@atlanta.com?Route=%3Csip:sip.example.com%3E");
        assert_eq!(
            u.headers.as_deref(),
            Some("Route=%3Csip:sip.example.com%3E")
        );
        assert!(matches!(
            Uri::parse("tel:+12125551212"),
            Ok(Uri::Other { .. })
        ));
        assert_eq!(
            Uri::parse("soap.beep://192.0.2.103:3002").unwrap().scheme(),
            "soap.beep"
        );
        assert!(Uri::parse("sip:user@example.com>").is_err());
        assert!(Uri::parse("sip:us er@example.com").is_err());
        assert!(Uri::parse("sip:user@host:99999").is_err());
        let odd = sip("sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,;oh@example.com");
        assert_eq!(odd.host, Host::Name("example.com".into()));
        assert_eq!(odd.headers, None);
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(
            "\"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8",
        )
        .unwrap();
        assert_eq!(n.display.as_deref(), Some("J Rosenberg \\\""));
        assert_eq!(n.tag(), Some("98asjd8"));
        let n = NameAddr::parse("sip:caller@example.net;tag=134161461246").unwrap();
        assert_eq!(n.tag(), Some("134161461246"));
        assert!(n.uri.sip().unwrap().params.is_empty());
        let n = NameAddr::parse("caller<sip:caller@example.com>;tag=323").unwrap();
        assert_eq!(n.display.as_deref(), Some("caller"));
        assert!(NameAddr::parse("\"Watson, Thomas\" < sip:t.watson@example.org >").is_err());
        assert!(NameAddr::parse("Bell, Alexander <sip:a.g.bell@example.com>;tag=43").is_err());
        assert!(NameAddr::parse("\"Mr. J. User <sip:j.user@example.com>").is_err());
        assert!(NameAddr::parse("sip:user@example.com?Route=%3Csip:sip.example.com%3E").is_err());
        assert!(NameAddr::parse("\"Joe\" <sip:joe@example.org>;;;;").is_err());
        assert!(NameAddr::parse("isbn:2983792873").is_ok());
    }
}
