//! The PBX Deployment: pod spec, probes, drain hook, network mode and the
//! config hash that rolls the pods when the configuration changes.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, ExecAction, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodAffinityTerm, PodSpec,
    PodTemplateSpec, Probe, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::config::{
    ADMIN_DIR, CDR_DIR, CONFIG_DIR, CONFIG_FILE, SPOOL_DIR, USERS_DIR, USERS_FILE,
};
use super::{meta, selector_labels, Names, HTTP_PORT_NAME};
use crate::crd::{NetworkMode, RelayIo, SipPbx};

/// Pod annotation holding the hash of everything mounted into the pod.
pub const CONFIG_HASH_ANNOTATION: &str = "sip.pbx.dev/config-hash";
/// Seconds the grace period adds to drain.timeoutSeconds.
pub const GRACE_MARGIN_SECONDS: i64 = 30;
/// Drain hook: SIGTERM starts the PBX's drain; wait until it has exited so
/// the kubelet's own SIGTERM and endpoint removal find no calls left.
const PRESTOP_DRAIN: &str = "kill -TERM 1; while kill -0 1 2>/dev/null; do sleep 1; done";

/// The Deployment of `pbx` at `replicas`, for the rendered `config`.
pub fn deployment(pbx: &SipPbx, replicas: i32, config: &str) -> Deployment {
    let spec = &pbx.spec;
    let names = Names(&pbx.name_any());
    let host_network = spec.network.mode == NetworkMode::HostNetwork;
    let cfg = &spec.config;

    let mut annotations = spec.pod_annotations.clone().unwrap_or_default();
    annotations.insert(CONFIG_HASH_ANNOTATION.into(), hash_config(pbx, config));
    annotations.insert("prometheus.io/scrape".into(), "true".into());
    annotations.insert(
        "prometheus.io/port".into(),
        cfg.monitoring.prometheus_port.to_string(),
    );
    annotations.insert("prometheus.io/path".into(), "/metrics".into());

    let mut ports = Vec::new();
    if cfg.sip.transport.udp() {
        ports.push(port("sip-udp", cfg.sip.listen_port, "UDP"));
    }
    if cfg.sip.transport.tcp() {
        ports.push(port("sip-tcp", cfg.sip.listen_port, "TCP"));
    }
    ports.push(port(
        HTTP_PORT_NAME,
        cfg.monitoring.health_check_port,
        "TCP",
    ));
    ports.push(port("metrics", cfg.monitoring.prometheus_port, "TCP"));

    let mut env = vec![EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(field_ref("metadata.name")),
        ..EnvVar::default()
    }];
    if !spec.network.advertised_address.is_empty() {
        env.push(EnvVar {
            name: "SIP_PBX_ADVERTISED_IP".into(),
            value: Some(spec.network.advertised_address.clone()),
            ..EnvVar::default()
        });
    } else if host_network {
        env.push(EnvVar {
            name: "SIP_PBX_ADVERTISED_IP".into(),
            value_from: Some(field_ref("status.hostIP")),
            ..EnvVar::default()
        });
    }
    if let Some(webhook) = &spec.webhook_secret_ref {
        env.push(EnvVar {
            name: "SIP_PBX_WEBHOOK_SECRET".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: webhook.name.clone(),
                    key: webhook.key.clone().unwrap_or_else(|| "secret".into()),
                    optional: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        secret_volume("admin-token", names.admin_token(), None),
        Volume {
            name: "spool".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR),
        mount("admin-token", ADMIN_DIR),
        mount("spool", SPOOL_DIR),
    ];
    if let Some(users) = &spec.users_secret_ref {
        let key = users.key.clone().unwrap_or_else(|| USERS_FILE.into());
        volumes.push(secret_volume("users", users.name.clone(), Some(key)));
        mounts.push(mount("users", USERS_DIR));
    }
    if cfg.cdr.enabled {
        volumes.push(Volume {
            name: "cdr".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names.cdr_claim(),
                read_only: None,
            }),
            ..Volume::default()
        });
        mounts.push(mount("cdr", CDR_DIR));
    }

    let container = Container {
        name: "pbx".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ]),
        ports: Some(ports),
        env: Some(env),
        volume_mounts: Some(mounts),
        resources: spec.resources.clone(),
        security_context: (cfg.media.relay_io == Some(RelayIo::PacketRing)).then(|| {
            SecurityContext {
                capabilities: Some(Capabilities {
                    add: Some(vec!["NET_RAW".into()]),
                    drop: None,
                }),
                ..SecurityContext::default()
            }
        }),
        liveness_probe: Some(http_probe("/health", 3)),
        readiness_probe: Some(http_probe("/ready", 1)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["/bin/sh".into(), "-c".into(), PRESTOP_DRAIN.into()]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ..Container::default()
    };

    let selector = selector_labels(pbx);
    let mut pod_labels = selector.clone();
    pod_labels.insert("app.kubernetes.io/component".into(), "pbx".into());

    Deployment {
        metadata: meta(pbx, names.deployment(), true),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            strategy: Some(strategy(host_network)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    host_network: host_network.then_some(true),
                    dns_policy: host_network.then(|| "ClusterFirstWithHostNet".to_string()),
                    affinity: affinity(spec.affinity.clone(), host_network, selector),
                    node_selector: spec.node_selector.clone(),
                    tolerations: spec.tolerations.clone(),
                    termination_grace_period_seconds: Some(
                        spec.drain.timeout_seconds + GRACE_MARGIN_SECONDS,
                    ),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The config hash a Deployment's pod template carries.
pub fn config_hash(d: &Deployment) -> Option<&String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CONFIG_HASH_ANNOTATION)
}

