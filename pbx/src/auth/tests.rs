use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::digest::{Algorithm, Credentials};
use super::users::Directory;
use super::{Authenticator, Verdict};
use crate::config::{AuthConfig, UserConfig};
use crate::sip::message::Message;
use crate::sip::parse::parse_datagram;

const REALM: &str = "pbx.local";
const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn authenticator(config: AuthConfig) -> Authenticator {
    let users = [UserConfig {
        username: "1001".into(),
        password: Some("secret".into()),
        ..UserConfig::default()
    }];
    let directory = Directory::load(REALM, &users, None).expect("users");
    Authenticator::new(&config, REALM, directory, None)
}

fn request(method: &str, from_user: &str, authorization: Option<String>) -> Message {
    let header = match (method, authorization) {
        (_, None) => String::new(),
        ("REGISTER", Some(a)) => format!("Authorization: {a}\r\n"),
        (_, Some(a)) => format!("Proxy-Authorization: {a}\r\n"),
    };
    let text = format!(
        "{method} sip:pbx.local SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1\r\n\
         From: <sip:{from_user}@pbx.local>;tag=1\r\nTo: <sip:{from_user}@pbx.local>\r\n\
         Call-ID: c1\r\nCSeq: 1 {method}\r\nMax-Forwards: 70\r\n{header}Content-Length: 0\r\n\r\n"
    );
    parse_datagram(text.as_bytes()).expect("parses").message
}

/// A client's answer to the first challenge offering `algorithm`.
fn answer(
    challenges: &[String],
    algorithm: Algorithm,
    user: &str,
    password: &str,
    method: &str,
    nc: u32,
) -> String {
    let challenge = challenges
        .iter()
        .find(|c| c.contains(&format!("algorithm={}", algorithm.name())))
        .expect("challenge for the algorithm");
    let nonce = challenge
        .split("nonce=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("nonce");
    let mut c = Credentials {
        username: user.into(),
        realm: REALM.into(),
        nonce: nonce.into(),
        uri: "sip:pbx.local".into(),
        algorithm: Some(algorithm.name().into()),
        cnonce: Some("abc".into()),
        qop: Some("auth".into()),
        nc: Some(format!("{nc:08x}")),
        ..Credentials::default()
    };
    let ha1 = algorithm.ha1(user, REALM, password);
    c.response = c.expected_response(algorithm, &ha1, method);
    format!(
        "Digest username=\"{}\", realm=\"{REALM}\", nonce=\"{}\", uri=\"{}\", response=\"{}\", algorithm={}, cnonce=\"abc\", qop=auth, nc={}",
        c.username,
        c.nonce,
        c.uri,
        c.response,
        algorithm.name(),
        c.nc.unwrap_or_default()
    )
}

#[test]
fn both_algorithms_are_offered_sha256_first_and_accepted() {
    let mut auth = authenticator(AuthConfig::default());
    let now = Instant::now();
    let plain = request("REGISTER", "1001", None);
    assert_eq!(
        auth.check(&plain, SOURCE, now),
        Verdict::Challenge { stale: false }
    );
    let challenges = auth.challenges(false);
    assert_eq!(challenges.len(), 2);
    assert!(challenges[0].contains("algorithm=SHA-256"));
    assert!(challenges[1].contains("algorithm=MD5"));
    for (nc, algorithm) in [(1, Algorithm::Sha256), (2, Algorithm::Md5)] {
        let a = answer(&challenges, algorithm, "1001", "secret", "REGISTER", nc);
        let r = request("REGISTER", "1001", Some(a));
        assert_eq!(
            auth.check(&r, SOURCE, now),
            Verdict::Pass(Some("1001".into()))
        );
    }
}

#[test]
fn replayed_nonce_count_and_expired_nonce_are_stale() {
    let mut auth = authenticator(AuthConfig {
        nonce_seconds: 1,
        ..AuthConfig::default()
    });
    let now = Instant::now();
    let challenges = auth.challenges(false);
    let a = answer(&challenges, Algorithm::Md5, "1001", "secret", "INVITE", 1);
    let r = request("INVITE", "1001", Some(a));
    assert_eq!(
        auth.check(&r, SOURCE, now),
        Verdict::Pass(Some("1001".into()))
    );
    assert_eq!(
        auth.check(&r, SOURCE, now),
        Verdict::Challenge { stale: true }
    );
    std::thread::sleep(Duration::from_millis(2100));
    let a = answer(&challenges, Algorithm::Md5, "1001", "secret", "INVITE", 2);
    let r = request("INVITE", "1001", Some(a));
    assert_eq!(
        auth.check(&r, SOURCE, now),
        Verdict::Challenge { stale: true }
    );
}

#[test]
fn wrong_passwords_block_the_source_but_not_others() {
    let mut auth = authenticator(AuthConfig {
        max_failures: 3,
        ..AuthConfig::default()
    });
    let now = Instant::now();
    for nc in 1..=3 {
        let challenges = auth.challenges(false);
        let a = answer(&challenges, Algorithm::Md5, "1001", "guess", "REGISTER", nc);
        let r = request("REGISTER", "1001", Some(a));
        assert_eq!(
            auth.check(&r, SOURCE, now),
            Verdict::Challenge { stale: false }
        );
    }
    let challenges = auth.challenges(false);
    let good = answer(&challenges, Algorithm::Md5, "1001", "secret", "REGISTER", 1);
    let r = request("REGISTER", "1001", Some(good));
    assert!(matches!(auth.check(&r, SOURCE, now), Verdict::Forbidden(_)));
    let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));
    assert_eq!(
        auth.check(&r, other, now),
        Verdict::Pass(Some("1001".into()))
    );
    assert_eq!(
        auth.check(&r, SOURCE, now + Duration::from_secs(301)),
        Verdict::Challenge { stale: true },
        "unblocked after block_seconds (the nonce count was used)"
    );
}

#[test]
fn own_identity_only_and_trusted_sources_pass() {
    let mut auth = authenticator(AuthConfig {
        trusted_cidrs: vec!["10.0.0.0/8".into()],
        ..AuthConfig::default()
    });
    let now = Instant::now();
    let challenges = auth.challenges(false);
    let a = answer(
        &challenges,
        Algorithm::Sha256,
        "1001",
        "secret",
        "INVITE",
        1,
    );
    let r = request("INVITE", "1002", Some(a));
    assert!(matches!(auth.check(&r, SOURCE, now), Verdict::Forbidden(_)));
    let trusted = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    let plain = request("INVITE", "anyone", None);
    assert_eq!(auth.check(&plain, trusted, now), Verdict::Pass(None));
    let unknown = request(
        "REGISTER",
        "1001",
        Some("NoOneKnowsThisScheme opaque-data=here".into()),
    );
    assert_eq!(
        auth.check(&unknown, SOURCE, now),
        Verdict::Challenge { stale: false }
    );
}
