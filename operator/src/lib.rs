//! The sip-pbx Kubernetes operator (placeholder until the operator issue lands).