/// Hash of the rendered config and the Secrets mounted beside it.
fn hash_config(pbx: &SipPbx, config: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(config.as_bytes());
    for secret in [&pbx.spec.users_secret_ref, &pbx.spec.webhook_secret_ref] {
        hasher.update(b"\0");
        if let Some(s) = secret {
            hasher.update(s.name.as_bytes());
            hasher.update(b"/");
            hasher.update(s.key.as_deref().unwrap_or("").as_bytes());
        }
    }
    let digest = hasher.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// HostNetwork pods take their node's ports: a new pod cannot start beside
/// the old one, so roll one pod down first; Service mode surges instead.
fn strategy(host_network: bool) -> DeploymentStrategy {
    let (surge, unavailable) = if host_network { (0, 1) } else { (1, 0) };
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(surge)),
            max_unavailable: Some(IntOrString::Int(unavailable)),
        }),
    }
}

/// The user's affinity, plus one pod per node in HostNetwork mode.
fn affinity(
    user: Option<Affinity>,
    host_network: bool,
    selector: BTreeMap<String, String>,
) -> Option<Affinity> {
    if !host_network {
        return user;
    }
    let mut affinity = user.unwrap_or_default();
    let mut anti = affinity.pod_anti_affinity.take().unwrap_or_default();
    let mut required = anti
        .required_during_scheduling_ignored_during_execution
        .take()
        .unwrap_or_default();
    required.push(PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector),
            ..LabelSelector::default()
        }),
        topology_key: "kubernetes.io/hostname".into(),
        ..PodAffinityTerm::default()
    });
    anti.required_during_scheduling_ignored_during_execution = Some(required);
    affinity.pod_anti_affinity = Some(anti);
    Some(affinity)
}

fn port(name: &str, number: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some(protocol.into()),
        ..ContainerPort::default()
    }
}

fn field_ref(path: &str) -> EnvVarSource {
    EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            api_version: None,
        }),
        ..EnvVarSource::default()
    }
}

fn secret_volume(name: &str, secret: String, key: Option<String>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            items: key.map(|key| {
                vec![KeyToPath {
                    key,
                    path: USERS_FILE.into(),
                    mode: None,
                }]
            }),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(name != "cdr" && name != "spool"),
        ..VolumeMount::default()
    }
}

fn http_probe(path: &str, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}
