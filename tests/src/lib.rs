//! End-to-end test harness: builds and runs the real `sip-pbx` binary on
//! loopback, drives it with SIPp scenarios from `tests/sipp/` and with raw
//! SIP over UDP, and cleans up every process it started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds (once per test process) and returns a release binary of the workspace.
pub fn binary(package: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--bins", "-p", package])
            .current_dir(root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building {package} failed");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    target.join("release").join(name)
}

pub fn pbx_binary() -> PathBuf {
    binary("sip-pbx", "sip-pbx")
}

/// An even port, free with its odd neighbour (an RTCP port, baresip's TLS
/// port) on every address for both UDP and TCP.
pub fn free_port() -> u16 {
    free_ports(2)
}

/// The first of `count` consecutive ports (an even one), all free on every
/// address for both UDP and TCP: for a peer that binds a run of ports, as
/// SIPp's RTP echo does (its port and the one two above).
///
/// The ports lie above the kernel's ephemeral range and each test process
/// walks them with its own cursor: a port handed out here is never the one
/// that a socket bound to port 0 (a `SipClient`, SIPp's media) or a test
/// running in parallel takes before its user binds it.
pub fn free_ports(count: u16) -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ports = port_range_for_tests();
    let step = usize::from(count.next_multiple_of(2));
    // One start and one span whatever the count, so that runs handed out
    // for different counts never overlap: a SIPp's SIP port (two) is not
    // the media run (four) of the next, which it has not bound yet.
    let span = (ports.len() - step) / 8 * 8;
    let start = std::process::id() as usize * 7919 * 8;
    (0..span / step)
        .map(|_| {
            let offset = (start + NEXT.fetch_add(step, Ordering::Relaxed)) % span;
            ports.start + offset as u16
        })
        .find(|&first| {
            (first..first + count).all(|p| {
                UdpSocket::bind(("0.0.0.0", p)).is_ok() && TcpListener::bind(("0.0.0.0", p)).is_ok()
            })
        })
        .expect("free ports above the ephemeral range")
}

/// The even-aligned ports between the end of the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`) and 65000.
fn port_range_for_tests() -> std::ops::Range<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("read net.ipv4.ip_local_port_range");
    let last_ephemeral: u16 = range
        .split_whitespace()
        .nth(1)
        .and_then(|hi| hi.parse().ok())
        .expect("net.ipv4.ip_local_port_range holds two ports");
    let start = (last_ephemeral + 2) & !1;
    assert!(
        start + 1000 <= 65_000,
        "the tests need 1000 ports above the ephemeral range, which ends at {last_ephemeral}: \
         lower net.ipv4.ip_local_port_range"
    );
    start..65_000
}

/// Polls `check` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `sip-pbx`, killed when dropped.
pub struct Pbx {
    pub child: Child,
    pub sip_port: u16,
    pub http_port: u16,
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
}

impl Pbx {
    /// Starts the PBX with the test defaults (loopback, direct media, routes
    /// of every user to `127.0.0.1:uas_port`) plus `extra` YAML top-level
    /// sections, which replace the defaults' sections of the same name;
    /// `SIP_PORT` in them stands for the port the PBX listens on, `PBX_DIR`
    /// for its temporary directory (where `log()` and `traffic()` read).
    pub fn start(uas_port: u16, extra: &str) -> Pbx {
        Self::start_with(uas_port, extra, |_| {})
    }

    /// As `start`, with the command adjusted by `adjust` before it runs.
    pub fn start_with(uas_port: u16, extra: &str, adjust: impl FnOnce(&mut Command)) -> Pbx {
        let mut pbx = Self::spawn(uas_port, extra, adjust);
        let probe = SipClient::new();
        wait_until(Duration::from_secs(20), "the PBX to answer OPTIONS", || {
            if let Ok(Some(status)) = pbx.child.try_wait() {
                panic!("sip-pbx exited at start with {status}:\n{}", pbx.log());
            }
            probe.send(
                &options(pbx.sip_addr(), probe.addr(), "probe"),
                pbx.sip_addr(),
            );
            probe.recv(Duration::from_millis(200)).is_some()
        });
        pbx
    }

