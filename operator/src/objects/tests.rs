//! Table-driven tests of the object builders.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::json;

use super::*;

fn pbx(spec: serde_json::Value) -> SipPbx {
    serde_json::from_value(json!({
        "apiVersion": "sip.pbx.dev/v1alpha1",
        "kind": "SipPbx",
        "metadata": {"name": "office", "namespace": "tel", "uid": "u-1"},
        "spec": spec,
    }))
    .expect("SipPbx")
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn container(d: &Deployment) -> &Container {
    &pod_spec(d).containers[0]
}

fn env_json(d: &Deployment, name: &str) -> Option<serde_json::Value> {
    container(d)
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .map(|e| serde_json::to_value(e).expect("env json"))
}

fn built(spec: serde_json::Value) -> Desired {
    desired(&pbx(spec), 2).expect("objects build")
}

#[test]
fn every_object_is_labelled_and_owned() {
    let d = built(json!({}));
    let metas = [
        &d.config_map.metadata,
        &d.deployment.metadata,
        &d.pdb.metadata,
    ];
    for m in metas
        .into_iter()
        .chain(d.services.iter().map(|s| &s.metadata))
    {
        let owner = &m.owner_references.as_ref().expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("SipPbx", "u-1"));
        assert_eq!(owner.controller, Some(true));
        let labels = m.labels.as_ref().expect("labels");
        assert_eq!(labels[INSTANCE_LABEL], "office");
        assert_eq!(m.namespace.as_deref(), Some("tel"));
    }
}

#[test]
fn cdr_claim_table() {
    // (spec, claim wanted, owned by the SipPbx)
    let cases = [
        (json!({}), true, false),
        (json!({"cdr": {"keepOnDelete": false}}), true, true),
        (json!({"config": {"cdr": {"enabled": false}}}), false, false),
    ];
    for (spec, wanted, owned) in cases {
        let d = built(spec.clone());
        assert_eq!(d.cdr_claim.is_some(), wanted, "{spec}");
        if let Some(pvc) = &d.cdr_claim {
            assert_eq!(pvc.metadata.owner_references.is_some(), owned, "{spec}");
        }
        let mounts_cdr = container(&d.deployment)
            .volume_mounts
            .as_ref()
            .is_some_and(|m| m.iter().any(|m| m.name == "cdr"));
        assert_eq!(mounts_cdr, wanted, "{spec}");
    }
    let d = built(json!({"cdr": {"storage": {"size": "5Gi", "storageClassName": "nfs"}}}));
    let pvc = serde_json::to_value(d.cdr_claim.expect("claim")).expect("json");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(pvc["spec"]["storageClassName"], "nfs");
    assert_eq!(pvc["spec"]["accessModes"], json!(["ReadWriteMany"]));
}

