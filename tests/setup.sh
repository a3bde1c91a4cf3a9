#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine with a
# Rust toolchain; safe to run again. Used by tests/run.sh and .ci/run.
set -euo pipefail
. "$(dirname "$0")/apt.sh"
# libcap2-bin: setcap, to run sip-pbx as the image does (tests/tests/packaging.rs).
apt_install_missing sip-tester redis-server baresip libcap2-bin
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# kube-apiserver, kube-controller-manager and etcd for the operator tests
# (built once per machine, cached outside the clone).
"$(dirname "$0")/k8s/setup.sh"
"$(dirname "$0")/helm/setup.sh"
# SIPp 3.7.3 (SHA-256 digest) beside the system's 3.6.1 (MD5 only).
"$(dirname "$0")/sipp/setup-sha256.sh"
