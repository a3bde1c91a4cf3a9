//! Real softphones for end-to-end tests: `baresip` (1.0) processes, each
//! with its own config directory and free ports, no audio hardware (it
//! plays a WAV file and records what it hears to another), driven through
//! its `ctrl_tcp` command interface: netstring-framed JSON commands in,
//! responses and events (`REGISTER_OK`, `CALL_ESTABLISHED`, ...) out.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, wait_until};

/// How long a phone may take to answer a command or report an event.
pub const LIMIT: Duration = Duration::from_secs(20);

/// Sample rate of the phones' audio files (that of G.711).
pub const RATE: u32 = crate::WAV_RATE;

/// Where the phones take their RTP ports: below the ephemeral range, apart
/// from the ports [`free_port`] hands out and the PBX port pools of the tests.
pub const RTP_PORTS: &str = "26000-29999";

/// One `baresip`, killed when dropped.
pub struct Softphone {
    pub name: String,
    child: Child,
    ctrl: TcpStream,
    pending: Vec<u8>,
    events: VecDeque<serde_json::Value>,
    /// Types of the events taken so far, for failure messages.
    seen: Vec<String>,
    next_token: u32,
    dir: tempfile::TempDir,
}

impl Softphone {
    /// Starts a phone that sends `source` (16-bit mono PCM WAV at
    /// [`RATE`], see [`tone_wav`]) as its microphone and records what it
    /// receives; it has no account until [`Softphone::register`].
    pub fn start(name: &str, source: &[u8]) -> Softphone {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sip_port, ctrl_port) = (free_port(), free_port());
        let path = dir.path();
        std::fs::write(path.join("source.wav"), source).expect("source WAV");
        // net_interface keeps SIP and SDP addresses on loopback; aufile
        // reads the WAV (and ends the call at its end, as baresip does with
        // a file source); aubridge is a player that needs no sound
        // card; sndfile, an audio filter, writes what is decoded from the
        // network to <snd_path>/dump-<time>-dec.wav (and what is sent to
        // ...-enc.wav).
        let config = format!(
            "poll_method\tepoll\n\
             sip_listen\t127.0.0.1:{sip_port}\n\
             net_interface\t127.0.0.1\n\
             rtp_ports\t{RTP_PORTS}\n\
             audio_source\taufile,{source}\n\
             audio_player\taubridge,{name}\n\
             audio_alert\taubridge,{name}\n\
             module_path\t/usr/lib/baresip/modules\n\
             module\tg711.so\n\
             module\taufile.so\n\
             module\taubridge.so\n\
             module\tsndfile.so\n\
             snd_path\t{dir}\n\
             module_app\taccount.so\n\
             module_app\tmenu.so\n\
             module_app\tctrl_tcp.so\n\
             ctrl_tcp_listen\t127.0.0.1:{ctrl_port}\n",
            source = path.join("source.wav").display(),
            dir = path.display(),
        );
        std::fs::write(path.join("config"), config).expect("config");
        // Accounts come later, with `uanew`, once events can be heard.
        std::fs::write(path.join("accounts"), "").expect("accounts");
        let log = std::fs::File::create(path.join("baresip.log")).expect("log");
        let mut child = Command::new("baresip")
            .arg("-v")
            .arg("-f")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("baresip runs (tests/setup.sh installs it)");
        let mut ctrl = None;
        wait_until(LIMIT, "baresip's ctrl_tcp to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "baresip {name} exited at start with {status}:\n{}",
                    std::fs::read_to_string(path.join("baresip.log")).unwrap_or_default()
                );
            }
            ctrl = TcpStream::connect(("127.0.0.1", ctrl_port)).ok();
            ctrl.is_some()
        });
        let ctrl = ctrl.expect("connected");
        ctrl.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        Softphone {
            name: name.to_string(),
            child,
            ctrl,
            pending: Vec::new(),
            events: VecDeque::new(),
            seen: Vec::new(),
            next_token: 0,
            dir,
        }
    }

    /// Adds the account `user` at the registrar `pbx` with digest
    /// credentials and G.711 `codec` ("PCMU" or "PCMA"), and waits for the
    /// registration to succeed.
    pub fn register(&mut self, user: &str, password: &str, pbx: SocketAddr, codec: &str) {
        self.command(
            "uanew",
            &format!("<sip:{user}@{pbx}>;auth_pass={password};regint=300;audio_codecs={codec}"),
        );
        self.expect_event("REGISTER_OK");
    }

    /// Calls `uri`.
    pub fn dial(&mut self, uri: &str) {
        self.command("dial", uri);
    }

    /// Answers the incoming call.
    pub fn accept(&mut self) {
        self.command("accept", "");
    }

    /// Hangs up the current call.
    pub fn hangup(&mut self) {
        self.command("hangup", "");
    }

    /// Runs a command and returns its response's `data`; fails the test if
    /// baresip reports it failed.
    pub fn command(&mut self, command: &str, params: &str) -> String {
        self.next_token += 1;
        let token = format!("t{}", self.next_token);
        let text =
            serde_json::json!({"command": command, "params": params, "token": token}).to_string();
        self.ctrl
            .write_all(format!("{}:{text},", text.len()).as_bytes())
            .expect("write to baresip's ctrl_tcp");
        let deadline = Instant::now() + LIMIT;
        let mut response = None;
        while response.is_none() {
            for message in self.read_messages(deadline, &format!("an answer to {command}")) {
                if message["response"].as_bool() == Some(true) && message["token"] == token {
                    response = Some(message);
                } else if message["event"].as_bool() == Some(true) {
                    self.events.push_back(message);
                }
            }
        }
        let response = response.expect("answered");
        assert_eq!(
            response["ok"].as_bool(),
            Some(true),
            "{}: {command} {params} failed: {response}\n{}",
            self.name,
            self.log()
        );
        response["data"].as_str().unwrap_or_default().to_string()
    }

    /// Waits for the next event of type `kind` (e.g. `CALL_ESTABLISHED`)
    /// and returns it; the events before it are passed over.
    pub fn expect_event(&mut self, kind: &str) -> serde_json::Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            while let Some(event) = self.events.pop_front() {
                let Some(t) = event["type"].as_str() else {
                    continue;
                };
                self.seen.push(t.to_string());
                if t == kind {
                    return event;
                }
                assert!(
                    t != "CALL_CLOSED" || !kind.starts_with("CALL_"),
                    "{}: the call closed ({}) while waiting for {kind}\n{}",
                    self.name,
                    event["param"],
                    self.log()
                );
            }
            let messages = self.read_messages(deadline, kind);
            self.events.extend(
                messages
                    .into_iter()
                    .filter(|m| m["event"].as_bool() == Some(true)),
            );
        }
    }

    /// Whole messages from the control connection; waits for at least one
    /// until `deadline`, then fails the test naming `what` it waited for.
    fn read_messages(&mut self, deadline: Instant, what: &str) -> Vec<serde_json::Value> {
        loop {
            let mut messages = Vec::new();
            while let Some(message) = self.next_netstring() {
                let value = serde_json::from_slice(&message)
                    .unwrap_or_else(|e| panic!("{}: ctrl_tcp sent bad JSON ({e})", self.name));
                messages.push(value);
            }
            if !messages.is_empty() {
                return messages;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{}: baresip exited ({status}) while waiting for {what}\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {LIMIT:?}; events so far: {:?}\n{}",
                self.name,
                self.seen,
                self.log()
            );
            let mut buf = [0u8; 4096];
            match self.ctrl.read(&mut buf) {
                Ok(0) => panic!("{}: ctrl_tcp closed\n{}", self.name, self.log()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(_) => {} // read timeout: look again
            }
        }
    }

    fn next_netstring(&mut self) -> Option<Vec<u8>> {
        let colon = self.pending.iter().position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(&self.pending[..colon])
            .ok()?
            .parse()
            .unwrap_or_else(|_| panic!("{}: bad netstring from ctrl_tcp", self.name));
        let end = colon + 1 + len;
        if self.pending.len() <= end {
            return None;
        }
        assert_eq!(self.pending[end], b',', "{}: bad netstring", self.name);
        let message = self.pending[colon + 1..end].to_vec();
        self.pending.drain(..=end);
        Some(message)
    }

    /// The audio this phone decoded from the network during its call
    /// (written by the sndfile filter), as samples.
    pub fn received_audio(&self) -> Vec<i16> {
        let file = std::fs::read_dir(self.dir.path())
            .expect("phone dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
            .unwrap_or_else(|| panic!("{}: no recording\n{}", self.name, self.log()));
        wav_samples(&std::fs::read(&file).expect("recording"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("baresip.log")
    }
}

impl Drop for Softphone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- baresip {} log ----\n{}", self.name, self.log());
        }
    }
}