    /// Runs the PBX as `start_with` would and expects it to refuse to
    /// start: returns how it exited and its log.
    pub fn refused(
        uas_port: u16,
        extra: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> (ExitStatus, String) {
        let mut pbx = Self::spawn(uas_port, extra, adjust);
        let status = pbx.wait_exit(Duration::from_secs(20));
        (status, pbx.log())
    }

    fn spawn(uas_port: u16, extra: &str, adjust: impl FnOnce(&mut Command)) -> Pbx {
        let sip_port = free_port();
        let http_port = free_port();
        let metrics_port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        let mut sections: Vec<(String, String)> = vec![
            ("sip", format!("sip:\n  listen_ip: 127.0.0.1\n  listen_port: {sip_port}\n  transport: both\n  advertised_ip: 127.0.0.1\n  max_concurrent_calls: 1000\n")),
            ("auth", "auth:\n  enabled: false\n".to_string()),
            ("routes", format!("routes:\n  - match: \"^(.+)$\"\n    target: \"sip:$1@127.0.0.1:{uas_port}\"\n")),
            ("media", "media:\n  mode: direct\n".to_string()),
            ("cdr", format!("cdr:\n  output_dir: {d}/cdr\n")),
            ("events", format!("events:\n  spool_dir: {d}/spool\n")),
            ("logging", format!("logging:\n  level: DEBUG\n  format: text\n  output: {d}/pbx.log\n")),
            ("monitoring", format!("monitoring:\n  prometheus_port: {metrics_port}\n  health_check_port: {http_port}\n")),
        ]
        .into_iter()
        .map(|(name, body)| (name.to_string(), body))
        .collect();
        let extra = extra
            .replace("SIP_PORT", &sip_port.to_string())
            .replace("PBX_DIR", &d.to_string());
        for block in extra.split("\n\n").filter(|b| !b.trim().is_empty()) {
            let name = block
                .trim_start()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            sections.retain(|(n, _)| *n != name);
            sections.push((name, format!("{}\n", block.trim())));
        }
        let yaml: String = sections.into_iter().map(|(_, s)| s).collect();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let mut command = Command::new(pbx_binary());
        command
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log"));
        adjust(&mut command);
        let child = command.spawn().expect("sip-pbx starts");
        Pbx {
            child,
            sip_port,
            http_port,
            metrics_port,
            dir,
        }
    }

    pub fn sip_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.sip_port))
    }

    pub fn log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("pbx.log"))
    }

    /// The SIP traffic log so far, of a PBX started with
    /// `logging.sip_traffic_log: PBX_DIR/traffic`.
    pub fn traffic(&self) -> String {
        std::fs::read_dir(self.dir.path().join("traffic"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("sip_traffic_"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }

    /// GET on the HTTP API; returns status and body.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.http_port, "GET", path, "")
    }

    /// `active_calls` from `/api/stats`.
    pub fn active_calls(&self) -> u64 {
        let (status, body) = self.http_get("/api/stats");
        assert_eq!(status, 200, "{body}");
        let stats: serde_json::Value = serde_json::from_str(&body).expect("stats JSON");
        stats["active_calls"].as_u64().expect("active_calls")
    }

    /// Every CDR record written so far, each line parsed (a line that does
    /// not parse fails the test).
    pub fn cdr_records(&self) -> Vec<serde_json::Value> {
        cdr_records_in(&self.dir.path().join("cdr"))
    }

    /// Waits for `n` CDR records.
    pub fn wait_cdrs(&self, n: usize) -> Vec<serde_json::Value> {
        let mut records = Vec::new();
        wait_until(Duration::from_secs(10), "CDR records", || {
            records = self.cdr_records();
            records.len() >= n
        });
        records
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        let (status, body) = http_request(self.metrics_port, "GET", "/metrics", "");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// RTP and RTCP packets the media relay has forwarded (the metric).
    pub fn relayed_packets(&self) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with("sip_pbx_media_packets_total"))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or_default()
    }

    /// Waits for the PBX to exit by itself and returns how.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut status = None;
        wait_until(limit, "the PBX to exit", || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status.expect("exited")
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal}");
    }
}

