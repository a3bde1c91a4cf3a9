//! What an operator watches and bills from, against the real binary: CDR
//! lines per call, webhooks to a real receiver, `/metrics`, graceful drain
//! and a crash under load.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sip_pbx_e2e::phone::Phone;
use sip_pbx_e2e::{
    assert_sipp_ok, cdr_records_in, free_port, header, invite, wait_until, Pbx, SipClient, Sipp,
};

const LIMIT: Duration = Duration::from_secs(30);

fn one_call(pbx: &Pbx, uas_port: u16, caller: &str, callee: &str, extra: &[&str]) {
    let uas = Sipp::new(callee, uas_port)
        .args(["-m", "1"])
        .spawn(uas_port);
    let uac = Sipp::new(caller, free_port())
        .args(["-m", "1", "-s", "1002"])
        .args(extra)
        .arg(pbx.sip_addr().to_string())
        .run();
    assert_sipp_ok(&uac, caller);
    assert_sipp_ok(&uas.finish(LIMIT), callee);
}

fn cdr_of(caller: &str, callee: &str, extra: &str) -> serde_json::Value {
    let uas_port = free_port();
    let pbx = Pbx::start(uas_port, extra);
    one_call(&pbx, uas_port, caller, callee, &[]);
    let records = pbx.wait_cdrs(1);
    assert_eq!(records.len(), 1, "{records:?}");
    let record = records[0].clone();
    for field in [
        "call_id",
        "caller",
        "callee",
        "start_time",
        "answer_time",
        "end_time",
        "duration",
        "disposition",
        "sip_code",
        "end_reason",
        "codec",
    ] {
        assert!(record.get(field).is_some(), "CDR lacks {field}: {record}");
    }
    assert_eq!(record["callee"], "1002");
    record
}

#[test]
fn cdr_of_an_answered_call() {
    let r = cdr_of("uac_basic.xml", "uas_answer.xml", "");
    assert_eq!(r["disposition"], "answered");
    assert_eq!(r["sip_code"], 200);
    assert_eq!(r["end_reason"], "caller_bye");
    assert_eq!(r["codec"], "PCMU");
    assert!(r["answer_time"].is_string());
}

#[test]
fn cdr_of_a_busy_call() {
    let r = cdr_of("uac_expect_486.xml", "uas_busy.xml", "");
    assert_eq!(r["disposition"], "busy");
    assert_eq!(r["sip_code"], 486);
    assert!(r["answer_time"].is_null());
    assert_eq!(r["duration"], 0.0);
}

#[test]
fn cdr_of_a_cancelled_call() {
    let r = cdr_of("uac_cancel.xml", "uas_cancelled.xml", "");
    assert_eq!(r["disposition"], "cancelled");
    assert_eq!(r["sip_code"], 487);
}

#[test]
fn cdr_of_an_unanswered_call() {
    let r = cdr_of(
        "uac_expect_480.xml",
        "uas_cancelled.xml",
        "sip:\n  listen_ip: 127.0.0.1\n  listen_port: SIP_PORT\n  advertised_ip: 127.0.0.1\n  ring_timeout: 1\n",
    );
    assert_eq!(r["disposition"], "no_answer");
    assert_eq!(r["sip_code"], 480);
}

/// The five metrics of the seed manual, read with a Prometheus parser.
fn seed_metrics(pbx: &Pbx) -> std::collections::HashMap<String, f64> {
    let text = pbx.metrics();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let mut seen = std::collections::HashMap::new();
    for sample in scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map(|b| b.count).unwrap_or_default()
            }
            _ => continue,
        };
        *seen.entry(sample.metric).or_insert(0.0) += value;
    }
    seen
}

#[test]
fn metrics_move_with_a_call() {
    let uas_port = free_port();
    let pbx = Pbx::start(uas_port, "");
    let before = seed_metrics(&pbx);
    for name in [
        "sip_pbx_active_calls",
        "sip_pbx_total_calls",
        "sip_pbx_call_duration_seconds",
        "sip_pbx_media_packets_total",
        "sip_pbx_errors_total",
    ] {
        assert!(before.contains_key(name), "{name} missing from /metrics");
    }
    one_call(&pbx, uas_port, "uac_basic.xml", "uas_answer.xml", &[]);
    wait_until(LIMIT, "call metrics", || {
        let after = seed_metrics(&pbx);
        after["sip_pbx_total_calls"] == before["sip_pbx_total_calls"] + 1.0
            && after["sip_pbx_call_duration_seconds"] == 1.0
            && after["sip_pbx_active_calls"] == 0.0
    });
}

