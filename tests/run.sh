#!/usr/bin/env bash
# The whole test suite: set-up, formatting, lints, unit, integration and
# end-to-end tests (real sip-pbx against SIPp and raw SIP over loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