/// `seconds` of a sine tone at `hz` as a 16-bit mono PCM WAV at [`RATE`].
pub fn tone_wav(hz: f64, seconds: f64) -> Vec<u8> {
    let count = (f64::from(RATE) * seconds) as u32;
    let samples: Vec<u8> = (0..count)
        .flat_map(|i| {
            let t = f64::from(i) / f64::from(RATE);
            let v = (8000.0 * (2.0 * std::f64::consts::PI * hz * t).sin()) as i16;
            v.to_le_bytes()
        })
        .collect();
    crate::wav(1, 16, &samples)
}

/// The samples of a 16-bit mono PCM WAV; a data chunk whose size was never
/// filled in (a file still being written) runs to the end of the file.
pub fn wav_samples(wav: &[u8]) -> Vec<i16> {
    assert!(wav.len() >= 12 && &wav[..4] == b"RIFF" && &wav[8..12] == b"WAVE");
    let mut at = 12;
    while at + 8 <= wav.len() {
        let id = &wav[at..at + 4];
        let size = u32::from_le_bytes(wav[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        let body = at + 8;
        if id == b"fmt " {
            let format = u16::from_le_bytes([wav[body], wav[body + 1]]);
            let channels = u16::from_le_bytes([wav[body + 2], wav[body + 3]]);
            let bits = u16::from_le_bytes([wav[body + 14], wav[body + 15]]);
            assert_eq!((format, channels, bits), (1, 1, 16), "not 16-bit mono PCM");
        }
        if id == b"data" {
            let end = if size == 0 || body + size > wav.len() {
                wav.len()
            } else {
                body + size
            };
            return wav[body..end]
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect();
        }
        at = body + size + (size & 1);
    }
    panic!("WAV without a data chunk");
}

/// The power of `samples` at `hz` (Goertzel), normalised by their count.
pub fn power_at(samples: &[i16], hz: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * hz / f64::from(RATE);
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &x in samples {
        let s = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (samples.len().max(1) as f64).powi(2)
}
