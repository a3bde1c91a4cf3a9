//! The `SipPbx` custom resource: spec, status and the schema `crdgen` publishes.
//!
//! Doc comments on the fields become the schema's descriptions, which is what
//! `kubectl explain sippbx.spec` shows. What a schema cannot express (min <=
//! max, port ranges, network-mode rules) is checked in [`crate::validate`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A SIP PBX: the operator runs it as a Deployment with its configuration,
/// Services, a CDR volume and a disruption budget, and scales it on active calls
/// without cutting live calls.
// The derive's repeated printcolumn(type_ = ..) trips this lint.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sip.pbx.dev",
    version = "v1alpha1",
    kind = "SipPbx",
    plural = "sippbxes",
    shortname = "pbx",
    namespaced,
    status = "SipPbxStatus",
    derive = "PartialEq",
    doc = "A SIP PBX run by sip-pbx-operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Active Calls",
        type_ = "integer",
        json_path = ".status.activeCalls"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SipPbxSpec {
    /// Container image of the PBX.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy of the PBX container (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Number of PBX pods. Ignored while autoscaling is enabled; written by
    /// `kubectl scale`, HPA or KEDA through the scale subresource.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// The operator's own scaling policy on the pods' active calls.
    #[serde(default)]
    pub autoscaling: Autoscaling,
    /// How SIP and media reach the pods.
    #[serde(default)]
    pub network: Network,
    /// The PBX configuration (camelCase form of the PBX's config.yaml). SIP
    /// accounts and the webhook secret are not here: see usersSecretRef and
    /// webhookSecretRef.
    #[serde(default)]
    pub config: PbxConfig,
    /// Secret holding the SIP accounts: a YAML list of
    /// {username, password | ha1 | ha1_sha256}, mounted as a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_secret_ref: Option<SecretKeyRef>,
    /// Secret holding the webhook HMAC secret, passed as SIP_PBX_WEBHOOK_SECRET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_ref: Option<SecretKeyRef>,
    /// Call detail records: retention and the volume they are written to.
    #[serde(default)]
    pub cdr: CdrSpec,
    /// How long a pod may take to let its calls end before it hangs them up.
    #[serde(default)]
    pub drain: DrainSpec,
    /// CPU and memory requests and limits of the PBX container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the PBX pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the PBX pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Scheduling constraints of the PBX pods; in HostNetwork mode the
    /// operator adds a pod anti-affinity (one pod per node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra annotations on the PBX pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,
}

/// Image pull policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

fn default_image() -> String {
    "sip-pbx:latest".into()
}
fn default_replicas() -> i32 {
    1
}

/// The operator's autoscaling policy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// Scale on the pods' active calls; spec.replicas is then ignored.
    #[serde(default)]
    pub enabled: bool,
    /// Fewest pods (must not exceed maxReplicas).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    /// Most pods.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Active calls one pod should carry: desired pods =
    /// ceil(total active calls / this), clamped to min and max.
    #[serde(default = "default_target_calls")]
    #[schemars(range(min = 1))]
    pub target_active_calls_per_pod: i32,
    /// A scale-in uses the highest recommendation of this many past seconds.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0))]
    pub scale_down_stabilization_seconds: i64,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    10
}
fn default_target_calls() -> i32 {
    50
}
fn default_stabilization() -> i64 {
    300
}

impl Default for Autoscaling {
    fn default() -> Self {
        Autoscaling {
            enabled: false,
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_active_calls_per_pod: default_target_calls(),
            scale_down_stabilization_seconds: default_stabilization(),
        }
    }
}

/// How SIP and media reach the pods.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// HostNetwork: pods use their node's network, one per node (the only
    /// mode in which the media relay's port pool is reachable). Service: SIP
    /// goes through Services of serviceType.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Type of the SIP Services in Service mode.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Address the PBX writes in SIP and SDP; "" derives it (the node's
    /// address in HostNetwork mode).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub advertised_address: String,
}

/// Network mode of the PBX pods.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum NetworkMode {
    #[default]
    HostNetwork,
    Service,
}

/// Kubernetes Service type for SIP in Service mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    LoadBalancer,
    NodePort,
    ClusterIP,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::NodePort => "NodePort",
            ServiceType::ClusterIP => "ClusterIP",
        }
    }
}

/// Reference to one key of a Secret in the SipPbx's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key inside the Secret (users: "users.yaml", webhook: "secret" when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// CDR retention and storage.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CdrSpec {
    /// Days CDR files are kept.
    #[serde(default = "default_retention")]
    #[schemars(range(min = 1))]
    pub retention_days: i32,
    /// The PersistentVolumeClaim CDRs are written to, shared by all pods.
    #[serde(default)]
    pub storage: CdrStorage,
    /// Keep the CDR volume when the SipPbx is deleted.
    #[serde(default = "default_true")]
    pub keep_on_delete: bool,
}

