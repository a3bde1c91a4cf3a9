//! The Helm chart `charts/sip-pbx`: its CRD is `crds/sippbx.yaml`, it lints,
//! it renders with default and with every value set, each rendered object is
//! a valid object of its Kubernetes type, and its values schema rejects typos.
//! Needs helm, installed by tests/helm/setup.sh (`SIP_PBX_HELM` overrides
//! where it is looked for).

mod helm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use helm::{chart, helm};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const NAMESPACE: &str = "voice";

fn full_values() -> PathBuf {
    chart().join("ci/full-values.yaml")
}

fn chart_path() -> String {
    chart().to_str().expect("utf-8 path").to_string()
}

/// `helm template` of the chart with `extra` arguments; panics with helm's
/// message when it fails.
fn template(extra: &[&str]) -> Vec<Value> {
    let chart = chart_path();
    let mut args = vec!["template", "release", &chart, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8(out.stdout).expect("utf-8"))
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().expect("kind")
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    docs.iter().map(kind).collect()
}

/// `doc` as a `T`; serializing it back must give `doc` again, so a field
/// that `T` does not know (a typo in a template) fails the test.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let object: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
        panic!(
            "{} is not a valid {}: {e}",
            doc["metadata"]["name"],
            kind(doc)
        )
    });
    let back = serde_json::to_value(&object).expect("serialize");
    assert_eq!(
        &back,
        doc,
        "{} has fields its type does not know",
        kind(doc)
    );
    object
}

/// Every object of `docs` parsed into its type; kinds outside the chart's fail.
fn check_types(docs: &[Value]) {
    for doc in docs {
        match kind(doc) {
            "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc)),
            "Role" => drop(typed::<Role>(doc)),
            "RoleBinding" => drop(typed::<RoleBinding>(doc)),
            "Service" => drop(typed::<Service>(doc)),
            "Deployment" => drop(typed::<Deployment>(doc)),
            "ServiceMonitor" => check_service_monitor(doc),
            "SipPbx" => check_sippbx(doc),
            other => panic!("the chart renders an unexpected kind {other}"),
        }
    }
}

/// The keys of a JSON object, sorted.
fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// ServiceMonitor has no Rust type here: only the fields the chart uses.
fn check_service_monitor(doc: &Value) {
    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(keys(&doc["spec"]), ["endpoints", "selector"]);
    assert_eq!(keys(&doc["spec"]["selector"]), ["matchLabels"]);
    for endpoint in doc["spec"]["endpoints"].as_array().expect("endpoints") {
        assert_eq!(keys(endpoint), ["interval", "path", "port"]);
    }
}

/// The SipPbx must be one the operator renders without a warning.
fn check_sippbx(doc: &Value) {
    let yaml = serde_norway::to_string(doc).expect("YAML");
    let (_, warnings) = sip_pbx_operator::render::render(&yaml)
        .unwrap_or_else(|e| panic!("the chart's SipPbx: {e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
}

fn find<'a>(docs: &'a [Value], kind_: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == kind_).collect()
}

fn one<T: DeserializeOwned + Serialize>(docs: &[Value], kind_: &str) -> T {
    let found = find(docs, kind_);
    assert_eq!(found.len(), 1, "one {kind_}");
    typed(found[0])
}

fn deploy_rbac() -> Vec<Value> {
    let path = Path::new(ROOT).join("operator/deploy/rbac.yaml");
    documents(&std::fs::read_to_string(path).expect("operator/deploy/rbac.yaml"))
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn chart_crd_is_crds_sippbx() {
    let read = |p: &str| std::fs::read_to_string(Path::new(ROOT).join(p)).expect(p);
    assert!(
        read("charts/sip-pbx/crds/sippbx.yaml") == read("crds/sippbx.yaml"),
        "charts/sip-pbx/crds/sippbx.yaml differs: cp crds/sippbx.yaml charts/sip-pbx/crds/"
    );
}

#[test]
fn lints_with_default_and_full_values() {
    let chart = chart_path();
    let full = full_values();
    for args in [
        vec!["lint", "--strict", &chart],
        vec![
            "lint",
            "--strict",
            &chart,
            "-f",
            full.to_str().expect("utf-8"),
        ],
    ] {
        let out = helm(&args);
        assert!(
            out.status.success(),
            "helm {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn default_values_render_the_operator_with_least_privilege() {
    let docs = template(&[]);
    check_types(&docs);
    assert_eq!(
        kinds(&docs),
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment"
        ]
    );
    for doc in &docs {
        if !kind(doc).starts_with("Cluster") {
            assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{doc}");
        }
    }

    // The same permissions as operator/deploy/rbac.yaml, which the
    // end-to-end tests run the operator with.
    let reference = deploy_rbac();
    let cluster_role: ClusterRole = one(&docs, "ClusterRole");
    let reference_role: ClusterRole = one(&reference, "ClusterRole");
    assert_eq!(cluster_role.rules, reference_role.rules);
    let role: Role = one(&docs, "Role");
    let reference_leader: Role = one(&reference, "Role");
    assert_eq!(role.rules, reference_leader.rules);

    let account: ServiceAccount = one(&docs, "ServiceAccount");
    let account_name = account.metadata.name.expect("name");
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
    assert_eq!(
        binding.role_ref.name,
        cluster_role.metadata.name.expect("name")
    );
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(subject.name, account_name);
    assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
    let role_binding: RoleBinding = one(&docs, "RoleBinding");
    assert_eq!(
        role_binding.role_ref.name,
        role.metadata.name.expect("name")
    );

    let deployment: Deployment = one(&docs, "Deployment");
    let spec = deployment.spec.expect("spec");
    let pod_labels = spec
        .template
        .metadata
        .expect("metadata")
        .labels
        .expect("labels");
    let selector = spec.selector.match_labels.expect("matchLabels");
    assert!(labels_match(&selector, &pod_labels));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(account_name.as_str())
    );
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("sip-pbx:0.1.0"));
    let command = container.command.clone().expect("command");
    assert_eq!(command[..2], ["sip-pbx-operator", "run"]);
    assert!(command.contains(&"--metrics-addr=0.0.0.0:8080".to_string()));
    assert!(!command.iter().any(|a| a.starts_with("--namespace")));

    let service: Service = one(&docs, "Service");
    let service_spec = service.spec.expect("spec");
    assert!(labels_match(
        &service_spec.selector.expect("selector"),
        &pod_labels
    ));
    let port = &service_spec.ports.expect("ports")[0];
    assert_eq!(port.port, 8080);
    let ports = container.ports.clone().expect("container ports");
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    assert_eq!(ports[0].container_port, 8080);
}

