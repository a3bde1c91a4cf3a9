//! sip-pbx-operator: reconciles `SipPbx` resources into a running, call-aware
//! scaled SIP PBX.

pub mod apply;
pub mod crd;
pub mod drain;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod reconcile;
pub mod render;
pub mod run;
pub mod scaling;
pub mod stats;
pub mod status;
pub mod validate;
