//! The helm binary of tests/helm/setup.sh, shared by the chart tests and the
//! end-to-end tests. Missing helm fails the test, with the command to run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The chart's directory.
pub fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sip-pbx")
}

/// Where helm is: `$SIP_PBX_HELM`, or the cache of tests/helm/setup.sh.
fn helm_bin() -> PathBuf {
    let path = std::env::var_os("SIP_PBX_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/sip-pbx-helm/helm"));
    assert!(
        path.is_file(),
        "helm is missing at {}: run tests/helm/setup.sh (or set SIP_PBX_HELM)",
        path.display()
    );
    path
}

/// Runs helm with its cache, configuration and data in a fresh directory.
pub fn helm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("tempdir");
    Command::new(helm_bin())
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm")
}