#[test]
fn full_values_render_every_option() {
    let full = full_values();
    let docs = template(&[
        "-f",
        full.to_str().expect("utf-8"),
        "--api-versions",
        "monitoring.coreos.com/v1",
    ]);
    check_types(&docs);
    assert_eq!(
        kinds(&docs),
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "ServiceMonitor",
            "ServiceMonitor",
            "SipPbx"
        ]
    );
    let account: ServiceAccount = one(&docs, "ServiceAccount");
    assert_eq!(account.metadata.name.as_deref(), Some("sip-operator"));
    let deployment: Deployment = one(&docs, "Deployment");
    assert_eq!(
        deployment.metadata.name.as_deref(),
        Some("telephony-operator")
    );
    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(3));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(
        pod.image_pull_secrets.expect("pull secrets")[0].name,
        "regcred"
    );
    assert_eq!(pod.tolerations.expect("tolerations").len(), 1);
    assert!(pod.affinity.is_some());
    assert_eq!(
        pod.node_selector.expect("nodeSelector")["kubernetes.io/os"],
        "linux"
    );
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example.com/sip-pbx:0.1.0-test")
    );
    let command = container.command.clone().expect("command");
    for arg in [
        "--namespace=voice",
        "--metrics-addr=0.0.0.0:8081",
        "--lease-name=telephony",
        "--lease-seconds=20",
        "--stats-interval-seconds=5",
    ] {
        assert!(command.contains(&arg.to_string()), "{arg} in {command:?}");
    }

    let monitors = find(&docs, "ServiceMonitor");
    assert_eq!(monitors[0]["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitors[0]["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(
        monitors[1]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "office"
    );

    let pbx = find(&docs, "SipPbx")[0];
    assert_eq!(pbx["metadata"]["name"], "office");
    assert_eq!(
        pbx["spec"]["image"],
        "registry.example.com/sip-pbx:0.1.0-test"
    );
    assert_eq!(pbx["spec"]["autoscaling"]["maxReplicas"], 6);
}

#[test]
fn the_pbx_spec_image_wins_over_the_chart_image() {
    let docs = template(&[
        "--set",
        "pbx.enabled=true",
        "--set",
        "pbx.spec.image=other/pbx:1",
    ]);
    check_types(&docs);
    assert_eq!(find(&docs, "SipPbx")[0]["spec"]["image"], "other/pbx:1");
}

#[test]
fn no_service_monitor_without_the_prometheus_operator_api() {
    let full = full_values();
    let docs = template(&["-f", full.to_str().expect("utf-8")]);
    assert!(find(&docs, "ServiceMonitor").is_empty());
}

#[test]
fn rbac_service_account_and_service_can_be_left_out() {
    let docs = template(&[
        "--set",
        "rbac.create=false,serviceAccount.create=false,serviceAccount.name=existing,metrics.service.enabled=false",
    ]);
    check_types(&docs);
    assert_eq!(kinds(&docs), ["Deployment"]);
    let deployment: Deployment = typed(&docs[0]);
    let pod = deployment.spec.expect("spec").template.spec.expect("pod");
    assert_eq!(pod.service_account_name.as_deref(), Some("existing"));
}

#[test]
fn a_typo_in_values_is_rejected() {
    let chart = chart_path();
    for (set, named) in [
        ("operater.replicas=3", "operater"),
        ("operator.replica=3", "replica"),
        ("metrics.serviceMonitor.enable=true", "enable"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.replicas=two", "replicas"),
    ] {
        let out = helm(&["template", "release", &chart, "--set", set]);
        assert!(!out.status.success(), "--set {set} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("schema") && err.contains(named),
            "--set {set}: {err}"
        );
    }
}