impl Drop for Pbx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- sip-pbx log ----\n{}", self.log());
        }
    }
}

/// The records of every `.jsonl` file in `dir`, each line parsed.
pub fn cdr_records_in(dir: &Path) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "jsonl") {
            let text = std::fs::read_to_string(entry.path()).expect("CDR file");
            for line in text.lines() {
                let record = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("CDR line does not parse ({e}): {line}"));
                records.push(record);
            }
        }
    }
    records
}

/// A minimal HTTP/1.1 client for the PBX's API.
pub fn http_request(port: u16, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("HTTP connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n{headers}\r\n"
    );
    stream.write_all(request.as_bytes()).expect("HTTP write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("HTTP read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// What a SIPp run ended with.
pub struct SippRun {
    pub status: ExitStatus,
    pub output: String,
}

/// Where `tests/sipp/setup-sha256.sh` installs SIPp 3.7.3.
pub fn sipp_sha256_cache() -> PathBuf {
    std::env::var_os("SIP_PBX_SIPP373_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/sip-pbx-sipp373"))
}

/// SIPp 3.7.3 with SHA-256 digest (the system's SIPp 3.6.1 does MD5
/// only): the wrapper `tests/sipp/setup-sha256.sh` installs. Fails the test
/// if it is missing or is not that SIPp.
pub fn sipp_sha256() -> PathBuf {
    let sipp = sipp_sha256_cache().join("sipp");
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let setup = "run tests/sipp/setup-sha256.sh (tests/setup.sh does)";
        assert!(
            sipp.is_file(),
            "SIPp 3.7.3 (SHA-256 digest) is not installed: no {}; {setup}",
            sipp.display()
        );
        let out = Command::new(&sipp)
            .arg("-v")
            .output()
            .unwrap_or_else(|e| panic!("{} does not run ({e}); {setup}", sipp.display()));
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            version.contains("SIPp v3.7.3-") && version.contains("SHA256"),
            "{} is not SIPp 3.7.3 with SHA-256; {setup}:\n{version}{}",
            sipp.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    sipp
}

/// SIPp with a scenario from `tests/sipp/` (or a built-in: `uac`, `uas`).
pub struct Sipp {
    command: Command,
    install: &'static str,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sipp {
    /// The system's SIPp (`sipp` on PATH: Debian's sip-tester).
    pub fn new(scenario: &str, local_port: u16) -> Sipp {
        Sipp::with_program(
            "sipp".as_ref(),
            "apt-get install sip-tester",
            scenario,
            local_port,
        )
    }

    /// SIPp 3.7.3, which answers SHA-256 digest challenges ([`sipp_sha256`]).
    pub fn sha256(scenario: &str, local_port: u16) -> Sipp {
        Sipp::with_program(
            &sipp_sha256(),
            "tests/sipp/setup-sha256.sh",
            scenario,
            local_port,
        )
    }

    fn with_program(
        program: &Path,
        install: &'static str,
        scenario: &str,
        local_port: u16,
    ) -> Sipp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new(program);
        if scenario.ends_with(".xml") {
            command
                .arg("-sf")
                .arg(root().join("tests/sipp").join(scenario));
        } else {
            command.args(["-sn", scenario]);
        }
        command
            .args(["-i", "127.0.0.1", "-p", &local_port.to_string()])
            .args([
                "-nostdin",
                "-trace_err",
                "-timeout",
                "60s",
                "-timeout_error",
            ])
            .arg("-error_file")
            .arg(dir.path().join("errors.log"))
            .current_dir(dir.path())
            .stdin(Stdio::null());
        let log = dir.path().join("sipp.log");
        Sipp {
            command,
            install,
            log,
            _dir: dir,
        }
    }

    /// Writes a file (an audio file for `rtp_stream`) where SIPp runs.
    pub fn file(self, name: &str, contents: &[u8]) -> Sipp {
        std::fs::write(self._dir.path().join(name), contents).expect("write SIPp file");
        self
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Sipp {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Sipp
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    /// Runs to completion.
    pub fn run(mut self) -> SippRun {
        let out = std::fs::File::create(&self.log).expect("log");
        let status = self
            .command
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .status()
            .unwrap_or_else(|e| panic!("sipp runs ({}): {e}", self.install));
        let output = self.output();
        SippRun { status, output }
    }

    /// Starts in the background (a UAS); waits until its UDP port is bound.
    pub fn spawn(self, port: u16) -> SippProcess {
        self.spawn_until(|| UdpSocket::bind(("127.0.0.1", port)).is_err())
    }

    /// Starts in the background (a UAS over TCP); waits until it listens.
    pub fn spawn_tcp(self, port: u16) -> SippProcess {
        self.spawn_until(|| TcpStream::connect(("127.0.0.1", port)).is_ok())
    }

    fn spawn_until(mut self, mut ready: impl FnMut() -> bool) -> SippProcess {
        let out = std::fs::File::create(&self.log).expect("log");
        let child = self
            .command
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("sipp runs ({}): {e}", self.install));
        let mut process = SippProcess { child, sipp: self };
        wait_until(Duration::from_secs(10), "SIPp to bind its port", || {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "sipp exited at start with {status}:\n{}",
                    process.sipp.output()
                );
            }
            ready()
        });
        process
    }

    fn output(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let errors = read(&self._dir.path().join("errors.log"));
        let traces: String = std::fs::read_dir(self._dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("_errors.log"))
            .map(|e| read(&e.path()))
            .collect();
        format!("{}\n{errors}\n{traces}", read(&self.log))
    }
}