fn default_retention() -> i32 {
    90
}
fn default_true() -> bool {
    true
}

impl Default for CdrSpec {
    fn default() -> Self {
        CdrSpec {
            retention_days: default_retention(),
            storage: CdrStorage::default(),
            keep_on_delete: true,
        }
    }
}

/// The CDR PersistentVolumeClaim.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CdrStorage {
    /// Requested size, e.g. 1Gi.
    #[serde(default = "default_size")]
    #[schemars(length(min = 1))]
    pub size: String,
    /// Storage class; "" uses the cluster's default class.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub storage_class_name: String,
    /// Access modes; ReadWriteMany lets every pod write its own CDR files.
    #[serde(default = "default_access_modes")]
    #[schemars(length(min = 1))]
    pub access_modes: Vec<AccessMode>,
}

/// PersistentVolumeClaim access mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadOnlyMany,
    ReadWriteMany,
    ReadWriteOncePod,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadOnlyMany => "ReadOnlyMany",
            AccessMode::ReadWriteMany => "ReadWriteMany",
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
        }
    }
}

fn default_size() -> String {
    "1Gi".into()
}
fn default_access_modes() -> Vec<AccessMode> {
    vec![AccessMode::ReadWriteMany]
}

impl Default for CdrStorage {
    fn default() -> Self {
        CdrStorage {
            size: default_size(),
            storage_class_name: String::new(),
            access_modes: default_access_modes(),
        }
    }
}

/// Drain settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Seconds a draining pod waits for its calls to end before it sends BYE;
    /// also how long a scale-in waits. The pods' grace period is this plus a margin.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 0))]
    pub timeout_seconds: i64,
}

fn default_drain_timeout() -> i64 {
    3600
}

impl Default for DrainSpec {
    fn default() -> Self {
        DrainSpec {
            timeout_seconds: default_drain_timeout(),
        }
    }
}

/// The PBX configuration, in camelCase; rendered to the PBX's snake_case
/// config.yaml in a ConfigMap. Unset keys take the PBX's defaults.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PbxConfig {
    /// SIP listener.
    #[serde(default)]
    pub sip: SipConfig,
    /// Digest authentication (accounts come from usersSecretRef).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Registrar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registrar: Option<RegistrarConfig>,
    /// Routes for called users that are not registered, tried in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<Route>>,
    /// Media handling.
    #[serde(default)]
    pub media: MediaConfig,
    /// Webhook events (the HMAC secret comes from webhookSecretRef).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsConfig>,
    /// CDR format (directory and retention are set by the operator).
    #[serde(default)]
    pub cdr: CdrConfig,
    /// Logging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<LoggingConfig>,
    /// HTTP ports.
    #[serde(default)]
    pub monitoring: MonitoringConfig,
}

/// SIP listener settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SipConfig {
    /// Address to listen on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_ip: Option<String>,
    /// SIP port, UDP and TCP (1024..65535).
    #[serde(default = "default_sip_port")]
    pub listen_port: i32,
    /// udp, tcp or both.
    #[serde(default)]
    pub transport: Transport,
    /// Calls over this are answered 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_calls: Option<i32>,
    /// The PBX's own domain and digest realm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

fn default_sip_port() -> i32 {
    5060
}

impl Default for SipConfig {
    fn default() -> Self {
        SipConfig {
            listen_ip: None,
            listen_port: default_sip_port(),
            transport: Transport::default(),
            max_concurrent_calls: None,
            domain: None,
        }
    }
}

/// SIP transport.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Udp,
    Tcp,
    Both,
}

impl Transport {
    pub fn udp(self) -> bool {
        matches!(self, Transport::Udp | Transport::Both)
    }
    pub fn tcp(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Both)
    }
}

/// Digest authentication.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthConfig {
    /// Challenge requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Digest algorithms offered, e.g. SHA-256, MD5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithms: Option<Vec<String>>,
    /// Sources allowed without a challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_cidrs: Option<Vec<String>>,
    /// Failures per source address before it is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<i32>,
    /// Seconds a blocked source stays blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_seconds: Option<i64>,
}

/// Registrar settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrarConfig {
    /// Shortest registration accepted, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_expires: Option<i64>,
    /// Longest registration granted, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_expires: Option<i64>,
    /// memory or redis (redis makes pods interchangeable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Redis URL when store is redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
}

/// A route for a called user that is not registered.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Route {
    /// Regular expression on the Request-URI user part.
    #[serde(rename = "match")]
    pub match_: String,
    /// Target SIP URI; $1.. are the expression's groups.
    pub target: String,
}

