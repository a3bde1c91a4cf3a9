//! Two real softphones (`baresip`) through the real `sip-pbx`: they
//! register with digest authentication, one calls the other, and what one
//! says reaches the other through the PBX's media relay. The phones are
//! driven through baresip's `ctrl_tcp` command interface.
//!
//! baresip 1.0 (libre) answers only the first digest challenge of a 401
//! and fails when its algorithm is SHA-256, which it does not know: the
//! PBX here offers MD5 only (`auth.algorithms: [MD5]`), as a PBX serving
//! such phones must be configured.

use std::time::Duration;

use sip_pbx_e2e::softphone::{power_at, tone_wav, Softphone, RATE};
use sip_pbx_e2e::{wait_until, Pbx};

const LIMIT: Duration = Duration::from_secs(20);

const USERS: &str = "auth:\n  enabled: true\n  algorithms: [\"MD5\"]\n  users:\n    - username: \"1001\"\n      password: \"secret1\"\n    - username: \"1002\"\n      password: \"secret2\"\n\nroutes: []\n";

fn stats(pbx: &Pbx) -> serde_json::Value {
    let (status, body) = pbx.http_get("/api/stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("stats JSON")
}

#[test]
fn two_baresip_phones_register_with_digest_auth_and_call_each_other() {
    let pbx = Pbx::start(1, USERS);
    // Long enough that no phone's audio file ends during the call.
    let tone = tone_wav(440.0, 30.0);
    let mut alice = Softphone::start("alice", &tone);
    let mut bob = Softphone::start("bob", &tone);
    alice.register("1001", "secret1", pbx.sip_addr(), "PCMU");
    bob.register("1002", "secret2", pbx.sip_addr(), "PCMU");
    wait_until(LIMIT, "the PBX to count both registrations", || {
        stats(&pbx)["registrations"] == 2
    });

    alice.dial(&format!("sip:1002@{}", pbx.sip_addr()));
    let incoming = bob.expect_event("CALL_INCOMING");
    assert_eq!(
        incoming["peeruri"],
        format!("sip:1001@{}", pbx.sip_addr()),
        "bob sees alice calling"
    );
    alice.expect_event("CALL_RINGING");
    bob.accept();
    alice.expect_event("CALL_ESTABLISHED");
    bob.expect_event("CALL_ESTABLISHED");
    assert_eq!(pbx.active_calls(), 1);

    alice.hangup();
    bob.expect_event("CALL_CLOSED");
    alice.expect_event("CALL_CLOSED");
    wait_until(LIMIT, "the PBX to end the call", || pbx.active_calls() == 0);
    let records = pbx.wait_cdrs(1);
    let cdr = &records[0];
    assert_eq!(cdr["disposition"], "answered", "{cdr}");
    assert_eq!(cdr["end_reason"], "caller_bye", "{cdr}");
    assert_eq!(cdr["callee"], "1002", "{cdr}");
    assert!(
        cdr["caller"].as_str().unwrap_or_default().contains("1001"),
        "{cdr}"
    );

    // The other way round, and the callee hangs up.
    bob.dial(&format!("sip:1001@{}", pbx.sip_addr()));
    alice.expect_event("CALL_INCOMING");
    alice.accept();
    bob.expect_event("CALL_ESTABLISHED");
    alice.expect_event("CALL_ESTABLISHED");
    alice.hangup();
    bob.expect_event("CALL_CLOSED");
    alice.expect_event("CALL_CLOSED");
    let records = pbx.wait_cdrs(2);
    assert_eq!(records[1]["end_reason"], "callee_bye", "{}", records[1]);
    assert_eq!(records[1]["callee"], "1001", "{}", records[1]);

    // Bob declines: alice is told he is busy.
    alice.dial(&format!("sip:1002@{}", pbx.sip_addr()));
    bob.expect_event("CALL_INCOMING");
    bob.hangup();
    let declined = alice.expect_event("CALL_CLOSED");
    assert_eq!(declined["param"], "486 Rejected", "{declined}");
    let records = pbx.wait_cdrs(3);
    assert_eq!(records[2]["disposition"], "busy", "{}", records[2]);
    wait_until(LIMIT, "the PBX to forget the calls", || {
        pbx.active_calls() == 0
    });

    // A phone with the wrong password is not let in.
    let mut mallory = Softphone::start("mallory", &tone);
    mallory.command(
        "uanew",
        &format!("<sip:1001@{}>;auth_pass=wrong;regint=300", pbx.sip_addr()),
    );
    let refused = mallory.expect_event("REGISTER_FAIL");
    assert_eq!(refused["param"], "403 Forbidden", "{refused}");
}

/// Alice plays a two-second 1 kHz tone and her phone hangs up when it
/// ends; Bob's phone sends a 400 Hz tone back. Each recording must carry
/// the other's tone, which only reaches it through the PBX's relay ports
/// (the PBX rewrites both SDPs to its pool), waited for as `relay_io`
/// says.
fn audio_crosses_the_relay(codec: &str, pool: &str, relay_io: &str) {
    let pbx = Pbx::start(
        1,
        &format!(
            "{USERS}\nmedia:\n  mode: bypass\n  port_pool: {pool}\n  codecs: [\"{codec}\", \"telephone-event\"]\n  relay_io: {relay_io}\n"
        ),
    );
    let mut alice = Softphone::start("alice", &tone_wav(1000.0, 2.0));
    let mut bob = Softphone::start("bob", &tone_wav(400.0, 30.0));
    alice.register("1001", "secret1", pbx.sip_addr(), codec);
    bob.register("1002", "secret2", pbx.sip_addr(), codec);
    alice.dial(&format!("sip:1002@{}", pbx.sip_addr()));
    bob.expect_event("CALL_INCOMING");
    bob.accept();
    alice.expect_event("CALL_ESTABLISHED");
    bob.expect_event("CALL_ESTABLISHED");
    // Alice's file runs out: her phone ends the call.
    let closed = alice.expect_event("CALL_CLOSED");
    assert_eq!(closed["param"], "end of file", "{closed}");
    bob.expect_event("CALL_CLOSED");
    wait_until(LIMIT, "the PBX to end the call", || pbx.active_calls() == 0);

    let heard_by_bob = bob.received_audio();
    let seconds = heard_by_bob.len() as f64 / f64::from(RATE);
    assert!(
        (1.5..=2.5).contains(&seconds),
        "bob heard {seconds:.2} s of alice's 2 s tone"
    );
    assert_tone(&heard_by_bob, 1000.0, 400.0, "bob hears alice");
    let heard_by_alice = alice.received_audio();
    assert!(
        heard_by_alice.len() as f64 / f64::from(RATE) >= 1.5,
        "alice heard {} samples",
        heard_by_alice.len()
    );
    assert_tone(&heard_by_alice, 400.0, 1000.0, "alice hears bob");

    let records = pbx.wait_cdrs(1);
    assert_eq!(records[0]["codec"], codec, "{}", records[0]);
    assert_eq!(records[0]["disposition"], "answered");
    // About 100 RTP packets each way in 2 s: more than one direction holds
    // (the metric is brought up to date every second).
    wait_until(LIMIT, "the relayed packets to be counted", || {
        pbx.relayed_packets() >= 150.0
    });
    wait_until(LIMIT, "relay ports back in the pool", || {
        stats(&pbx)["ports_in_use"] == 0
    });
}

/// `hz` carries most of the energy of `samples`; `other` (the listener's
/// own tone) and an unrelated frequency hardly any.
fn assert_tone(samples: &[i16], hz: f64, other: f64, what: &str) {
    let mean_square =
        samples.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / samples.len() as f64;
    // A pure sine puts half its mean square into the Goertzel power.
    let share = power_at(samples, hz) / (mean_square / 2.0);
    assert!(
        mean_square > 1_000_000.0,
        "{what}: silence (mean square {mean_square:.0})"
    );
    assert!(
        share > 0.7,
        "{what}: {hz} Hz holds {share:.2} of the energy"
    );
    for f in [other, 1700.0] {
        let leak = power_at(samples, f) / (mean_square / 2.0);
        assert!(leak < 0.05, "{what}: {f} Hz holds {leak:.2} of the energy");
    }
}

#[test]
fn baresip_audio_crosses_the_bypass_relay_both_ways_pcmu() {
    audio_crosses_the_relay("PCMU", "{start: 24000, end: 24999}", "auto");
}

#[test]
fn baresip_audio_crosses_the_bypass_relay_both_ways_pcma() {
    audio_crosses_the_relay("PCMA", "{start: 25000, end: 25999}", "auto");
}

#[test]
fn baresip_audio_crosses_the_packet_ring_relay_both_ways() {
    audio_crosses_the_relay("PCMU", "{start: 23000, end: 23999}", "packet_ring");
}
