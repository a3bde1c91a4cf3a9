//! The registrar and digest authentication of the real `sip-pbx`: SIPp
//! REGISTER with `[authentication]` (MD5 with the system's SIPp 3.6.1,
//! SHA-256 with SIPp 3.7.3), a raw phone answering SHA-256 challenges, refresh/query/removal, expiry, wrong passwords and the
//! block that follows, stale nonces, unauthenticated INVITEs, and a call
//! between two registered users.

use std::time::{Duration, Instant};

use sip_pbx_e2e::phone::{authorization, challenges, contacts, param, Phone};
use sip_pbx_e2e::{
    assert_sipp_ok, free_port, header, http_request, invite, status_code, wait_until, Pbx,
    SipClient, Sipp,
};

/// Accounts 1001/secret1 and 1002/secret2; `auth_extra` adds auth keys.
fn auth(algorithms: &str, auth_extra: &str) -> String {
    format!(
        "auth:\n  enabled: true\n  algorithms: {algorithms}\n{auth_extra}  users:\n    - username: \"1001\"\n      password: \"secret1\"\n    - username: \"1002\"\n      password: \"secret2\"\n\nroutes: []\n"
    )
}

/// Logs DEBUG to the PBX's `pbx.log` and its SIP traffic to `Pbx::traffic`.
const TRAFFIC_LOG: &str =
    "\nlogging:\n  level: DEBUG\n  format: text\n  output: PBX_DIR/pbx.log\n  sip_traffic_log: PBX_DIR/traffic\n";

/// The values of header `name` in the messages the PBX received, from its
/// traffic log.
fn received_headers(pbx: &Pbx, name: &str) -> Vec<String> {
    let mut received = false;
    let mut values = Vec::new();
    for line in pbx.traffic().lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with(|c: char| c.is_ascii_digit()) && line.contains(" RECEIVED from ") {
            received = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit()) && line.contains(" SENT to ") {
            received = false;
        } else if let Some((n, v)) = line.split_once(':') {
            if received && n.eq_ignore_ascii_case(name) {
                values.push(v.trim().to_string());
            }
        }
    }
    values
}

/// Waits for the one credentials header `name` of `user` the PBX received,
/// and asserts they are SHA-256 Digest credentials.
fn assert_sha256_credentials(pbx: &Pbx, name: &str, user: &str) {
    let mine = || {
        received_headers(pbx, name)
            .into_iter()
            .filter(|v| param(v, "username").as_deref() == Some(user))
            .collect::<Vec<_>>()
    };
    wait_until(
        Duration::from_secs(10),
        "credentials in the traffic log",
        || !mine().is_empty(),
    );
    let values = mine();
    assert_eq!(values.len(), 1, "{name} of {user}: {values:?}");
    let value = &values[0];
    assert!(value.starts_with("Digest "), "{name}: {value}");
    assert_eq!(
        param(value, "algorithm").as_deref(),
        Some("SHA-256"),
        "{name}: {value}"
    );
    let response = param(value, "response").unwrap_or_default();
    assert!(
        response.len() == 64 && response.bytes().all(|b| b.is_ascii_hexdigit()),
        "a SHA-256 response is 64 hex digits: {name}: {value}"
    );
}

