//! The command line: `render -f FILE` needs no cluster; `run` says what is missing.

use std::process::Command;

fn render(path: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sip-pbx-operator"))
        .args(["render", "-f", path])
        .output()
        .expect("run sip-pbx-operator render")
}

#[test]
fn renders_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/sippbx-example.yaml");
    let out = render(example);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("utf-8");
    let kinds: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Deployment",
            "Service",
            "Service",
            "Service",
            "PersistentVolumeClaim",
            "PodDisruptionBudget"
        ]
    );
    assert!(yaml.contains("name: office-sip-tcp"));
    assert!(yaml.contains("users_file: /etc/sip-pbx/users/users.yaml"));
}

#[test]
fn renders_every_sample() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/samples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("config/samples")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let out = render(file.to_str().expect("utf-8 path"));
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let yaml = String::from_utf8_lossy(&out.stdout);
        assert!(yaml.contains("kind: Deployment"), "{}", file.display());
    }
}

#[test]
fn refuses_an_invalid_spec_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: sip.pbx.dev/v1alpha1\nkind: SipPbx\nmetadata: {name: x}\nspec:\n  config: {media: {portPool: {start: 20000, end: 10000}}}\n",
    )
    .expect("write");
    let out = render(path.to_str().expect("utf-8 path"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.config.media.portPool: start 20000 is not below end 10000"),
        "{err}"
    );
}

#[test]
fn names_a_missing_file() {
    let out = render("/nonexistent/sippbx.yaml");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sippbx.yaml"));
}

#[test]
fn run_without_a_cluster_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_sip-pbx-operator"))
        .args(["run", "--metrics-addr", "127.0.0.1:0"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .output()
        .expect("run sip-pbx-operator run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes configuration"), "{err}");
}
