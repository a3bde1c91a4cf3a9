//! SIP below the application: messages and their grammar, transports, and
//! the transaction layer (RFC 3261 §7, §17-§20).

pub mod message;
pub mod multipart;
pub mod parse;
pub mod timer;
pub mod transaction;
pub mod transport;
pub mod uri;