#[test]
fn host_network_mode() {
    let d = built(json!({}));
    let spec = pod_spec(&d.deployment);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let anti = spec
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("anti-affinity");
    assert_eq!(anti[0].topology_key, "kubernetes.io/hostname");
    let ip = env_json(&d.deployment, "SIP_PBX_ADVERTISED_IP").expect("env");
    assert_eq!(ip["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
    let strategy =
        serde_json::to_value(&d.deployment.spec.as_ref().expect("spec").strategy).expect("json");
    assert_eq!(
        strategy["rollingUpdate"],
        json!({"maxSurge": 0, "maxUnavailable": 1})
    );
    let types: Vec<_> = d
        .services
        .iter()
        .map(|s| {
            s.spec
                .as_ref()
                .and_then(|s| s.type_.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(types, ["ClusterIP", "ClusterIP"]);
}

#[test]
fn host_network_keeps_the_users_affinity() {
    let d = built(
        json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
        {"nodeSelectorTerms": [{"matchExpressions": [{"key": "sip", "operator": "Exists"}]}]}}}}),
    );
    let affinity = pod_spec(&d.deployment).affinity.as_ref().expect("affinity");
    assert!(affinity.node_affinity.is_some());
    assert!(affinity.pod_anti_affinity.is_some());
}

#[test]
fn service_mode() {
    let d = built(json!({
        "network": {"mode": "Service", "serviceType": "LoadBalancer", "advertisedAddress": "203.0.113.9"},
        "config": {"sip": {"transport": "both", "listenPort": 5080}},
    }));
    let spec = pod_spec(&d.deployment);
    assert_eq!(spec.host_network, None);
    assert_eq!(spec.dns_policy, None);
    assert_eq!(spec.affinity, None);
    let ip = env_json(&d.deployment, "SIP_PBX_ADVERTISED_IP").expect("env");
    assert_eq!(ip["value"], "203.0.113.9");
    let sip: Vec<_> = d
        .services
        .iter()
        .filter(|s| s.metadata.name.as_deref() != Some("office-metrics"))
        .map(|s| {
            let spec = s.spec.as_ref().expect("spec");
            let port = &spec.ports.as_ref().expect("ports")[0];
            (
                s.metadata.name.clone().unwrap_or_default(),
                spec.type_.clone().unwrap_or_default(),
                spec.session_affinity.clone().unwrap_or_default(),
                port.protocol.clone().unwrap_or_default(),
                port.port,
            )
        })
        .collect();
    let want = [
        ("office-sip-udp", "LoadBalancer", "ClientIP", "UDP", 5080),
        ("office-sip-tcp", "LoadBalancer", "ClientIP", "TCP", 5080),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(n, t, a, p, port)| {
            (
                n.to_string(),
                t.to_string(),
                a.to_string(),
                p.to_string(),
                *port,
            )
        })
        .collect();
    assert_eq!(sip, want);
}

#[test]
fn service_mode_without_address_advertises_nothing_itself() {
    let d = built(json!({"network": {"mode": "Service"}}));
    assert_eq!(env_json(&d.deployment, "SIP_PBX_ADVERTISED_IP"), None);
}

#[test]
fn pod_template_drain_probes_and_scrape() {
    let d = built(json!({
        "image": "registry.example/sip-pbx:1.2",
        "drain": {"timeoutSeconds": 90},
        "webhookSecretRef": {"name": "hooks", "key": "hmac"},
        "usersSecretRef": {"name": "accounts"},
        "podAnnotations": {"team": "voice"},
        "config": {"monitoring": {"prometheusPort": 9100}},
    }));
    let spec = pod_spec(&d.deployment);
    assert_eq!(spec.termination_grace_period_seconds, Some(120));
    let c = container(&d.deployment);
    assert_eq!(c.image.as_deref(), Some("registry.example/sip-pbx:1.2"));
    assert_eq!(
        c.args.as_deref(),
        Some(
            &[
                "--config".to_string(),
                "/etc/sip-pbx/config/config.yaml".to_string()
            ][..]
        )
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/health"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/ready"));
    let pre_stop = serde_json::to_value(&c.lifecycle).expect("json");
    assert_eq!(pre_stop["preStop"]["exec"]["command"][0], "/bin/sh");
    let hook = env_json(&d.deployment, "SIP_PBX_WEBHOOK_SECRET").expect("webhook env");
    assert_eq!(
        hook["valueFrom"]["secretKeyRef"],
        json!({"name": "hooks", "key": "hmac"})
    );
    assert_eq!(
        env_json(&d.deployment, "POD_NAME").expect("pod name")["valueFrom"]["fieldRef"]
            ["fieldPath"],
        "metadata.name"
    );
    let volumes = serde_json::to_value(&spec.volumes).expect("json");
    let users = volumes
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "users"))
        .expect("users volume");
    assert_eq!(users["secret"]["secretName"], "accounts");
    let annotations = d
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .expect("annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9100");
    assert_eq!(annotations["team"], "voice");
    assert!(annotations.contains_key(CONFIG_HASH_ANNOTATION));
}

/// The packet ring needs CAP_NET_RAW; every other relay runs without it.
#[test]
fn the_packet_ring_relay_gets_cap_net_raw() {
    let spec = json!({"config": {"media": {"relayIo": "packet_ring"}}});
    let d = built(spec.clone());
    let context = serde_json::to_value(&container(&d.deployment).security_context).expect("json");
    assert_eq!(context, json!({"capabilities": {"add": ["NET_RAW"]}}));
    let config: serde_json::Value =
        serde_norway::from_str(&render_config(&pbx(spec)).expect("config")).expect("YAML");
    assert_eq!(config["media"]["relay_io"], "packet_ring");
    for other in [
        json!({}),
        json!({"config": {"media": {"relayIo": "epoll"}}}),
    ] {
        let d = built(other);
        assert_eq!(container(&d.deployment).security_context, None);
    }
}

#[test]
fn config_hash_follows_config_and_secret_refs() {
    let hash = |spec: serde_json::Value| config_hash(&built(spec).deployment).cloned();
    let base = hash(json!({}));
    let cases = [
        (json!({}), true),
        (json!({"replicas": 5}), true),
        (json!({"config": {"sip": {"maxConcurrentCalls": 7}}}), false),
        (json!({"usersSecretRef": {"name": "accounts"}}), false),
        (json!({"webhookSecretRef": {"name": "hooks"}}), false),
        (json!({"drain": {"timeoutSeconds": 10}}), false),
    ];
    for (spec, same) in cases {
        assert_eq!(hash(spec.clone()) == base, same, "{spec}");
    }
}

#[test]
fn replicas_and_pdb() {
    let d = desired(&pbx(json!({"replicas": 9})), 4).expect("objects");
    assert_eq!(d.deployment.spec.as_ref().and_then(|s| s.replicas), Some(4));
    let pdb = serde_json::to_value(&d.pdb).expect("json");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"][INSTANCE_LABEL],
        "office"
    );
}
