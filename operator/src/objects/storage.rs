//! The PersistentVolumeClaim the pods write CDRs to.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;

use super::{meta, Names};
use crate::crd::SipPbx;

/// The CDR claim, when CDRs are on. It is owned by the SipPbx (and so deleted
/// with it) only when `cdr.keepOnDelete` is false.
pub fn cdr_claim(pbx: &SipPbx) -> Option<PersistentVolumeClaim> {
    let spec = &pbx.spec;
    if !spec.config.cdr.enabled {
        return None;
    }
    let storage = &spec.cdr.storage;
    Some(PersistentVolumeClaim {
        metadata: meta(
            pbx,
            Names(&pbx.name_any()).cdr_claim(),
            !spec.cdr.keep_on_delete,
        ),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(
                storage
                    .access_modes
                    .iter()
                    .map(|m| m.as_str().to_string())
                    .collect(),
            ),
            storage_class_name: (!storage.storage_class_name.is_empty())
                .then(|| storage.storage_class_name.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.size.clone()),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    })
}
