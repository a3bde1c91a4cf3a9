//! HTTP digest as SIP uses it (RFC 3261 §22, RFC 7616, RFC 8760): the
//! credentials of an Authorization / Proxy-Authorization header, the
//! hashes of the MD5 and SHA-256 algorithms, and the response a client
//! must send for qop=auth.

use md5::{Digest as _, Md5};
use sha2::Sha256;

/// A digest algorithm the PBX offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Algorithm> {
        if name.eq_ignore_ascii_case("MD5") {
            Some(Algorithm::Md5)
        } else if name.eq_ignore_ascii_case("SHA-256") {
            Some(Algorithm::Sha256)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Lower-case hex of the hash of `text`.
    pub fn hash(self, text: &str) -> String {
        match self {
            Algorithm::Md5 => hex::encode(Md5::digest(text.as_bytes())),
            Algorithm::Sha256 => hex::encode(Sha256::digest(text.as_bytes())),
        }
    }

    /// H(username:realm:password).
    pub fn ha1(self, username: &str, realm: &str, password: &str) -> String {
        self.hash(&format!("{username}:{realm}:{password}"))
    }
}

/// The parameters of a `Digest` credentials header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    /// Absent means MD5 (RFC 7616 §3.4).
    pub algorithm: Option<String>,
    pub cnonce: Option<String>,
    pub qop: Option<String>,
    pub nc: Option<String>,
    pub opaque: Option<String>,
}

/// Why a credentials header could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("authorization scheme {0:?} is not Digest")]
    Scheme(String),
    #[error("malformed digest parameters")]
    Syntax,
    #[error("digest parameter {0} missing")]
    Missing(&'static str),
}

impl Credentials {
    /// Parses `Digest k=v, k="v", ...`.
    pub fn parse(value: &str) -> Result<Credentials, CredentialsError> {
        let value = value.trim();
        let (scheme, rest) = value
            .split_once(|c: char| c.is_ascii_whitespace())
            .unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("Digest") {
            return Err(CredentialsError::Scheme(scheme.to_string()));
        }
        let mut c = Credentials::default();
        let (mut username, mut realm, mut nonce, mut uri, mut response) =
            (None, None, None, None, None);
        for (name, value) in params(rest)? {
            let slot = match name.to_ascii_lowercase().as_str() {
                "username" => &mut username,
                "realm" => &mut realm,
                "nonce" => &mut nonce,
                "uri" => &mut uri,
                "response" => &mut response,
                "algorithm" => &mut c.algorithm,
                "cnonce" => &mut c.cnonce,
                "qop" => &mut c.qop,
                "nc" => &mut c.nc,
                "opaque" => &mut c.opaque,
                _ => continue,
            };
            *slot = Some(value);
        }
        c.username = username.ok_or(CredentialsError::Missing("username"))?;
        c.realm = realm.ok_or(CredentialsError::Missing("realm"))?;
        c.nonce = nonce.ok_or(CredentialsError::Missing("nonce"))?;
        c.uri = uri.ok_or(CredentialsError::Missing("uri"))?;
        c.response = response.ok_or(CredentialsError::Missing("response"))?;
        Ok(c)
    }

    /// The response expected for `ha1` and `method` (qop=auth, or RFC 2069
    /// without qop).
    pub fn expected_response(&self, algorithm: Algorithm, ha1: &str, method: &str) -> String {
        let ha2 = algorithm.hash(&format!("{method}:{}", self.uri));
        match (&self.qop, &self.nc, &self.cnonce) {
            (Some(qop), Some(nc), Some(cnonce)) => {
                algorithm.hash(&format!("{ha1}:{}:{nc}:{cnonce}:{qop}:{ha2}", self.nonce))
            }
            _ => algorithm.hash(&format!("{ha1}:{}:{ha2}", self.nonce)),
        }
    }
}

/// `name=value` pairs separated by commas; values may be quoted strings
/// with backslash escapes.
fn params(text: &str) -> Result<Vec<(String, String)>, CredentialsError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars
            .next_if(|c| c.is_ascii_whitespace() || *c == ',')
            .is_some()
        {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && *c != ',') {
            name.push(c);
        }
        if chars.next() != Some('=') {
            return Err(CredentialsError::Syntax);
        }
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => value.push(chars.next().ok_or(CredentialsError::Syntax)?),
                    Some(c) => value.push(c),
                    None => return Err(CredentialsError::Syntax),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != ',') {
                value.push(c);
            }
        }
        let name = name.trim();
        if name.is_empty() {
            return Err(CredentialsError::Syntax);
        }
        out.push((name.to_string(), value.trim().to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_2617_example_response() {
        // RFC 2617 §3.5 (HTTP), the classic MD5 qop=auth vector.
        let c = Credentials::parse(
            "Digest username=\"Mufasa\", realm=\"testrealm@host.com\", \
             nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", uri=\"/dir/index.html\", \
             qop=auth, nc=00000001, cnonce=\"0a4f113b\", \
             response=\"6629fae49393a05397450978507c4ef1\", \
             opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .expect("parses");
        let ha1 = Algorithm::Md5.ha1("Mufasa", "testrealm@host.com", "Circle Of Life");
        assert_eq!(c.expected_response(Algorithm::Md5, &ha1, "GET"), c.response);
    }

    #[test]
    fn rfc_7616_sha256_example_response() {
        // RFC 7616 §3.9.1.
        let c = Credentials::parse(
            "Digest username=\"Mufasa\", realm=\"http-auth@example.org\", \
             uri=\"/dir/index.html\", algorithm=SHA-256, \
             nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\", nc=00000001, \
             cnonce=\"f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ\", qop=auth, \
             response=\"753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1\", \
             opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\"",
        )
        .expect("parses");
        let ha1 = Algorithm::Sha256.ha1("Mufasa", "http-auth@example.org", "Circle of Life");
        assert_eq!(
            c.expected_response(Algorithm::Sha256, &ha1, "GET"),
            c.response
        );
    }

    #[test]
    fn other_schemes_and_garbage_are_errors() {
        assert_eq!(
            Credentials::parse("NoOneKnowsThisScheme opaque-data=here"),
            Err(CredentialsError::Scheme("NoOneKnowsThisScheme".into()))
        );
        assert!(Credentials::parse("Digest username=\"a").is_err());
        assert!(Credentials::parse("Digest =x").is_err());
        assert_eq!(
            Credentials::parse("Digest username=a"),
            Err(CredentialsError::Missing("realm"))
        );
    }
}
