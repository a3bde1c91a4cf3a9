//! sip-pbx: a SIP back-to-back user agent for Kubernetes.
//!
//! Data flows one way: `sip` (framing, transport, transactions) feeds
//! `b2bua` (calls, legs, routing), which drives `media`; observers (CDR,
//! webhooks, metrics, HTTP) follow calls through the `events` stream.
//! `server` wires the signalling core together.

pub mod auth;
pub mod b2bua;
pub mod cdr;
pub mod config;
pub mod events;
pub mod http;
pub mod limits;
pub mod logging;
pub mod media;
pub mod metrics;
pub mod observers;
pub mod registrar;
pub mod server;
pub mod sip;
pub mod status;
#[cfg(test)]
mod test_support;
pub mod webhook;