/// Media handling.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaConfig {
    /// bypass: RTP relayed through portPool; direct: media flows end to end.
    #[serde(default)]
    pub mode: MediaMode,
    /// UDP ports of the relay (1024..65535, start below end).
    #[serde(default)]
    pub port_pool: PortPool,
    /// Seconds without RTP before a call is hung up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtp_timeout: Option<i64>,
    /// Codecs offered, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codecs: Option<Vec<String>>,
    /// How the relay threads wait for packets, spelled as in the PBX's
    /// config: packet_ring (the least CPU per packet) gives the pod
    /// CAP_NET_RAW.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_io: Option<RelayIo>,
}

/// The relay's way of waiting for packets (the PBX's `media.relay_io`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RelayIo {
    Auto,
    IoUring,
    Epoll,
    PacketRing,
}

/// Media mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MediaMode {
    #[default]
    Bypass,
    Direct,
}

/// The relay's UDP port range.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct PortPool {
    /// First port.
    #[serde(default = "default_pool_start")]
    pub start: i32,
    /// Last port.
    #[serde(default = "default_pool_end")]
    pub end: i32,
}

fn default_pool_start() -> i32 {
    10000
}
fn default_pool_end() -> i32 {
    20000
}

impl Default for PortPool {
    fn default() -> Self {
        PortPool {
            start: default_pool_start(),
            end: default_pool_end(),
        }
    }
}

/// Webhook events.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventsConfig {
    /// Endpoints every event is POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_urls: Option<Vec<String>>,
    /// Seconds per delivery attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_timeout: Option<i64>,
    /// Attempts after the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_retries: Option<i32>,
}

/// CDR format.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CdrConfig {
    /// Write CDRs (and keep a volume for them).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// File name pattern (strftime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename_pattern: Option<String>,
    /// Rotation, e.g. daily.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
}

impl Default for CdrConfig {
    fn default() -> Self {
        CdrConfig {
            enabled: true,
            filename_pattern: None,
            rotation: None,
        }
    }
}

/// Logging.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoggingConfig {
    /// Level, e.g. INFO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// json or text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Directory for SIP traffic logs; "" = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_traffic_log: Option<String>,
}

/// HTTP ports of the PBX.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringConfig {
    /// Prometheus /metrics port.
    #[serde(default = "default_prometheus_port")]
    pub prometheus_port: i32,
    /// /health, /ready and /api port.
    #[serde(default = "default_health_port")]
    pub health_check_port: i32,
}

fn default_prometheus_port() -> i32 {
    9090
}
fn default_health_port() -> i32 {
    8080
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            prometheus_port: default_prometheus_port(),
            health_check_port: default_health_port(),
        }
    }
}

/// Observed state of a SipPbx.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SipPbxStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods the operator wants (spec.replicas, or the autoscaling decision).
    #[serde(default)]
    pub desired_replicas: i32,
    /// Active calls over all ready pods, as they report them.
    #[serde(default)]
    pub active_calls: i64,
    /// Label selector of the pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// When the Deployment's replicas last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Ready, Progressing, Degraded and Draining.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The CRD could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("CRD conversion: {0}")]
    Json(#[from] serde_json::Error),
    #[error("CRD YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
}

/// The CustomResourceDefinition of SipPbx, made acceptable to Kubernetes 1.20:
/// its API server rejects a `default: ""` (it reads it as null) and does not
/// treat a schema whose `enum` lists null as equal to itself.
pub fn crd() -> Result<CustomResourceDefinition, CrdError> {
    use kube::CustomResourceExt;
    let mut value = serde_json::to_value(SipPbx::crd())?;
    portable_schema(&mut value);
    Ok(serde_json::from_value(value)?)
}

fn portable_schema(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            if map.get("default") == Some(&Value::String(String::new())) {
                map.remove("default");
            }
            if let Some(default) = map.get_mut("default") {
                drop_empty_strings(default);
            }
            if let Some(Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(portable_schema);
        }
        Value::Array(items) => items.iter_mut().for_each(portable_schema),
        _ => {}
    }
}

fn drop_empty_strings(value: &mut serde_json::Value) {
    if let serde_json::Value::Object(map) = value {
        map.retain(|_, v| v.as_str() != Some(""));
        map.values_mut().for_each(drop_empty_strings);
    }
}

/// The CustomResourceDefinition of SipPbx as YAML, as committed in
/// crds/sippbx.yaml.
pub fn crd_yaml() -> Result<String, CrdError> {
    let body = serde_norway::to_string(&crd()?)?;
    Ok(format!(
        "# Generated by `cargo run -p sip-pbx-operator --bin crdgen crds/sippbx.yaml`; do not edit.\n{body}"
    ))
}
