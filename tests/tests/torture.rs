//! RFC 4475 torture messages (tests/data/sip-torture) sent over UDP to the
//! real `sip-pbx`: each gets the answer its MANIFEST.tsv line asks of a
//! B2BUA, or is dropped, and the PBX keeps serving.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use sip_pbx_e2e::{header, options, root, status_code, Pbx, SipClient};

/// What the PBX must do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Final response with this code.
    Code(u16),
    /// No response at all (responses that match nothing, malformed ones).
    Silence,
}

/// Each test talks from its own loopback address, on the port its Via
/// names, because responses without rport go to the Via's port.
fn client_for(message: &[u8]) -> SipClient {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let text = String::from_utf8_lossy(message);
    let port = text
        .lines()
        .find(|l| {
            let name = l.split(':').next().unwrap_or_default().trim();
            name.eq_ignore_ascii_case("via") || name.eq_ignore_ascii_case("v")
        })
        .and_then(|l| {
            let sent_by = l.split(';').next()?.split_whitespace().last()?;
            sent_by.rsplit_once(':')?.1.parse().ok()
        })
        .unwrap_or(5060);
    let host = NEXT.fetch_add(1, Ordering::SeqCst);
    let pid_byte = (std::process::id() % 250) as u8 + 1;
    SipClient::bind(SocketAddr::from((
        Ipv4Addr::new(127, 44, pid_byte, host),
        port,
    )))
}

fn check(file: &str, expect: Expect) {
    check_with(file, expect, "");
}

/// `check` against a PBX with `extra` config sections.
fn check_with(file: &str, expect: Expect, extra: &str) {
    let manifest = std::fs::read_to_string(root().join("tests/data/sip-torture/MANIFEST.tsv"))
        .expect("manifest");
    let line = manifest
        .lines()
        .find(|l| l.split('\t').next() == Some(file))
        .unwrap_or_else(|| panic!("{file} is not in the manifest"));
    let expectation = line.split('\t').nth(4).unwrap_or_default();
    match (expectation, expect) {
        ("reject", Expect::Code(c)) => assert!(matches!(c, 400 | 501 | 505), "{file}: {line}"),
        ("accept" | "accept-parse", Expect::Code(c)) => {
            assert!(c != 400 && c != 505, "{file}: {line}")
        }
        _ => {}
    }

    let message = std::fs::read(root().join("tests/data/sip-torture").join(file)).expect("message");
    let pbx = Pbx::start(1, &format!("routes: []\n\n{extra}"));
    let client = client_for(&message);
    client.send(&message, pbx.sip_addr());
    // The probe's answer comes after any answer to the message: one core
    // handles both in order.
    client.send(
        &options(pbx.sip_addr(), client.addr(), "after-torture"),
        pbx.sip_addr(),
    );
    let mut answer = None;
    loop {
        let text = client
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{file}: the PBX stopped answering\n{}", pbx.log()));
        if header(&text, "Call-ID").is_some_and(|c| c.starts_with("after-torture")) {
            assert_eq!(status_code(&text), Some(200), "probe after {file}: {text}");
            break;
        }
        match status_code(&text) {
            Some(100) | None => {}
            Some(code) if answer.is_none() => answer = Some(code),
            Some(_) => {}
        }
    }
    // Routed requests are answered after an asynchronous lookup, so their
    // final response may trail the probe's.
    if answer.is_none() && expect != Expect::Silence {
        answer = client
            .final_response(Duration::from_secs(5))
            .map(|(code, _)| code);
    }
    let got = answer.map_or(Expect::Silence, Expect::Code);
    assert_eq!(got, expect, "{file}: {line}\n{}", pbx.log());
}

macro_rules! torture {
    ($($name:ident => $expect:expr,)*) => {
        $(
            #[test]
            fn $name() {
                check(concat!(stringify!($name), ".sip"), $expect);
            }
        )*
    };
}

use Expect::{Code, Silence};

torture! {
    valid_wsinv => Code(481),
    valid_intmeth => Code(501),
    valid_esc01 => Code(404),
    valid_escnull => Code(200),
    valid_esc02 => Code(501),
    valid_lwsdisp => Code(200),
    valid_longreq => Code(404),
    valid_dblreq => Code(200),
    valid_semiuri => Code(200),
    valid_transports => Code(200),
    valid_mpart01 => Code(501),
    valid_unreason => Silence,
    valid_noreason => Silence,
    invalid_badinv01 => Code(400),
    invalid_clerr => Code(400),
    invalid_ncl => Code(400),
    invalid_scalar02 => Code(400),
    invalid_scalarlg => Silence,
    invalid_quotbal => Code(400),
    invalid_ltgtruri => Code(400),
    invalid_lwsruri => Code(400),
    invalid_lwsstart => Code(400),
    invalid_trws => Code(400),
    invalid_escruri => Code(400),
    invalid_baddate => Code(404),
    invalid_regbadct => Code(400),
    invalid_badaspec => Code(400),
    invalid_baddn => Code(400),
    invalid_badvers => Code(505),
    invalid_mismatch01 => Code(400),
    invalid_mismatch02 => Code(501),
    invalid_bigcode => Silence,
    txn_badbranch => Code(200),
    app_insuf => Code(400),
    app_unkscm => Code(416),
    app_novelsc => Code(416),
    app_unksm2 => Code(404),
    app_bext01 => Code(420),
    app_invut => Code(415),
    app_multi01 => Code(400),
    app_mcl01 => Code(400),
    app_bcast => Silence,
    app_zeromf => Code(200),
    app_cparam01 => Code(200),
    app_cparam02 => Code(200),
    app_regescrt => Code(200),
    app_sdp01 => Code(406),
    compat_inv2543 => Code(404),
}

/// An unknown Authorization scheme is no credentials: a Digest challenge.
#[test]
fn app_regaut01() {
    check_with("app_regaut01.sip", Code(401), "auth:\n  enabled: true\n");
}
