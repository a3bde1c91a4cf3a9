#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine with a
# Rust toolchain; safe to run again. Used by tests/run.sh and .ci/run.
set -euo pipefail
packages=(sip-tester redis-server baresip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# kube-apiserver, kube-controller-manager and etcd for the operator tests
# (built once per machine, cached outside the clone).
"$(dirname "$0")/k8s/setup.sh"
"$(dirname "$0")/helm/setup.sh"
# SIPp 3.7.3 (SHA-256 digest) beside the system's 3.6.1 (MD5 only).
"$(dirname "$0")/sipp/setup-sha256.sh"
