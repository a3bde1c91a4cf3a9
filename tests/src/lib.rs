//! End-to-end test harness: runs the real binaries against real peers.
