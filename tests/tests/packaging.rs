//! What ships beside the code: every example configuration in `config/` is
//! accepted by `sip-pbx --check-config` (the SipPbx samples of
//! `config/samples/` are rendered by operator/tests/cli.rs), and
//! `docker/Dockerfile` has the binaries, ports, entry point and health check
//! the operator and the chart rely on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sip_pbx_e2e::{free_port, pbx_binary, root, Pbx};

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_config(path: &Path) -> Output {
    Command::new(pbx_binary())
        .arg("--check-config")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run sip-pbx --check-config")
}

#[test]
fn every_example_configuration_is_valid() {
    let files = yaml_files(&root().join("config"));
    for name in ["single-machine.yaml", "trunk.yaml", "config.example.yaml"] {
        assert!(files.iter().any(|f| f.ends_with(name)), "config/{name}");
    }
    for file in files {
        ok(&check_config(&file), &file.display().to_string());
    }
}

fn dockerfile() -> String {
    std::fs::read_to_string(root().join("docker/Dockerfile")).expect("docker/Dockerfile")
}

/// The value of the last `INSTRUCTION` line (continuations joined).
fn instruction(dockerfile: &str, name: &str) -> String {
    let joined = dockerfile.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name} ")))
        .next_back()
        .unwrap_or_else(|| panic!("no {name} in docker/Dockerfile"))
        .trim()
        .to_string()
}

/// An exec-form instruction (a JSON array) as its words.
fn exec_form(dockerfile: &str, name: &str) -> Vec<String> {
    let value = instruction(dockerfile, name);
    serde_json::from_str(&value).unwrap_or_else(|e| panic!("{name} is not exec form: {value}: {e}"))
}

#[test]
fn dockerfile_builds_both_binaries_and_exposes_the_ports() {
    let file = dockerfile();
    assert!(file.contains("cargo build --release --locked --bins -p sip-pbx -p sip-pbx-operator"));
    assert!(file.contains("FROM debian:bookworm-slim"));
    for binary in ["sip-pbx", "sip-pbx-operator"] {
        assert!(
            file.contains(&format!("/out/{binary} ")) && file.contains("/usr/local/bin/"),
            "{binary} copied into the image"
        );
    }
    let exposed: Vec<String> = instruction(&file, "EXPOSE")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        exposed,
        ["5060/udp", "5060/tcp", "8080", "9090", "10000-20000/udp"]
    );
    // Non-root, with the uid the chart's operator Deployment runs as.
    assert_eq!(instruction(&file, "USER"), "65532:65532");
    let healthcheck = instruction(&file, "HEALTHCHECK");
    assert!(healthcheck.contains("/dev/tcp/127.0.0.1/8080") && healthcheck.contains("GET /health"));
}

/// The image's entry point with its default arguments, run with the release
/// binary: the configuration it names must be one sip-pbx accepts.
#[test]
fn the_image_command_line_starts_sip_pbx() {
    let file = dockerfile();
    let entrypoint = exec_form(&file, "ENTRYPOINT");
    assert_eq!(entrypoint, ["/usr/local/bin/sip-pbx"], "sip-pbx is PID 1");
    let cmd = exec_form(&file, "CMD");
    assert_eq!(cmd[0], "--config");
    let copied = instruction(&file, "COPY config/config.example.yaml");
    assert_eq!(
        copied, cmd[1],
        "CMD names the configuration the image holds"
    );
    let out = Command::new(pbx_binary())
        .arg("--check-config")
        .arg("--config")
        .arg(root().join("config/config.example.yaml"))
        .output()
        .expect("run sip-pbx");
    ok(&out, "the image's command line");
}

/// The HEALTHCHECK command, pointed at `port` instead of the default 8080.
fn healthcheck(port: u16) -> Output {
    let file = dockerfile();
    let value = instruction(&file, "HEALTHCHECK");
    let (_, cmd) = value.split_once("CMD ").expect("HEALTHCHECK ... CMD [...]");
    let words: Vec<String> = serde_json::from_str(cmd).expect("HEALTHCHECK CMD in exec form");
    let words: Vec<String> = words
        .iter()
        .map(|w| {
            w.replace(
                "/dev/tcp/127.0.0.1/8080",
                &format!("/dev/tcp/127.0.0.1/{port}"),
            )
        })
        .collect();
    Command::new(&words[0])
        .args(&words[1..])
        .output()
        .expect("run the HEALTHCHECK command")
}

#[test]
fn the_image_healthcheck_asks_the_pbx() {
    let pbx = Pbx::start(free_port(), "");
    ok(
        &healthcheck(pbx.http_port),
        "HEALTHCHECK against a running PBX",
    );
    let nothing = free_port();
    assert!(
        !healthcheck(nothing).status.success(),
        "HEALTHCHECK passes with nothing listening"
    );
}

/// As the image runs sip-pbx: as its USER, not root, with the file
/// capability its RUN line gives the binary. The packet ring, which needs
/// CAP_NET_RAW, opens.
#[test]
fn as_the_image_runs_it_the_packet_ring_opens_without_root() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let file = dockerfile();
    let capability = file
        .split("setcap ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("setcap in docker/Dockerfile");
    let user = instruction(&file, "USER");
    let (uid, gid) = user
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
        .expect("USER uid:gid");
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = dir.path().join("sip-pbx");
    std::fs::copy(pbx_binary(), &binary).expect("copy sip-pbx");
    let setcap = Command::new("setcap")
        .arg(capability)
        .arg(&binary)
        .output()
        .expect("run setcap (libcap2-bin)");
    ok(&setcap, "setcap");
    for sub in ["cdr", "spool"] {
        std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        std::os::unix::fs::chown(dir.path().join(sub), Some(uid), Some(gid)).expect("chown");
    }
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
    let d = dir.path().display();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "sip:\n  listen_ip: 127.0.0.1\n  listen_port: {}\n  advertised_ip: 127.0.0.1\n\
             media:\n  mode: bypass\n  port_pool: {{start: 38000, end: 38099}}\n  relay_io: packet_ring\n\
             cdr:\n  output_dir: {d}/cdr\nevents:\n  spool_dir: {d}/spool\n\
             logging:\n  level: INFO\n  format: text\n  output: stdout\n\
             monitoring:\n  prometheus_port: {}\n  health_check_port: {}\n",
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .expect("write config");
    let mut pbx = Command::new(&binary)
        .arg("--config")
        .arg(&config)
        .uid(uid)
        .gid(gid)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sip-pbx");
    let stdout = pbx.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let started = std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(20)).ok())
        .find(|line| line.contains("media relay started"));
    let _ = pbx.kill();
    let output = pbx.wait_with_output().expect("sip-pbx output");
    let started = started.unwrap_or_else(|| {
        panic!(
            "no relay started: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(started.contains("packet_ring"), "{started}");
}