/// A webhook receiver on loopback: every request's signature and body.
struct Receiver {
    port: u16,
    bodies: mpsc::Receiver<(String, Vec<u8>)>,
}

fn receiver(port: u16) -> Receiver {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("receiver port");
    let (tx, bodies) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut signature = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    match name.to_ascii_lowercase().as_str() {
                        "x-sippbx-signature" => signature = value.trim().to_string(),
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            if tx.send((signature, body)).is_err() {
                return;
            }
        }
    });
    Receiver { port, bodies }
}

impl Receiver {
    /// The next `n` events, each checked against the HMAC of `secret`.
    fn events(&self, n: usize, secret: &str) -> Vec<serde_json::Value> {
        (0..n)
            .map(|_| {
                let (signature, body) =
                    self.bodies.recv_timeout(LIMIT).expect("a webhook delivery");
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
                mac.update(&body);
                let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                assert_eq!(signature, expected, "signature");
                serde_json::from_slice(&body).expect("JSON event")
            })
            .collect()
    }
}

fn webhook_config(port: u16, spool: &std::path::Path) -> String {
    format!(
        "events:\n  webhook_urls: [\"http://127.0.0.1:{port}/hook\"]\n  webhook_retries: 1\n  webhook_secret: \"s3cret\"\n  spool_dir: {}\n",
        spool.display()
    )
}

/// The four events of one answered call, in order.
fn assert_call_events(events: &[serde_json::Value]) {
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "call.started",
            "call.ringing",
            "call.answered",
            "call.ended"
        ]
    );
}

#[test]
fn webhooks_arrive_in_order_and_signed() {
    let hook = receiver(free_port());
    let uas_port = free_port();
    let spool = tempfile::tempdir().expect("spool");
    let config = webhook_config(hook.port, spool.path());
    let pbx = Pbx::start(uas_port, &config);
    one_call(&pbx, uas_port, "uac_basic.xml", "uas_answer.xml", &[]);
    let events = hook.events(4, "s3cret");
    assert_call_events(&events);
    let ids: std::collections::HashSet<&str> =
        events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), 4, "each event has its own id");
    assert!(events.iter().all(|e| e["call_id"] == events[0]["call_id"]));
}

#[test]
fn webhooks_spooled_while_the_receiver_is_down_arrive_after_a_restart() {
    let hook_port = free_port();
    let uas_port = free_port();
    let spool = tempfile::tempdir().expect("spool");
    let config = webhook_config(hook_port, spool.path());
    {
        let pbx = Pbx::start(uas_port, &config);
        one_call(&pbx, uas_port, "uac_basic.xml", "uas_answer.xml", &[]);
        pbx.wait_cdrs(1);
        wait_until(LIMIT, "events spooled", || {
            walk(spool.path())
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .count()
                >= 4
        });
    }
    let hook = receiver(hook_port);
    let _pbx = Pbx::start(uas_port, &config);
    let events = hook.events(4, "s3cret");
    assert_call_events(&events);
}

