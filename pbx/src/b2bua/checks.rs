//! The checks a user agent server makes before acting on a request
//! (RFC 3261 §8.2, §16.3 and RFC 4475 §3.3): method, URI scheme, Require,
//! body type, Accept, Max-Forwards and loops. Each failure is the response
//! the RFC asks for.

use crate::sip::message::{Message, Method};
use crate::sip::uri::Uri;

/// Option tags the PBX supports end to end.
pub const SUPPORTED: [&str; 2] = ["100rel", "timer"];
pub const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, PRACK, UPDATE, INFO, REGISTER";
pub const ACCEPT: &str = "application/sdp";

/// A request the PBX answers itself with `code` and these extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub headers: Vec<(&'static str, String)>,
}

impl Refusal {
    fn plain(code: u16) -> Self {
        Self {
            code,
            headers: Vec::new(),
        }
    }
}

/// Checks for a request outside any dialog.
pub fn check_new_request(request: &Message) -> Result<(), Refusal> {
    let Some(method) = request.method() else {
        return Ok(());
    };
    let handled = matches!(
        method,
        Method::Invite | Method::Options | Method::Register | Method::Bye | Method::Cancel
    ) || matches!(
        method,
        Method::Ack | Method::Prack | Method::Update | Method::Info
    );
    if !handled {
        return Err(Refusal {
            code: 501,
            headers: vec![("Allow", ALLOW.to_string())],
        });
    }
    match request.request_uri() {
        Some(Uri::Sip(_)) => {}
        _ => return Err(Refusal::plain(416)),
    }
    check_require(request)?;
    if *method == Method::Invite {
        check_body(request)?;
        let accepts_sdp = request.headers.get("Accept").is_none()
            || request.headers.get_all("Accept").any(|a| {
                let a = a.split(';').next().unwrap_or_default().trim();
                ["application/sdp", "application/*", "*/*"]
                    .iter()
                    .any(|ok| a.eq_ignore_ascii_case(ok))
            });
        if !accepts_sdp {
            return Err(Refusal {
                code: 406,
                headers: vec![("Accept", ACCEPT.to_string())],
            });
        }
    }
    Ok(())
}

/// 420 for option tags in Require or Proxy-Require that we do not support.
pub fn check_require(request: &Message) -> Result<(), Refusal> {
    if matches!(request.method(), Some(Method::Ack | Method::Cancel)) {
        return Ok(());
    }
    let unsupported: Vec<String> = request
        .headers
        .tokens("Require")
        .chain(request.headers.tokens("Proxy-Require"))
        .filter(|t| !SUPPORTED.contains(&t.as_str()))
        .collect();
    if unsupported.is_empty() {
        Ok(())
    } else {
        Err(Refusal {
            code: 420,
            headers: vec![("Unsupported", unsupported.join(", "))],
        })
    }
}

/// 415 for a body where the PBX must understand it and finds no SDP (a
/// multipart body's other parts, such as SIP-I's ISUP, are left behind).
pub fn check_body(request: &Message) -> Result<(), Refusal> {
    if request.body.is_empty() || request.sdp().is_some() {
        return Ok(());
    }
    Err(Refusal {
        code: 415,
        headers: vec![("Accept", ACCEPT.to_string())],
    })
}

/// Max-Forwards of the forwarded request, or 483 when it is spent.
pub fn forwarded_max_forwards(request: &Message) -> Result<u8, Refusal> {
    let mf = request
        .headers
        .get("Max-Forwards")
        .and_then(|v| v.trim().parse::<u8>().ok())
        .unwrap_or(70);
    if mf == 0 {
        Err(Refusal::plain(483))
    } else {
        Ok(mf - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::parse_datagram;

    fn request(extra: &str, method: &str, uri: &str) -> Message {
        let text = format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\nCSeq: 1 {method}\r\n{extra}\r\n"
        );
        parse_datagram(text.as_bytes()).expect("framed").message
    }

    #[test]
    fn refusals() {
        let code = |m: &Message| check_new_request(m).err().map(|r| r.code);
        assert_eq!(code(&request("", "INVITE", "sip:x@y")), None);
        assert_eq!(code(&request("", "NEWMETHOD", "sip:x@y")), Some(501));
        assert_eq!(code(&request("", "INVITE", "tel:+1555")), Some(416));
        assert_eq!(
            code(&request(
                "Require: nothingtoseehere\r\n",
                "OPTIONS",
                "sip:x@y"
            )),
            Some(420)
        );
        assert_eq!(
            code(&request("Require: 100rel\r\n", "INVITE", "sip:x@y")),
            None
        );
        assert_eq!(
            code(&request(
                "Content-Type: application/unknown\r\nContent-Length: 2\r\n\r\nab",
                "INVITE",
                "sip:x@y"
            )),
            Some(415)
        );
        assert_eq!(
            code(&request("Accept: text/plain\r\n", "INVITE", "sip:x@y")),
            Some(406)
        );
        let multipart = |parts: &str| {
            let body = format!("--b\r\n{parts}\r\n--b--\r\n");
            format!(
                "Content-Type: multipart/mixed; boundary=\"b\"\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let sip_i = multipart(
            "Content-Type: application/sdp\r\n\r\nv=0\r\n\r\n--b\r\nContent-Type: application/isup\r\n\r\n\x01",
        );
        assert_eq!(code(&request(&sip_i, "INVITE", "sip:x@y")), None);
        let isup_only = multipart("Content-Type: application/isup\r\n\r\n\x01");
        assert_eq!(code(&request(&isup_only, "INVITE", "sip:x@y")), Some(415));
        assert_eq!(
            forwarded_max_forwards(&request("Max-Forwards: 0\r\n", "INVITE", "sip:x@y"))
                .err()
                .map(|r| r.code),
            Some(483)
        );
    }
}
