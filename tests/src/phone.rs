//! A raw SIP phone for registrar tests: REGISTER with digest credentials
//! (MD5 or SHA-256, qop=auth) computed here, independently of the PBX.

use std::net::SocketAddr;
use std::time::Duration;

use md5::{Digest as _, Md5};
use sha2::Sha256;

use crate::SipClient;

const LIMIT: Duration = Duration::from_secs(5);

/// A challenge's parameters.
#[derive(Debug, Clone)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub algorithm: String,
    pub stale: bool,
}

/// The `WWW-Authenticate` / `Proxy-Authenticate` challenges of a response, in order.
pub fn challenges(response: &str) -> Vec<Challenge> {
    response
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            let name = name.trim().to_ascii_lowercase();
            (name == "www-authenticate" || name == "proxy-authenticate").then_some(value)
        })
        .map(|value| Challenge {
            realm: param(value, "realm").unwrap_or_default(),
            nonce: param(value, "nonce").unwrap_or_default(),
            algorithm: param(value, "algorithm").unwrap_or_else(|| "MD5".into()),
            stale: param(value, "stale").is_some_and(|s| s.eq_ignore_ascii_case("true")),
        })
        .collect()
}

/// Parameter `name` of a Digest challenge or credentials value, unquoted.
pub fn param(value: &str, name: &str) -> Option<String> {
    value.split(',').find_map(|part| {
        let (n, v) = part.trim().trim_start_matches("Digest ").split_once('=')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

fn hash(algorithm: &str, text: &str) -> String {
    if algorithm.eq_ignore_ascii_case("SHA-256") {
        hex::encode(Sha256::digest(text.as_bytes()))
    } else {
        hex::encode(Md5::digest(text.as_bytes()))
    }
}

/// The Authorization value answering `challenge`.
pub fn authorization(
    challenge: &Challenge,
    user: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
) -> String {
    let a = &challenge.algorithm;
    let ha1 = hash(a, &format!("{user}:{}:{password}", challenge.realm));
    let ha2 = hash(a, &format!("{method}:{uri}"));
    let nc = format!("{nc:08x}");
    let cnonce = "e2ecnonce";
    let response = hash(
        a,
        &format!("{ha1}:{}:{nc}:{cnonce}:auth:{ha2}", challenge.nonce),
    );
    format!(
        "Digest username=\"{user}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", response=\"{response}\", algorithm={a}, cnonce=\"{cnonce}\", qop=auth, nc={nc}",
        challenge.realm, challenge.nonce
    )
}

/// A phone registering `user` with the PBX at `pbx`.
pub struct Phone {
    pub client: SipClient,
    pub user: String,
    pbx: SocketAddr,
    call_id: String,
    cseq: u32,
}

impl Phone {
    pub fn new(user: &str, pbx: SocketAddr) -> Phone {
        let client = SipClient::new();
        let call_id = format!("reg-{user}-{}", client.addr().port());
        Phone {
            client,
            user: user.into(),
            pbx,
            call_id,
            cseq: 0,
        }
    }

    /// Sends a REGISTER with `headers` (Contact, Expires, Authorization
    /// lines) and returns the final response (code, text).
    pub fn register(&mut self, headers: &[String]) -> (u16, String) {
        self.cseq += 1;
        let (pbx, me, user) = (self.pbx, self.client.addr(), &self.user);
        let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
        let message = format!(
            "REGISTER sip:{pbx} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{}x{};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:{user}@{pbx}>;tag=t{}\r\nTo: <sip:{user}@{pbx}>\r\n\
             Call-ID: {}\r\nCSeq: {} REGISTER\r\n{extra}Content-Length: 0\r\n\r\n",
            self.call_id,
            self.cseq,
            self.call_id.len(),
            self.call_id,
            self.cseq
        );
        self.client.send(message.as_bytes(), pbx);
        self.client
            .final_response(LIMIT)
            .unwrap_or_else(|| panic!("no answer to REGISTER {}", self.cseq))
    }

    /// The Contact URI of this phone.
    pub fn contact(&self, tag: &str) -> String {
        format!("<sip:{}-{tag}@{}>", self.user, self.client.addr())
    }

    /// The Request-URI the REGISTERs carry (the digest `uri`).
    pub fn uri(&self) -> String {
        format!("sip:{}", self.pbx)
    }
}

/// The Contact values of a response.
pub fn contacts(response: &str) -> Vec<String> {
    response
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            let name = name.trim();
            (name.eq_ignore_ascii_case("contact") || name == "m").then(|| value.trim().to_string())
        })
        .collect()
}
