//! Pure builders: from a `SipPbx` to the Kubernetes objects it should have.
//!
//! Nothing here talks to the API server, so `render` and the unit tests see
//! exactly what `run` applies.

mod config;
mod deployment;
mod pdb;
mod services;
mod storage;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::SipPbx;

pub use config::{render_config, ConfigError};
pub use deployment::{config_hash, deployment, CONFIG_HASH_ANNOTATION};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "sip-pbx-operator";
/// Label every object of a SipPbx carries: its name.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Where the PBX's HTTP API (stats, drain) listens inside a pod.
pub const HTTP_PORT_NAME: &str = "http";
/// Key of the admin token in the operator-generated Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";

/// Names of a SipPbx's objects.
pub struct Names<'a>(pub &'a str);

impl Names<'_> {
    pub fn config_map(&self) -> String {
        format!("{}-config", self.0)
    }
    pub fn admin_token(&self) -> String {
        format!("{}-admin-token", self.0)
    }
    pub fn deployment(&self) -> String {
        self.0.to_string()
    }
    pub fn sip_service(&self, protocol: &str) -> String {
        format!("{}-sip-{}", self.0, protocol.to_lowercase())
    }
    pub fn metrics_service(&self) -> String {
        format!("{}-metrics", self.0)
    }
    pub fn cdr_claim(&self) -> String {
        format!("{}-cdr", self.0)
    }
    pub fn pdb(&self) -> String {
        self.0.to_string()
    }
}

/// Labels selecting the pods of `pbx`.
pub fn selector_labels(pbx: &SipPbx) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "sip-pbx".to_string()),
        (INSTANCE_LABEL.to_string(), pbx.name_any()),
    ])
}

/// `selector_labels` as a label selector string (status.selector).
pub fn selector_string(pbx: &SipPbx) -> String {
    selector_labels(pbx)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels of every object of `pbx`.
pub fn labels(pbx: &SipPbx) -> BTreeMap<String, String> {
    let mut labels = selector_labels(pbx);
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "sip-pbx-operator".into(),
    );
    labels
}

/// Metadata of an object named `name` that `pbx` owns (owner reference only
/// when `owned`, and only once the SipPbx exists on a server).
pub fn meta(pbx: &SipPbx, name: String, owned: bool) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pbx.namespace(),
        labels: Some(labels(pbx)),
        owner_references: if owned {
            pbx.controller_owner_ref(&()).map(|r| vec![r])
        } else {
            None
        },
        ..ObjectMeta::default()
    }
}

/// Everything a SipPbx should have, but the admin token Secret (generated
/// once, on the server).
#[derive(Clone, Debug)]
pub struct Desired {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub services: Vec<Service>,
    pub cdr_claim: Option<PersistentVolumeClaim>,
    pub pdb: PodDisruptionBudget,
}

/// Builds the desired objects of `pbx` with the Deployment at `replicas`.
pub fn desired(pbx: &SipPbx, replicas: i32) -> Result<Desired, ConfigError> {
    let config = render_config(pbx)?;
    let config_map = ConfigMap {
        metadata: meta(pbx, Names(&pbx.name_any()).config_map(), true),
        data: Some(BTreeMap::from([(
            config::CONFIG_FILE.to_string(),
            config.clone(),
        )])),
        ..ConfigMap::default()
    };
    Ok(Desired {
        deployment: deployment(pbx, replicas, &config),
        config_map,
        services: services::services(pbx),
        cdr_claim: storage::cdr_claim(pbx),
        pdb: pdb::pdb(pbx),
    })
}

/// Error turning an object into YAML.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the objects as YAML: {0}")]
pub struct YamlError(#[from] serde_norway::Error);

impl Desired {
    /// All objects as one multi-document YAML stream.
    pub fn to_yaml(&self) -> Result<String, YamlError> {
        let mut docs = vec![
            serde_norway::to_string(&self.config_map)?,
            serde_norway::to_string(&self.deployment)?,
        ];
        for svc in &self.services {
            docs.push(serde_norway::to_string(svc)?);
        }
        if let Some(pvc) = &self.cdr_claim {
            docs.push(serde_norway::to_string(pvc)?);
        }
        docs.push(serde_norway::to_string(&self.pdb)?);
        Ok(docs
            .iter()
            .map(|d| format!("---\n{d}"))
            .collect::<Vec<_>>()
            .join(""))
    }
}

#[cfg(test)]
mod tests;
