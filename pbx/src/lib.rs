//! sip-pbx: a SIP B2BUA for Kubernetes.
