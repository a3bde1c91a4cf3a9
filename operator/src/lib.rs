//! sip-pbx-operator: reconciles `SipPbx` resources into a running, call-aware
//! scaled SIP PBX.

pub mod crd;
pub mod objects;
pub mod scaling;
pub mod validate;