/// A background SIPp, killed when dropped.
pub struct SippProcess {
    child: Child,
    sipp: Sipp,
}

impl SippProcess {
    /// Waits for it to finish its `-m` calls.
    pub fn finish(mut self, limit: Duration) -> SippRun {
        let mut status = None;
        let deadline = Instant::now() + limit;
        while status.is_none() && Instant::now() < deadline {
            status = self.child.try_wait().ok().flatten();
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = match status {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                self.child.wait().expect("killed")
            }
        };
        SippRun {
            status,
            output: self.sipp.output(),
        }
    }
}

impl Drop for SippProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that a SIPp run succeeded, showing its output if not.
pub fn assert_sipp_ok(run: &SippRun, what: &str) {
    assert!(
        run.status.success(),
        "{what}: SIPp {}\n{}",
        run.status,
        run.output
    );
}

/// A raw SIP endpoint over UDP for what SIPp cannot express.
pub struct SipClient {
    socket: UdpSocket,
}

impl Default for SipClient {
    fn default() -> Self {
        Self::new()
    }
}

impl SipClient {
    pub fn new() -> SipClient {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn bind(addr: SocketAddr) -> SipClient {
        Self::try_bind(addr).expect("bind SIP client")
    }

    pub fn try_bind(addr: SocketAddr) -> std::io::Result<SipClient> {
        UdpSocket::bind(addr).map(|socket| SipClient { socket })
    }

    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("addr")
    }

    pub fn send(&self, message: &[u8], to: SocketAddr) {
        self.socket.send_to(message, to).expect("send");
    }