#[test]
fn webhooks_announce_a_registration_and_its_expiry() {
    let hook = receiver(free_port());
    let spool = tempfile::tempdir().expect("spool");
    let config = format!(
        "{}\nregistrar:\n  min_expires: 1\n  max_expires: 3600\n",
        webhook_config(hook.port, spool.path())
    );
    let pbx = Pbx::start(1, &config);
    let mut phone = Phone::new("1001", pbx.sip_addr());
    let contact = phone.contact("desk");
    let (code, text) = phone.register(&[format!("Contact: {contact}"), "Expires: 2".into()]);
    assert_eq!(code, 200, "{text}");
    let events = hook.events(2, "s3cret");
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["registration.created", "registration.expired"]);
    let uri = contact.trim_matches(['<', '>']);
    for event in &events {
        assert_eq!(event["data"]["aor"], "1001", "{event}");
        assert_eq!(event["data"]["contact"], uri, "{event}");
    }
    assert_eq!(events[0]["data"]["expires"], 2, "{}", events[0]);
    assert_eq!(
        events[0]["data"]["source"],
        format!("{}/UDP", phone.client.addr()),
        "the address the phone registered from: {}",
        events[0]
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

fn responses_200(pbx: &Pbx) -> usize {
    pbx.metrics()
        .lines()
        .filter(|l| l.starts_with("sip_pbx_sip_responses_total{code=\"200\"}"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

fn invite_is_refused_503(pbx: &Pbx) {
    let client = SipClient::new();
    client.send(
        &invite(pbx.sip_addr(), "1003", client.addr(), "during-drain", None),
        pbx.sip_addr(),
    );
    let (code, text) = client
        .final_response(Duration::from_secs(5))
        .expect("answer");
    assert_eq!(code, 503, "{text}");
    assert!(header(&text, "Retry-After").is_some(), "{text}");
}

/// A call from `caller` (with `args`) to an answering callee, answered;
/// then SIGTERM. Returns the PBX, the caller's run and the callee.
fn answered_call_then_sigterm(
    extra: &str,
    caller: &'static str,
    args: &'static [&'static str],
) -> (
    Pbx,
    std::thread::JoinHandle<sip_pbx_e2e::SippRun>,
    sip_pbx_e2e::SippProcess,
) {
    let uas_port = free_port();
    let pbx = Pbx::start(uas_port, extra);
    let uas = Sipp::new("uas_answer.xml", uas_port)
        .args(["-m", "1"])
        .spawn(uas_port);
    let answered_before = responses_200(&pbx);
    let target = pbx.sip_addr().to_string();
    let uac = std::thread::spawn(move || {
        Sipp::new(caller, free_port())
            .args(["-m", "1", "-s", "1002"])
            .args(args)
            .arg(target)
            .run()
    });
    wait_until(LIMIT, "the call to be answered", || {
        responses_200(&pbx) > answered_before
    });
    pbx.signal("TERM");
    (pbx, uac, uas)
}

#[test]
fn sigterm_drains_without_cutting_the_call_then_exits_0() {
    let (mut pbx, caller, uas) = answered_call_then_sigterm("", "uac_basic.xml", &["-d", "3000"]);
    wait_until(LIMIT, "draining", || {
        pbx.http_get("/api/stats").1.contains("\"draining\":true")
    });
    assert_eq!(
        pbx.http_get("/ready").0,
        200,
        "/ready stays 200 while draining"
    );
    invite_is_refused_503(&pbx);
    assert_sipp_ok(&caller.join().expect("caller"), "the call in progress");
    assert_sipp_ok(&uas.finish(LIMIT), "callee");
    let status = pbx.wait_exit(LIMIT);
    assert!(status.success(), "exit {status}");
    let records = cdr_records_in(&pbx.dir.path().join("cdr"));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["end_reason"], "caller_bye");
}

#[test]
fn drain_deadline_hangs_up_both_legs_with_cdr_reason_drain() {
    let (mut pbx, caller, uas) = answered_call_then_sigterm(
        "drain:\n  timeout_seconds: 1\n",
        "uac_callee_hangs_up.xml",
        &[],
    );
    assert_sipp_ok(&caller.join().expect("caller"), "caller gets BYE");
    assert_sipp_ok(&uas.finish(LIMIT), "callee gets BYE");
    let status = pbx.wait_exit(LIMIT);
    assert!(status.success(), "exit {status}");
    let records = cdr_records_in(&pbx.dir.path().join("cdr"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["end_reason"], "drain");
    assert_eq!(records[0]["disposition"], "answered");
}

#[test]
fn kill_9_under_load_keeps_every_call_that_ended_a_second_earlier() {
    let uas_port = free_port();
    let pbx = Pbx::start(
        uas_port,
        "logging:\n  level: WARN\n  format: text\n  output: stdout\n",
    );
    let uas = Sipp::new("uas_answer.xml", uas_port)
        .args(["-m", "100000"])
        .spawn(uas_port);
    let uac_port = free_port();
    let uac = Sipp::new("uac_basic.xml", uac_port)
        .args(["-m", "100000", "-r", "100", "-s", "1002"])
        .arg(pbx.sip_addr().to_string())
        .spawn(uac_port);
    let ended = |pbx: &Pbx| -> usize {
        pbx.metrics()
            .lines()
            .find(|l| l.starts_with("sip_pbx_call_duration_seconds_count"))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or_default() as usize
    };
    wait_until(LIMIT, "calls ending", || ended(&pbx) >= 200);
    let ended_before = ended(&pbx);
    // The promise is about time: what ended a second before the crash is on disk.
    let mark = Instant::now();
    while mark.elapsed() < Duration::from_millis(1100) {
        std::thread::yield_now();
    }
    let mut pbx = pbx;
    pbx.signal("KILL");
    pbx.wait_exit(LIMIT);
    drop((uas, uac));
    let records = cdr_records_in(&pbx.dir.path().join("cdr"));
    assert!(
        records.len() >= ended_before,
        "{} CDR records, {ended_before} calls had ended a second before the crash",
        records.len()
    );
}
