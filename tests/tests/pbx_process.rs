//! The `sip-pbx` process itself: command line, configuration errors, the
//! SIP traffic log, loops and calls whose 2xx is never acknowledged.

use std::process::Command;
use std::time::Duration;

use sip_pbx_e2e::{
    free_port, header, invite, pbx_binary, response_to, root, wait_until, Pbx, SipClient,
};

#[test]
fn check_config_names_every_bad_key_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "media:\n  port_pool: {start: 20000, end: 10000}\nlogging:\n  level: LOUD\n",
    )
    .expect("write");
    let out = Command::new(pbx_binary())
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.contains(&"config: media.port_pool: start 20000 is not below end 10000"),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("config: logging.level:")),
        "{stderr}"
    );
}

#[test]
fn every_example_config_passes_check_config() {
    for entry in std::fs::read_dir(root().join("config"))
        .expect("config/")
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(pbx_binary())
                .args(["--check-config", "--config"])
                .arg(&path)
                .output()
                .expect("runs");
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn sip_traffic_log_holds_every_message_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().display().to_string();
    let pbx = Pbx::start(
        free_port(),
        &format!("logging:\n  level: INFO\n  format: json\n  output: stdout\n  sip_traffic_log: {logs}\n"),
    );
    let client = SipClient::new();
    client.send(
        &sip_pbx_e2e::options(pbx.sip_addr(), client.addr(), "traffic-log"),
        pbx.sip_addr(),
    );
    client.final_response(Duration::from_secs(5)).expect("200");
    wait_until(Duration::from_secs(10), "the traffic log", || {
        let text: String = std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("sip_traffic_"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        text.contains("RECEIVED from")
            && text.contains("OPTIONS sip:pbx@")
            && text.contains("SENT to")
            && text.contains("SIP/2.0 200 OK")
    });
    let name = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("sip_traffic_"))
        .expect("a traffic log file");
    assert_eq!(name.len(), "sip_traffic_YYYYMMDD.log".len(), "{name}");
}

#[test]
fn a_call_routed_back_to_the_pbx_itself_gets_482() {
    let pbx = Pbx::start(
        free_port(),
        "routes:\n  - match: \"^loop$\"\n    target: \"sip:loop@127.0.0.1:SIP_PORT\"\n",
    );
    let caller = SipClient::new();
    let to = pbx.sip_addr();
    caller.send(&invite(to, "loop", caller.addr(), "loop-1", None), to);
    let (code, text) = caller
        .final_response(Duration::from_secs(10))
        .expect("final");
    assert_eq!(code, 482, "{text}");
    wait_until(Duration::from_secs(10), "no calls left", || {
        pbx.active_calls() == 0
    });
}

#[test]
fn a_2xx_never_acknowledged_ends_the_call_on_both_legs() {
    let callee = SipClient::new();
    let pbx = Pbx::start(
        callee.addr().port(),
        "sip:\n  listen_ip: 127.0.0.1\n  listen_port: SIP_PORT\n  advertised_ip: 127.0.0.1\n  timer_t1_ms: 50\n",
    );
    let caller = SipClient::new();
    let to = pbx.sip_addr();
    caller.send(&invite(to, "1002", caller.addr(), "no-ack-1", None), to);
    let invite_b = callee.expect_request("INVITE");
    callee.send(&response_to(&invite_b, "200 OK", callee.addr(), None), to);
    let (code, _) = caller.final_response(Duration::from_secs(5)).expect("200");
    assert_eq!(code, 200);
    // The caller never ACKs: the PBX resends its 200, then gives up after
    // 64*T1 and hangs up the callee (who did get its ACK).
    callee.expect_request("ACK");
    let bye = callee.expect_request("BYE");
    assert_eq!(header(&bye, "Call-ID"), header(&invite_b, "Call-ID"));
    callee.send(&response_to(&bye, "200 OK", callee.addr(), None), to);
    wait_until(Duration::from_secs(10), "no calls left", || {
        pbx.active_calls() == 0
    });
    let records = pbx.wait_cdrs(1);
    assert_eq!(records[0]["end_reason"], "error");
}
