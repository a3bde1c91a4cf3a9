//! The `sip-pbx` process itself: command line, configuration errors, the
//! SIP traffic log, loops, calls whose 2xx is never acknowledged, and
//! running out of file descriptors.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use sip_pbx_e2e::media::establish;
use sip_pbx_e2e::{
    free_port, header, invite, open_file_limit, options, options_over_tcp, pbx_binary, response_to,
    root, wait_until, Pbx, SipClient,
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
    assert_eq!(
        header(&bye, "Reason"),
        Some("Q.850;cause=102;text=\"No ACK for the 2xx\""),
        "{bye}"
    );
    callee.send(&response_to(&bye, "200 OK", callee.addr(), None), to);
    wait_until(Duration::from_secs(10), "no calls left", || {
        pbx.active_calls() == 0
    });
    let records = pbx.wait_cdrs(1);
    assert_eq!(records[0]["end_reason"], "error");
}

/// At the drain deadline the PBX hangs up the calls left; its BYEs say
/// why, so that neither phone nor carrier takes it for a user's hang-up.
#[test]
fn calls_left_at_the_drain_deadline_get_a_bye_that_says_why() {
    let callee = SipClient::new();
    let mut pbx = Pbx::start(callee.addr().port(), "drain:\n  timeout_seconds: 1\n");
    let call = establish(&pbx, &callee, "0", "drain-reason-1").expect("answered");
    pbx.signal("TERM");
    for (leg, client) in [("callee", call.callee), ("caller", &call.caller)] {
        let bye = client.expect_request("BYE");
        assert_eq!(
            header(&bye, "Reason"),
            Some("Q.850;cause=41;text=\"The PBX is shutting down\""),
            "{leg}: {bye}"
        );
        client.send(&response_to(&bye, "200 OK", client.addr(), None), call.pbx);
    }
    assert!(pbx.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(pbx.wait_cdrs(1)[0]["end_reason"], "drain");
}

/// CPU time the process `pid` has used so far.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the PBX's stat");
    let fields: Vec<u64> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second =
        u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Duration::from_millis((fields[11] + fields[12]) * 1000 / ticks_per_second)
}

/// An OPTIONS over a new TCP connection is answered 200.
fn tcp_options_answered(pbx: &Pbx) -> bool {
    let Ok(mut stream) = TcpStream::connect(pbx.sip_addr()) else {
        return false;
    };
    let me = stream.local_addr().expect("addr");
    let request = options_over_tcp(pbx.sip_addr(), me, "tcp");
    let mut answer = [0u8; 12];
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    stream.write_all(&request).is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && answer.starts_with(b"SIP/2.0 200")
}

#[test]
fn out_of_descriptors_tcp_accept_pauses_and_resumes() {
    let pbx = Pbx::start_with(free_port(), "", open_file_limit(48, 48));
    assert!(tcp_options_answered(&pbx), "no answer over TCP at start");
    // Connections the PBX cannot accept wait in the listen queue.
    let mut flood = Vec::new();
    wait_until(
        Duration::from_secs(10),
        "the PBX to run out of descriptors",
        || {
            flood.extend((0..8).filter_map(|_| TcpStream::connect(pbx.sip_addr()).ok()));
            pbx.log()
                .contains("no file descriptors left: TCP connections wait until others close")
        },
    );
    // Over the next second, paced by twenty OPTIONS over UDP, signalling
    // answers each and the PBX does not spin on its listener.
    let before = process_cpu(pbx.child.id());
    let probe = SipClient::new();
    for n in 0..20 {
        probe.send(
            &options(pbx.sip_addr(), probe.addr(), &format!("busy{n}-")),
            pbx.sip_addr(),
        );
        let answer = probe.final_response(Duration::from_secs(2));
        assert_eq!(answer.map(|(code, _)| code), Some(200), "OPTIONS {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let spent = process_cpu(pbx.child.id()) - before;
    assert!(
        spent < Duration::from_millis(300),
        "the PBX used {spent:?} of CPU in a second out of descriptors"
    );
    let reports = pbx.log().matches("no file descriptors left").count();
    assert_eq!(
        reports,
        1,
        "reported once, not per failed accept:\n{}",
        pbx.log()
    );
    // Connections that close give their descriptors back.
    drop(flood);
    wait_until(Duration::from_secs(10), "TCP served again", || {
        tcp_options_answered(&pbx)
    });
}
