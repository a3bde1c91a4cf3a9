//! The PodDisruptionBudget: evictions take one PBX pod at a time.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{meta, selector_labels, Names};
use crate::crd::SipPbx;

/// The budget of `pbx` (policy/v1; [`crate::apply`] sends it as
/// policy/v1beta1 to servers older than 1.21, with the same fields).
pub fn pdb(pbx: &SipPbx) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(pbx, Names(&pbx.name_any()).pdb(), true),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(pbx)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}