fn auth_failures(pbx: &Pbx) -> u64 {
    let (_, body) = http_request(pbx.metrics_port, "GET", "/metrics", "");
    body.lines()
        .find(|l| l.starts_with("sip_pbx_auth_failures_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `sipp` (the system's SIPp or 3.7.3) registers 1002 through a 401 and
/// calls it as 1001 through a 407, with the digest algorithm the PBX asks.
fn sipp_register_and_call(pbx: &Pbx, sipp: fn(&str, u16) -> Sipp, algorithm: &str) {
    let callee_port = free_port();
    let register = sipp("register_auth.xml", callee_port)
        .args(["-m", "1", "-s", "1002", "-au", "1002", "-ap", "secret2"])
        .args(["-key", "expires", "120"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&register, &format!("REGISTER 1002 with {algorithm} digest"));
    let callee = Sipp::new("uas_answer.xml", callee_port)
        .args(["-m", "1"])
        .spawn(callee_port);
    let caller = sipp("uac_auth_call.xml", free_port())
        .args(["-m", "1", "-s", "1002", "-au", "1001", "-ap", "secret1"])
        .args(["-key", "caller", "1001"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&caller, &format!("1001 calls 1002 after a {algorithm} 407"));
    assert_sipp_ok(&callee.finish(Duration::from_secs(30)), "1002 answers");
    wait_until(Duration::from_secs(10), "no calls left", || {
        pbx.active_calls() == 0
    });
}

#[test]
fn sipp_md5_registration_and_a_call_between_registered_users() {
    let pbx = Pbx::start(1, &auth("[\"MD5\", \"SHA-256\"]", ""));
    sipp_register_and_call(&pbx, Sipp::new, "MD5");
}

#[test]
fn sipp_sha256_registration_and_a_call_between_registered_users() {
    // SHA-256 only: an MD5 answer would be refused.
    let pbx = Pbx::start(1, &format!("{}{TRAFFIC_LOG}", auth("[\"SHA-256\"]", "")));
    sipp_register_and_call(&pbx, Sipp::sha256, "SHA-256");
    assert_sha256_credentials(&pbx, "Authorization", "1002");
    assert_sha256_credentials(&pbx, "Proxy-Authorization", "1001");
    let traffic = pbx.traffic();
    assert!(
        !traffic.to_ascii_lowercase().contains("algorithm=md5"),
        "no MD5 challenge or answer: {traffic}"
    );
    assert_eq!(auth_failures(&pbx), 0, "{}", pbx.log());
}

#[test]
fn sipp_sha256_answers_the_sha256_of_two_challenges() {
    let pbx = Pbx::start(
        1,
        &format!("{}{TRAFFIC_LOG}", auth("[\"SHA-256\", \"MD5\"]", "")),
    );
    let register = Sipp::sha256("register_auth.xml", free_port())
        .args(["-m", "1", "-s", "1002", "-au", "1002", "-ap", "secret2"])
        .args(["-key", "expires", "120"])
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&register, "REGISTER 1002 offered SHA-256 then MD5");
    assert_sha256_credentials(&pbx, "Authorization", "1002");
    assert_eq!(auth_failures(&pbx), 0, "{}", pbx.log());
}

#[test]
fn sha256_register_refresh_query_and_removal() {
    let pbx = Pbx::start(1, &auth("[\"SHA-256\", \"MD5\"]", ""));
    let mut phone = Phone::new("1001", pbx.sip_addr());
    let (one, two) = (phone.contact("a"), phone.contact("b"));
    let (code, text) = phone.register(&[format!("Contact: {one}")]);
    assert_eq!(code, 401, "{text}");
    let offered = challenges(&text);
    let algorithms: Vec<&str> = offered.iter().map(|c| c.algorithm.as_str()).collect();
    assert_eq!(algorithms, ["SHA-256", "MD5"], "{text}");
    let sha = offered[0].clone();
    let uri = phone.uri();
    let mut nc = 0;
    let mut auth = |phone: &Phone| {
        nc += 1;
        format!(
            "Authorization: {}",
            authorization(&sha, &phone.user, "secret1", "REGISTER", &uri, nc)
        )
    };

    let a = auth(&phone);
    let (code, text) = phone.register(&[format!("Contact: {one}"), "Expires: 300".into(), a]);
    assert_eq!(code, 200, "{text}");
    assert_eq!(contacts(&text).len(), 1, "{text}");

    let a = auth(&phone);
    let (code, text) = phone.register(&[format!("Contact: {two}"), "Expires: 300".into(), a]);
    assert_eq!(code, 200, "{text}");
    assert_eq!(contacts(&text).len(), 2, "two contacts for one AOR: {text}");

    let a = auth(&phone);
    let (code, text) = phone.register(&[format!("Contact: {one}"), "Expires: 10".into(), a]);
    assert_eq!(code, 423, "{text}");
    assert_eq!(header(&text, "Min-Expires"), Some("60"));

    let a = auth(&phone);
    let (code, text) = phone.register(&[format!("Contact: {one};expires=99999"), a]);
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("expires=3600"),
        "clamped to max_expires: {text}"
    );

    let a = auth(&phone);
    let (code, text) = phone.register(&[format!("Contact: {one}"), "Expires: 0".into(), a]);
    assert_eq!(code, 200, "{text}");
    assert_eq!(contacts(&text), vec![format!("{two};expires=300")]);

    let a = auth(&phone);
    let (code, text) = phone.register(&[a]);
    assert_eq!((code, contacts(&text).len()), (200, 1), "query: {text}");

    let a = auth(&phone);
    let (code, text) = phone.register(&["Contact: *".into(), "Expires: 0".into(), a]);
    assert_eq!(code, 200, "{text}");
    assert!(contacts(&text).is_empty(), "Contact: * removes all: {text}");
}

#[test]
fn wrong_passwords_are_challenged_again_then_blocked() {
    let pbx = Pbx::start(
        1,
        &auth("[\"MD5\"]", "  max_failures: 3\n  block_seconds: 60\n"),
    );
    for attempt in 1..=3 {
        let run = Sipp::new("register_wrong_password.xml", free_port())
            .args(["-m", "1", "-s", "1001", "-au", "1001", "-ap", "guess"])
            .arg(pbx.sip_addr().to_string())
            .run();
        assert_sipp_ok(
            &run,
            &format!("wrong password, attempt {attempt}: 401 again"),
        );
    }
    assert_eq!(auth_failures(&pbx), 3);
    let mut phone = Phone::new("1001", pbx.sip_addr());
    let (code, text) = phone.register(&[format!("Contact: {}", phone.contact("a"))]);
    assert_eq!(code, 403, "the source address is blocked: {text}");
}

#[test]
fn an_expired_nonce_is_answered_stale() {
    let pbx = Pbx::start(1, &auth("[\"SHA-256\"]", "  nonce_seconds: 1\n"));
    let mut phone = Phone::new("1001", pbx.sip_addr());
    let contact = format!("Contact: {}", phone.contact("a"));
    let (code, text) = phone.register(std::slice::from_ref(&contact));
    assert_eq!(code, 401, "{text}");
    let challenge = challenges(&text).remove(0);
    // Let the nonce age past nonce_seconds.
    std::thread::sleep(Duration::from_millis(2100));
    let a = authorization(&challenge, "1001", "secret1", "REGISTER", &phone.uri(), 1);
    let (code, text) = phone.register(&[contact.clone(), format!("Authorization: {a}")]);
    assert_eq!(code, 401, "{text}");
    let fresh = challenges(&text).remove(0);
    assert!(fresh.stale, "stale=true: {text}");
    let a = authorization(&fresh, "1001", "secret1", "REGISTER", &phone.uri(), 1);
    let (code, text) = phone.register(&[contact, format!("Authorization: {a}")]);
    assert_eq!(code, 200, "the fresh nonce works: {text}");
}

#[test]
fn a_binding_expires_on_time() {
    let pbx = Pbx::start(
        1,
        "registrar:\n  min_expires: 1\n  max_expires: 3600\n\nroutes: []\n",
    );
    let mut phone = Phone::new("1001", pbx.sip_addr());
    let registered = Instant::now();
    let (code, text) = phone.register(&[
        format!("Contact: {}", phone.contact("a")),
        "Expires: 2".into(),
    ]);
    assert_eq!((code, contacts(&text).len()), (200, 1), "{text}");
    wait_until(Duration::from_secs(6), "the binding to lapse", || {
        let (code, text) = phone.register(&[]);
        code == 200 && contacts(&text).is_empty()
    });
    assert!(registered.elapsed() >= Duration::from_millis(1500));
    // The lapsed user is unknown to routing now (no static routes): 404.
    let client = SipClient::new();
    client.send(
        &invite(pbx.sip_addr(), "1001", client.addr(), "x1", None),
        pbx.sip_addr(),
    );
    let (code, _) = client
        .final_response(Duration::from_secs(5))
        .expect("answer");
    assert_eq!(code, 404);
}

#[test]
fn an_unauthenticated_invite_gets_407_and_places_no_call() {
    let uas_port = free_port();
    let pbx = Pbx::start(
        uas_port,
        &format!(
            "{}\nroutes:\n  - match: \"^(.+)$\"\n    target: \"sip:$1@127.0.0.1:{uas_port}\"\n",
            auth("[\"SHA-256\", \"MD5\"]", "").replace("\nroutes: []\n", "")
        ),
    );
    let client = SipClient::new();
    client.send(
        &invite(pbx.sip_addr(), "5555", client.addr(), "noauth1", None),
        pbx.sip_addr(),
    );
    let (code, text) = client
        .final_response(Duration::from_secs(5))
        .expect("answer");
    assert_eq!(code, 407, "{text}");
    assert_eq!(challenges(&text).len(), 2, "{text}");
    let (_, stats) = pbx.http_get("/api/stats");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats");
    assert_eq!(stats["total_calls"], 0, "no call was placed: {stats}");
    assert_eq!(status_code(&text), Some(407));
}