    /// The next datagram, or None after `limit`.
    pub fn recv(&self, limit: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(limit)).expect("timeout");
        self.read()
    }

    /// A datagram that has already arrived, if any.
    pub fn try_recv(&self) -> Option<String> {
        self.socket.set_nonblocking(true).expect("non-blocking");
        let text = self.read();
        self.socket.set_nonblocking(false).expect("blocking");
        text
    }

    fn read(&self) -> Option<String> {
        let mut buf = vec![0u8; 65_535];
        let (len, _) = self.socket.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..len]).into_owned())
    }

    /// The next datagram that `wanted` picks, past any others (stray
    /// datagrams, retransmissions, provisional responses), or None after
    /// `limit`.
    pub fn recv_matching(&self, limit: Duration, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let text = self.recv(left)?;
            if wanted(&text) {
                return Some(text);
            }
        }
        None
    }

    /// The next response that is not 100 Trying, as (code, text).
    pub fn final_response(&self, limit: Duration) -> Option<(u16, String)> {
        let text = self.recv_matching(limit, |text| status_code(text) != Some(100))?;
        status_code(&text).map(|code| (code, text))
    }
}

impl SipClient {
    /// The next request from the PBX, which must be a `method`.
    pub fn expect_request(&self, method: &str) -> String {
        let text = self
            .recv(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no {method} from the PBX"));
        assert!(
            text.starts_with(&format!("{method} ")),
            "expected {method}, got:\n{text}"
        );
        text
    }
}

/// The sample rate of the test WAV files (telephony's 8 kHz).
pub const WAV_RATE: u32 = 8000;

/// A mono WAV file at [`WAV_RATE`]: `format` 1 (PCM, 16 bits) or 7 (G.711
/// mu-law, 8 bits) around `data`.
pub fn wav(format: u16, bits: u16, data: &[u8]) -> Vec<u8> {
    let rate = WAV_RATE;
    let block = bits / 8;
    let mut wav = Vec::with_capacity(44 + data.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&format.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&rate.to_le_bytes());
    wav.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
    wav.extend_from_slice(&block.to_le_bytes());
    wav.extend_from_slice(&bits.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wav.extend_from_slice(data);
    wav
}

/// An INVITE for `user` at the PBX `pbx` from the raw user agent `from`,
/// with an SDP offer when given.
pub fn invite(
    pbx: SocketAddr,
    user: &str,
    from: SocketAddr,
    call_id: &str,
    sdp: Option<&str>,
) -> Vec<u8> {
    let body = sdp.unwrap_or_default();
    let content_type = if sdp.is_some() {
        "Content-Type: application/sdp\r\n"
    } else {
        ""
    };
    format!(
        "INVITE sip:{user}@{pbx} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK{call_id};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:1001@{from}>;tag=f{call_id}\r\nTo: <sip:{user}@{pbx}>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:1001@{from}>\r\n{content_type}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An in-dialog request from the raw caller of `invite()` that got
/// `response` (text): to the PBX's Contact, To with the PBX's tag, CSeq
/// `seq`, with an SDP body when given.
pub fn caller_request(
    method: &str,
    response: &str,
    from: SocketAddr,
    seq: u32,
    sdp: Option<&str>,
) -> Vec<u8> {
    let h = |name: &str| header(response, name).unwrap_or_default();
    let dialog = Dialog {
        target: h("Contact").trim_matches(['<', '>']),
        from: h("From"),
        to: h("To"),
        call_id: h("Call-ID"),
    };
    dialog.request(method, from, seq, sdp)
}

/// An in-dialog request from the raw callee that answered `invite` (text)
/// with `response_to()`: to the PBX's Contact, From with the callee's tag,
/// CSeq `seq`, with an SDP body when given.
pub fn callee_request(
    method: &str,
    invite: &str,
    from: SocketAddr,
    seq: u32,
    sdp: Option<&str>,
) -> Vec<u8> {
    let h = |name: &str| header(invite, name).unwrap_or_default();
    let me = format!("{}{}", h("To"), RAW_UA_TAG);
    let dialog = Dialog {
        target: h("Contact").trim_matches(['<', '>']),
        from: &me,
        to: h("From"),
        call_id: h("Call-ID"),
    };
    dialog.request(method, from, seq, sdp)
}

/// Where a raw user agent's in-dialog requests go and how they name it.
struct Dialog<'a> {
    target: &'a str,
    from: &'a str,
    to: &'a str,
    call_id: &'a str,
}

impl Dialog<'_> {
    fn request(&self, method: &str, me: SocketAddr, seq: u32, sdp: Option<&str>) -> Vec<u8> {
        let body = sdp.unwrap_or_default();
        let content_type = if sdp.is_some() {
            "Content-Type: application/sdp\r\n"
        } else {
            ""
        };
        format!(
            "{method} {} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{method}{seq}x{};rport\r\n\
             Max-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {seq} {method}\r\n\
             Contact: <sip:ua@{me}>\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
            self.target,
            rand_suffix(),
            self.from,
            self.to,
            self.call_id,
            body.len()
        )
        .into_bytes()
    }
}

/// The To tag `response_to()` gives a dialog.
const RAW_UA_TAG: &str = ";tag=raw-ua";

/// A response from a raw user agent at `me` to `request` (text), with a
/// To tag and, when given, an SDP body.
pub fn response_to(request: &str, status: &str, me: SocketAddr, sdp: Option<&str>) -> Vec<u8> {
    let copy = |name: &str| format!("{name}: {}\r\n", header(request, name).unwrap_or_default());
    let to = header(request, "To").unwrap_or_default();
    let tag = if to.contains("tag=") { "" } else { RAW_UA_TAG };
    let body = sdp.unwrap_or_default();
    let content_type = if sdp.is_some() {
        "Content-Type: application/sdp\r\n"
    } else {
        ""
    };
    format!(
        "SIP/2.0 {status}\r\n{}{}To: {to}{tag}\r\n{}{}Contact: <sip:ua@{me}>\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        copy("Via"),
        copy("From"),
        copy("Call-ID"),
        copy("CSeq"),
        body.len(),
    )
    .into_bytes()
}

/// A reliable provisional response (RFC 3262, RSeq 1) from a raw user
/// agent at `me` to `invite`, with an SDP body when given.
pub fn reliable_response_to(
    invite: &str,
    status: &str,
    me: SocketAddr,
    sdp: Option<&str>,
) -> Vec<u8> {
    String::from_utf8_lossy(&response_to(invite, status, me, sdp))
        .replace("Contact:", "Require: 100rel\r\nRSeq: 1\r\nContact:")
        .into_bytes()
}

/// The caller's PRACK (CSeq `seq`) of `progress`, the reliable provisional
/// response it got to its INVITE (CSeq 1), with an SDP body when given.
pub fn prack(progress: &str, from: SocketAddr, seq: u32, sdp: Option<&str>) -> Vec<u8> {
    String::from_utf8_lossy(&caller_request("PRACK", progress, from, seq, sdp))
        .replace("Contact:", "RAck: 1 1 INVITE\r\nContact:")
        .into_bytes()
}

/// An audio SDP offering PCMU, PCMA and telephone-event on `rtp_port`.
pub fn audio_sdp(rtp_port: u16, codecs: &str) -> String {
    format!(
        "v=0\r\no=ua 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {rtp_port} RTP/AVP {codecs}\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:18 G729/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
    )
}

/// The address and port of the first audio stream of a message's SDP.
pub fn sdp_audio_target(message: &str) -> Option<SocketAddr> {
    let ip = message
        .lines()
        .find_map(|l| l.strip_prefix("c=IN IP4 "))?
        .trim();
    Some(SocketAddr::new(
        ip.parse().ok()?,
        sdp_port(message, "audio")?,
    ))
}

/// The port of the first m= line of `kind` (audio, video) in a message's
/// SDP.
pub fn sdp_port(message: &str, kind: &str) -> Option<u16> {
    let prefix = format!("m={kind} ");
    message
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The version of the o= line of a message's SDP.
pub fn sdp_version(message: &str) -> Option<u64> {
    message
        .lines()
        .find_map(|l| l.strip_prefix("o="))?
        .split(' ')
        .nth(2)?
        .parse()
        .ok()
}

/// A message's SDP without its o= line: the session it describes.
pub fn sdp_session(message: &str) -> Option<String> {
    let (_, body) = message.split_once("\r\n\r\n")?;
    Some(
        body.lines()
            .filter(|l| !l.starts_with("o="))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The status code of a response's text.
pub fn status_code(text: &str) -> Option<u16> {
    text.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

/// The value of the first header `name` in a message's text.
pub fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An OPTIONS request from `from` to `to`.
pub fn options(to: SocketAddr, from: SocketAddr, call_id: &str) -> Vec<u8> {
    format!(
        "OPTIONS sip:pbx@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK{call_id}{n};rport\r\nMax-Forwards: 70\r\nFrom: <sip:probe@{from}>;tag=p1\r\nTo: <sip:pbx@{to}>\r\nCall-ID: {call_id}{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        n = rand_suffix()
    )
    .into_bytes()
}

/// An OPTIONS from `from` over a TCP connection to `to`.
pub fn options_over_tcp(to: SocketAddr, from: SocketAddr, call_id: &str) -> Vec<u8> {
    String::from_utf8_lossy(&options(to, from, call_id))
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
        .into_bytes()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}
pub mod media;
pub mod phone;
pub mod softphone;

/// Makes `command`'s process refuse `io_uring_setup` with EPERM, as the
/// default seccomp profiles of Docker and containerd (a pod's
/// `RuntimeDefault`) do.
pub fn without_io_uring(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    const IO_URING_SETUP: u32 = 425;
    let statement = |code: u32, jf: u8, k: u32| libc::sock_filter {
        code: u16::try_from(code).expect("BPF code"),
        jt: 0,
        jf,
        k,
    };
    let filter = [
        // The system call number, offset 0 of seccomp_data.
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0),
        statement(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            1,
            IO_URING_SETUP,
        ),
        statement(
            libc::BPF_RET | libc::BPF_K,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        statement(libc::BPF_RET | libc::BPF_K, 0, libc::SECCOMP_RET_ALLOW),
    ];
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes two prctl calls on memory it owns.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: 4,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts `command`'s process without CAP_NET_RAW, as a pod whose
/// securityContext drops it (or every capability) does.
pub fn without_net_raw(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    const CAP_NET_RAW: libc::c_ulong = 13;
    // SAFETY: the closure runs in the child between fork and exec and makes
    // one prctl call. A capability out of the bounding set is not granted
    // at exec, not even to root.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_NET_RAW, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts `command`'s process with the open-file limits `soft` and `hard`,
/// as a host or container runtime may.
pub fn open_file_limit(soft: u64, hard: u64) -> impl FnOnce(&mut Command) {
    move |command| {
        use std::os::unix::process::CommandExt;
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: the closure runs in the child between fork and exec and
        // makes one setrlimit call on memory it owns.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Whether this machine gives a process an io_uring of the kind the relay
/// asks for (single issuer, deferred task work: Linux 6.1).
pub fn io_uring_available() -> bool {
    const SINGLE_ISSUER: u32 = 1 << 12;
    const DEFER_TASKRUN: u32 = 1 << 13;
    // struct io_uring_params is 120 bytes; `flags` is its third word.
    let mut params = [0u32; 30];
    params[2] = SINGLE_ISSUER | DEFER_TASKRUN;
    // SAFETY: the kernel writes at most the 120 bytes of `params`.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_mut_ptr()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is the ring just created, owned here.
    unsafe { libc::close(i32::try_from(fd).unwrap_or(-1)) };
    true
}
