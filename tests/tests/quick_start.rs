//! The README's quick start runs as written: its first command starts a
//! PBX on the built-in defaults that answers SIP and HTTP, and drains and
//! exits 0 on SIGTERM. (Its second command, `tests/run.sh`, is what runs
//! this test.)

use std::process::{Command, Stdio};
use std::time::Duration;

use sip_pbx_e2e::{http_request, options, root, wait_until, SipClient};

/// The shell commands of the code blocks of a README section.
fn commands(section: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let body = readme
        .split(&format!("## {section}\n"))
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .unwrap_or_else(|| panic!("README has no section {section}"));
    body.split("```sh\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .flat_map(|block| block.lines().map(str::to_string))
        .collect()
}

#[test]
fn the_run_command_serves_sip_and_http_on_the_defaults() {
    let commands = commands("Quick start");
    assert_eq!(commands, ["cargo run --release -p sip-pbx", "tests/run.sh"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new("sh")
        .args(["-c", &format!("exec {}", commands[0])])
        .current_dir(root())
        .env("SIP_PBX_LOG", "warn")
        .env("CARGO_TARGET_DIR", root().join("target"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).expect("log"))
        .spawn()
        .expect("cargo runs");
    let client = SipClient::new();
    let pbx = "127.0.0.1:5060".parse().expect("addr");
    wait_until(Duration::from_secs(600), "the PBX on 5060", || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "exited with {status}: {}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        }
        client.send(&options(pbx, client.addr(), "quick-start"), pbx);
        client.recv(Duration::from_millis(200)).is_some()
    });
    assert_eq!(http_request(8080, "GET", "/health", "").0, 200);
    assert_eq!(http_request(9090, "GET", "/metrics", "").0, 200);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut status = None;
    wait_until(Duration::from_secs(30), "exit after SIGTERM", || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}
