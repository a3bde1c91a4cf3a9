//! Writing to the API server: server-side apply of the desired objects with
//! one field manager, removal of objects the spec no longer asks for, and the
//! operator-generated admin token Secret.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::ByteString;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::crd::SipPbx;
use crate::objects::{self, Desired, Names, ADMIN_TOKEN_KEY, FIELD_MANAGER, INSTANCE_LABEL};

/// A write to the API server failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{action} {kind} {name}: {source}")]
    Kube {
        action: &'static str,
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("PodDisruptionBudget {name} cannot be converted: {source}")]
    Convert {
        name: String,
        source: serde_json::Error,
    },
    #[error("admin token: {0}")]
    Random(getrandom::Error),
    #[error("Secret {0} has no key {ADMIN_TOKEN_KEY}")]
    NoToken(String),
}

fn kube_err(
    action: &'static str,
    kind: &'static str,
    name: &str,
) -> impl FnOnce(kube::Error) -> ApplyError {
    let name = name.to_string();
    move |source| ApplyError::Kube {
        action,
        kind,
        name,
        source,
    }
}

/// Applies objects in one namespace.
pub struct Applier {
    client: Client,
    namespace: String,
    pdb: ApiResource,
}

/// The PodDisruptionBudget API the server serves: policy/v1 from 1.21,
/// policy/v1beta1 before (same fields for what the operator sets).
pub async fn pdb_resource(client: &Client) -> Result<ApiResource, kube::Error> {
    let group = kube::discovery::group(client, "policy").await?;
    let version = if group.versions().any(|v| v == "v1") {
        "v1"
    } else {
        "v1beta1"
    };
    Ok(ApiResource {
        group: "policy".into(),
        version: version.into(),
        api_version: format!("policy/{version}"),
        kind: "PodDisruptionBudget".into(),
        plural: "poddisruptionbudgets".into(),
    })
}

impl Applier {
    pub fn new(client: Client, namespace: String, pdb: ApiResource) -> Self {
        Applier {
            client,
            namespace,
            pdb,
        }
    }

    fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>>(
        &self,
    ) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Server-side applies every desired object; returns the applied Deployment.
    pub async fn apply(&self, pbx: &SipPbx, desired: &Desired) -> Result<Deployment, ApplyError> {
        apply(&self.api::<ConfigMap>(), &desired.config_map, "ConfigMap").await?;
        let deployment =
            apply(&self.api::<Deployment>(), &desired.deployment, "Deployment").await?;
        for svc in &desired.services {
            apply(&self.api::<Service>(), svc, "Service").await?;
        }
        let claims = self.api::<PersistentVolumeClaim>();
        match &desired.cdr_claim {
            Some(pvc) => {
                apply(&claims, pvc, "PersistentVolumeClaim").await?;
            }
            None if !pbx.spec.cdr.keep_on_delete => {
                let name = Names(&pbx.name_any()).cdr_claim();
                delete_if_present(&claims, &name, "PersistentVolumeClaim").await?;
            }
            None => {}
        }
        self.apply_pdb(&desired.pdb).await?;
        self.delete_stale_services(pbx, desired).await?;
        Ok(deployment)
    }

    async fn apply_pdb(&self, pdb: &PodDisruptionBudget) -> Result<(), ApplyError> {
        let name = pdb.name_any();
        let mut value = serde_json::to_value(pdb).map_err(|source| ApplyError::Convert {
            name: name.clone(),
            source,
        })?;
        value["apiVersion"] = self.pdb.api_version.clone().into();
        let obj: DynamicObject =
            serde_json::from_value(value).map_err(|source| ApplyError::Convert {
                name: name.clone(),
                source,
            })?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &self.pdb);
        api.patch(&name, &apply_params(), &Patch::Apply(&obj))
            .await
            .map_err(kube_err("apply", "PodDisruptionBudget", &name))?;
        Ok(())
    }

    /// Deletes this SipPbx's Services that `desired` no longer has (e.g. the
    /// TCP Service after transport went back to udp).
    async fn delete_stale_services(
        &self,
        pbx: &SipPbx,
        desired: &Desired,
    ) -> Result<(), ApplyError> {
        let api = self.api::<Service>();
        let wanted: BTreeSet<String> = desired.services.iter().map(|s| s.name_any()).collect();
        let selector = format!("{INSTANCE_LABEL}={}", pbx.name_any());
        let existing = api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_err("list", "Service", &selector))?;
        for svc in existing {
            let owned = svc
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == pbx.uid().as_ref());
            if owned && !wanted.contains(&svc.name_any()) {
                delete_if_present(&api, &svc.name_any(), "Service").await?;
            }
        }
        Ok(())
    }

    /// The admin token of `pbx`, creating its Secret with a random token the
    /// first time.
    pub async fn admin_token(&self, pbx: &SipPbx) -> Result<String, ApplyError> {
        let api = self.api::<Secret>();
        let name = Names(&pbx.name_any()).admin_token();
        let secret = match api
            .get_opt(&name)
            .await
            .map_err(kube_err("get", "Secret", &name))?
        {
            Some(secret) => secret,
            None => {
                let secret = Secret {
                    metadata: objects::meta(pbx, name.clone(), true),
                    data: Some(BTreeMap::from([(
                        ADMIN_TOKEN_KEY.to_string(),
                        ByteString(random_token()?.into_bytes()),
                    )])),
                    ..Secret::default()
                };
                api.create(&PostParams::default(), &secret)
                    .await
                    .map_err(kube_err("create", "Secret", &name))?
            }
        };
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(ADMIN_TOKEN_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or(ApplyError::NoToken(name))
    }

    /// Reads the current Deployment of `pbx`, if any.
    pub async fn deployment(&self, pbx: &SipPbx) -> Result<Option<Deployment>, ApplyError> {
        let name = Names(&pbx.name_any()).deployment();
        self.api::<Deployment>()
            .get_opt(&name)
            .await
            .map_err(kube_err("get", "Deployment", &name))
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn apply<K>(api: &Api<K>, obj: &K, kind: &'static str) -> Result<K, ApplyError>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = obj.name_any();
    api.patch(&name, &apply_params(), &Patch::Apply(obj))
        .await
        .map_err(kube_err("apply", kind, &name))
}

async fn delete_if_present<K>(
    api: &Api<K>,
    name: &str,
    kind: &'static str,
) -> Result<(), ApplyError>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(kube_err("delete", kind, name)(source)),
    }
}

fn random_token() -> Result<String, ApplyError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(ApplyError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
