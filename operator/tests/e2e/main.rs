//! End-to-end tests of sip-pbx-operator against a real Kubernetes 1.20 API
//! server and controller manager (built by tests/k8s/setup.sh). Each test has
//! its own namespace and its own operator process, which runs with the
//! ServiceAccount token of deploy/rbac.yaml, not as admin.

mod cluster;
mod fakepod;
#[path = "../helm/mod.rs"]
mod helm;
mod helm_install;

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::events::v1::Event;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use sip_pbx_e2e::free_port;
use sip_pbx_operator::crd::SipPbx;
use sip_pbx_operator::objects::config_hash;

use cluster::{cluster, eventually, OPERATOR_NAMESPACE};
use fakepod::FakePbx;

const WAIT: Duration = Duration::from_secs(60);

/// An operator process; killed when dropped, and then its log must show no
/// request the ServiceAccount was not allowed to make.
struct Operator {
    child: Child,
    log: PathBuf,
    metrics_port: u16,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let log = self.log();
            assert!(
                !log.contains("code: 403"),
                "the operator's ServiceAccount lacks a permission:\n{log}"
            );
        }
    }
}

impl Operator {
    async fn start(ns: &str, identity: &str) -> Operator {
        let c = cluster();
        let token = c.operator_token().await;
        let kubeconfig = c
            .kubeconfig(&format!("operator-{ns}-{identity}"), &token)
            .expect("kubeconfig");
        let metrics_port = free_port();
        let log = c.dir.join(format!("operator-{ns}-{identity}.log"));
        let args: Vec<String> = [
            "run",
            "--namespace",
            ns,
            "--lease-namespace",
            OPERATOR_NAMESPACE,
            "--lease-name",
            &format!("lease-{ns}"),
            "--identity",
            identity,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--lease-seconds",
            "6",
            "--stats-interval-seconds",
            "1",
            "--log",
            "info,sip_pbx_operator=debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let child = cluster::spawn(
            std::path::Path::new(env!("CARGO_BIN_EXE_sip-pbx-operator")),
            &args,
            &[("KUBECONFIG", &kubeconfig)],
            &log,
        )
        .expect("operator starts");
        Operator {
            child,
            log,
            metrics_port,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metrics(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        reqwest::get(url).await.ok()?.text().await.ok()
    }
}

/// A namespace for one test.
async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

/// One test's namespace, its operator, and a SipPbx created from a spec.
struct Setup {
    client: Client,
    op: Operator,
    pbxes: Api<SipPbx>,
    deploy: Api<Deployment>,
    pbx: SipPbx,
}

async fn setup(ns: &str, name: &str, spec: serde_json::Value) -> Setup {
    let client = cluster().admin().await;
    namespace(&client, ns).await;
    let op = Operator::start(ns, "op-1").await;
    let pbxes: Api<SipPbx> = Api::namespaced(client.clone(), ns);
    pbxes
        .create(&PostParams::default(), &sippbx(name, spec))
        .await
        .expect("create SipPbx");
    let pbx = get_pbx(&pbxes, name).await;
    let deploy = Api::namespaced(client.clone(), ns);
    Setup {
        client,
        op,
        pbxes,
        deploy,
        pbx,
    }
}

fn sippbx(name: &str, spec: serde_json::Value) -> SipPbx {
    serde_json::from_value(json!({
        "apiVersion": "sip.pbx.dev/v1alpha1",
        "kind": "SipPbx",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("SipPbx")
}

async fn get_pbx(api: &Api<SipPbx>, name: &str) -> SipPbx {
    api.get(name).await.expect("get SipPbx")
}

fn condition<'a>(pbx: &'a SipPbx, type_: &str) -> Option<(&'a str, &'a str, &'a str)> {
    pbx.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

fn owned_by(obj: &impl Resource, pbx: &SipPbx) -> bool {
    obj.owner_references()
        .iter()
        .any(|o| Some(&o.uid) == pbx.uid().as_ref() && o.controller == Some(true))
}

async fn pods(client: &Client, ns: &str, name: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={name}"));
    api.list(&lp)
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// What the kubelet would do: the pod runs at `ip` and is Ready.
async fn make_ready(client: &Client, ns: &str, pod: &str, ip: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
        ],
    }});
    api.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch pod status");
}

/// Makes every pod of `name` Ready, each with its own fake PBX API at
/// 127.0.`net`.x, and returns the fake pods by pod name.
async fn ready_pods(
    client: &Client,
    ns: &str,
    name: &str,
    want: usize,
    net: u8,
    port: u16,
    calls: &[i64],
) -> Vec<(String, FakePbx)> {
    let pods = eventually(&format!("{want} pods of {name}"), WAIT, || async {
        let pods = pods(client, ns, name).await;
        (pods.len() == want).then_some(pods)
    })
    .await;
    let mut fakes = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let ip = format!("127.0.{net}.{}", i + 2);
        let fake = FakePbx::start(&ip, port, calls.get(i).copied().unwrap_or(0)).await;
        make_ready(client, ns, &pod.name_any(), &ip).await;
        fakes.push((pod.name_any(), fake));
    }
    fakes
}

async fn events(client: &Client, ns: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

fn pdb_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "policy".into(),
        version: "v1beta1".into(),
        api_version: "policy/v1beta1".into(),
        kind: "PodDisruptionBudget".into(),
        plural: "poddisruptionbudgets".into(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_makes_every_object_and_ready_pods_make_it_ready() {
    let ns = "lifecycle";
    let port = free_port();
    let spec = json!({
        "replicas": 2,
        "usersSecretRef": {"name": "office-users"},
        "config": {"monitoring": {"healthCheckPort": port}},
    });
    let t = setup(ns, "office", spec).await;
    // The PDB is applied last: once it is there, every object is.
    let pdb = eventually("PodDisruptionBudget", WAIT, || async {
        pdb_api(&t.client, ns)
            .get_opt("office")
            .await
            .ok()
            .flatten()
    })
    .await;
    assert!(owned_by(&pdb, &t.pbx));
    assert_eq!(pdb.data["spec"]["maxUnavailable"], 1);
    let d = t.deploy.get("office").await.expect("Deployment");
    assert!(owned_by(&d, &t.pbx));
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let cm = Api::<ConfigMap>::namespaced(t.client.clone(), ns)
        .get("office-config")
        .await
        .expect("ConfigMap");
    assert!(owned_by(&cm, &t.pbx));
    let config = cm
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("config.yaml");
    assert!(
        config.contains("users_file: /etc/sip-pbx/users/users.yaml"),
        "{config}"
    );
    let svcs: Api<Service> = Api::namespaced(t.client.clone(), ns);
    for name in ["office-sip-udp", "office-metrics"] {
        let svc = svcs.get(name).await.expect(name);
        assert!(owned_by(&svc, &t.pbx), "{name}");
    }
    let udp = svcs.get("office-sip-udp").await.expect("udp service");
    let udp_spec = udp.spec.expect("spec");
    assert_eq!(udp_spec.session_affinity.as_deref(), Some("ClientIP"));
    assert!(svcs.get_opt("office-sip-tcp").await.expect("get").is_none());
    let secret = Api::<Secret>::namespaced(t.client.clone(), ns)
        .get("office-admin-token")
        .await
        .expect("admin token Secret");
    assert!(owned_by(&secret, &t.pbx));
    let pvc = Api::<PersistentVolumeClaim>::namespaced(t.client.clone(), ns)
        .get("office-cdr")
        .await
        .expect("CDR claim");
    assert!(!owned_by(&pvc, &t.pbx), "the kept PVC has no owner");

    let _fakes = ready_pods(&t.client, ns, "office", 2, 1, port, &[3, 4]).await;
    let ready = eventually("Ready condition", WAIT, || async {
        let p = get_pbx(&t.pbxes, "office").await;
        (condition(&p, "Ready").map(|c| c.0) == Some("True")).then_some(p)
    })
    .await;
    let status = ready.status.as_ref().expect("status");
    assert_eq!(status.ready_replicas, 2);
    assert_eq!(status.desired_replicas, 2);
    assert_eq!(status.observed_generation, ready.metadata.generation);
    assert_eq!(
        status.selector,
        "app.kubernetes.io/instance=office,app.kubernetes.io/name=sip-pbx"
    );
    eventually("active calls in status", WAIT, || async {
        let p = get_pbx(&t.pbxes, "office").await;
        (p.status.map(|s| s.active_calls) == Some(7)).then_some(())
    })
    .await;
    assert_eq!(condition(&ready, "Degraded").map(|c| c.0), Some("False"));
    eventually("Created event", WAIT, || async {
        let reasons = events(&t.client, ns).await;
        reasons.iter().any(|r| r == "Created").then_some(())
    })
    .await;
    let metrics = t.op.metrics().await.expect("operator /metrics");
    assert!(metrics.contains("sip_pbx_operator_leader 1"), "{metrics}");
    let health = reqwest::get(format!("http://127.0.0.1:{}/health", t.op.metrics_port))
        .await
        .expect("operator /health");
    assert!(health.status().is_success());

    // Deleting the SipPbx removes its children (garbage collector), but the CDR claim stays.
    t.pbxes
        .delete("office", &DeleteParams::foreground())
        .await
        .expect("delete");
    eventually("children deleted", WAIT, || async {
        let gone = t.deploy.get_opt("office").await.ok()?.is_none()
            && svcs.get_opt("office-metrics").await.ok()?.is_none()
            && Api::<ConfigMap>::namespaced(t.client.clone(), ns)
                .get_opt("office-config")
                .await
                .ok()?
                .is_none()
            && pdb_api(&t.client, ns)
                .get_opt("office")
                .await
                .ok()?
                .is_none();
        gone.then_some(())
    })
    .await;
    assert!(
        Api::<PersistentVolumeClaim>::namespaced(t.client.clone(), ns)
            .get_opt("office-cdr")
            .await
            .expect("get")
            .is_some()
    );
}

/// The PBX config file in ConfigMap `name`.
async fn config_yaml(client: &Client, ns: &str, name: &str) -> String {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("ConfigMap")
        .data
        .and_then(|d| d.get("config.yaml").cloned())
        .unwrap_or_default()
}

async fn patch_spec(api: &Api<SipPbx>, name: &str, spec: serde_json::Value) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
    .expect("patch SipPbx spec");
}

async fn deployment_replicas(api: &Api<Deployment>, name: &str) -> Option<i32> {
    api.get_opt(name).await.ok()??.spec?.replicas
}

/// What `kubectl scale sippbx NAME --replicas=N` does: a patch of the scale subresource.
async fn kubectl_scale(api: &Api<SipPbx>, name: &str, replicas: i32) {
    let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
    api.patch_scale(name, &PatchParams::default(), &patch)
        .await
        .expect("patch the scale subresource");
}

async fn wait_replicas(api: &Api<Deployment>, name: &str, want: i32) {
    eventually(&format!("{want} replicas of {name}"), WAIT, || async {
        (deployment_replicas(api, name).await? == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_follow_edits_and_kubectl_scale() {
    let ns = "edits";
    let spec = json!({"replicas": 1, "drain": {"timeoutSeconds": 30}});
    let t = setup(ns, "pbx", spec).await;
    let before = eventually("Deployment", WAIT, || async {
        t.deploy.get_opt("pbx").await.ok().flatten()
    })
    .await;
    let hash = config_hash(&before).expect("config hash annotation");

    // A config change lands in the ConfigMap and rolls the pods (new hash).
    patch_spec(
        &t.pbxes,
        "pbx",
        json!({"config": {"sip": {"maxConcurrentCalls": 20}}}),
    )
    .await;
    eventually("new config hash", WAIT, || async {
        let d = t.deploy.get("pbx").await.ok()?;
        (config_hash(&d)? != hash).then_some(())
    })
    .await;
    let config = config_yaml(&t.client, ns, "pbx-config").await;
    assert!(config.contains("max_concurrent_calls: 20"), "{config}");
    eventually("ConfigChanged event", WAIT, || async {
        events(&t.client, ns)
            .await
            .iter()
            .any(|r| r == "ConfigChanged")
            .then_some(())
    })
    .await;

    // transport: both adds the TCP Service; back to udp removes it.
    let svcs: Api<Service> = Api::namespaced(t.client.clone(), ns);
    patch_spec(
        &t.pbxes,
        "pbx",
        json!({"config": {"sip": {"transport": "both"}}}),
    )
    .await;
    eventually("TCP Service", WAIT, || async {
        svcs.get_opt("pbx-sip-tcp").await.ok().flatten()
    })
    .await;
    patch_spec(
        &t.pbxes,
        "pbx",
        json!({"config": {"sip": {"transport": "udp"}}}),
    )
    .await;
    eventually("TCP Service removed", WAIT, || async {
        svcs.get_opt("pbx-sip-tcp")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // The packet ring relay: in the config, and CAP_NET_RAW for the pod.
    // A value the PBX does not know is refused by the API server.
    patch_spec(
        &t.pbxes,
        "pbx",
        json!({"config": {"media": {"relayIo": "packet_ring"}}}),
    )
    .await;
    let capabilities = eventually("NET_RAW capability", WAIT, || async {
        let d = t.deploy.get("pbx").await.ok()?;
        let pod = d.spec?.template.spec?;
        pod.containers
            .first()?
            .security_context
            .clone()?
            .capabilities
    })
    .await;
    assert_eq!(capabilities.add, Some(vec!["NET_RAW".to_string()]));
    let config = config_yaml(&t.client, ns, "pbx-config").await;
    assert!(config.contains("relay_io: packet_ring"), "{config}");
    let refused = t
        .pbxes
        .patch(
            "pbx",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"config": {"media": {"relayIo": "packetring"}}}})),
        )
        .await;
    assert!(refused.is_err(), "an unknown relayIo was accepted");

    // spec.replicas, then the scale subresource (what `kubectl scale sippbx` calls).
    patch_spec(&t.pbxes, "pbx", json!({"replicas": 3})).await;
    wait_replicas(&t.deploy, "pbx", 3).await;
    kubectl_scale(&t.pbxes, "pbx", 2).await;
    wait_replicas(&t.deploy, "pbx", 2).await;
    let scale = eventually("scale status", WAIT, || async {
        let s = t.pbxes.get_scale("pbx").await.ok()?;
        (s.status.as_ref()?.replicas == 2).then_some(s)
    })
    .await;
    let selector = scale.status.and_then(|s| s.selector).unwrap_or_default();
    assert!(
        selector.contains("app.kubernetes.io/instance=pbx"),
        "{selector}"
    );
    let p = get_pbx(&t.pbxes, "pbx").await;
    assert_eq!(p.status.map(|s| s.desired_replicas), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_reported_as_degraded() {
    let ns = "invalid";
    let spec = json!({"autoscaling": {"enabled": true, "minReplicas": 5, "maxReplicas": 2}});
    let mut t = setup(ns, "bad", spec).await;
    let degraded = eventually("Degraded condition", WAIT, || async {
        let p = get_pbx(&t.pbxes, "bad").await;
        let (status, reason, message) = condition(&p, "Degraded")?;
        (status == "True").then(|| (reason.to_string(), message.to_string()))
    })
    .await;
    assert_eq!(degraded.0, "InvalidSpec");
    assert!(
        degraded.1.contains("minReplicas 5 is above maxReplicas 2"),
        "{}",
        degraded.1
    );
    assert!(
        t.deploy.get_opt("bad").await.expect("get").is_none(),
        "nothing applied"
    );
    assert!(events(&t.client, ns)
        .await
        .iter()
        .any(|r| r == "InvalidSpec"));

    // Fixed: the objects appear and Degraded clears.
    patch_spec(
        &t.pbxes,
        "bad",
        json!({"autoscaling": {"enabled": false, "minReplicas": 1}}),
    )
    .await;
    eventually("Degraded cleared", WAIT, || async {
        let p = get_pbx(&t.pbxes, "bad").await;
        (condition(&p, "Degraded")?.0 == "False").then_some(())
    })
    .await;
    let applied = eventually("Deployment", WAIT, || async {
        t.deploy.get_opt("bad").await.ok().flatten()
    })
    .await;

    // A port outside 1024..65535 is reported; the running objects stay as they were.
    patch_spec(
        &t.pbxes,
        "bad",
        json!({"config": {"sip": {"listenPort": 80}}}),
    )
    .await;
    let message = eventually("port problem", WAIT, || async {
        let p = get_pbx(&t.pbxes, "bad").await;
        let (status, _, message) = condition(&p, "Degraded")?;
        (status == "True").then(|| message.to_string())
    })
    .await;
    assert!(
        message.contains("spec.config.sip.listenPort: 80 is outside 1024..65535"),
        "{message}"
    );
    let now = t.deploy.get("bad").await.expect("Deployment");
    assert_eq!(config_hash(&now), config_hash(&applied));

    // Service mode with the media relay: applied, but reported.
    patch_spec(
        &t.pbxes,
        "bad",
        json!({"config": {"sip": {"listenPort": 5060}}, "network": {"mode": "Service", "serviceType": "NodePort"}}),
    )
    .await;
    let reason = eventually("unsupported combination", WAIT, || async {
        let p = get_pbx(&t.pbxes, "bad").await;
        let (status, reason, _) = condition(&p, "Degraded")?;
        (status == "True" && reason != "InvalidSpec").then(|| reason.to_string())
    })
    .await;
    assert_eq!(reason, "UnsupportedCombination");
    let svc = eventually("NodePort Service", WAIT, || async {
        let s = Api::<Service>::namespaced(t.client.clone(), ns)
            .get("bad-sip-udp")
            .await
            .ok()?;
        (s.spec.as_ref()?.type_.as_deref() == Some("NodePort")).then_some(s)
    })
    .await;
    assert_eq!(
        svc.spec.and_then(|s| s.session_affinity).as_deref(),
        Some("ClientIP")
    );
    assert!(
        t.op.child.try_wait().expect("wait").is_none(),
        "operator still running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_drains_the_emptiest_pod_before_removing_it() {
    let ns = "drain";
    let port = free_port();
    let spec = json!({
        "replicas": 3,
        "drain": {"timeoutSeconds": 600},
        "config": {"monitoring": {"healthCheckPort": port}},
    });
    let t = setup(ns, "pbx", spec).await;
    let fakes = ready_pods(&t.client, ns, "pbx", 3, 4, port, &[5, 1, 3]).await;
    eventually("9 active calls in status", WAIT, || async {
        let p = get_pbx(&t.pbxes, "pbx").await;
        (p.status?.active_calls == 9).then_some(())
    })
    .await;

    kubectl_scale(&t.pbxes, "pbx", 2).await;
    let (victim, victim_fake) = &fakes[1];
    let draining = eventually("Draining condition", WAIT, || async {
        let p = get_pbx(&t.pbxes, "pbx").await;
        let (status, _, message) = condition(&p, "Draining")?;
        (status == "True").then(|| message.to_string())
    })
    .await;
    assert_eq!(draining, format!("draining {victim}"));
    let token = Api::<Secret>::namespaced(t.client.clone(), ns)
        .get("pbx-admin-token")
        .await
        .expect("token Secret")
        .data
        .and_then(|d| {
            d.get("token")
                .map(|b| String::from_utf8_lossy(&b.0).to_string())
        })
        .expect("token");
    eventually("drain request", WAIT, || async {
        (!victim_fake.drain_requests().is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        victim_fake.drain_requests(),
        vec![format!("Bearer {token}")]
    );
    for (name, fake) in &fakes {
        if name != victim {
            assert!(
                fake.drain_requests().is_empty(),
                "{name} was not to be drained"
            );
        }
    }
    // The call on the draining pod is not cut: the Deployment keeps 3 pods.
    assert_eq!(deployment_replicas(&t.deploy, "pbx").await, Some(3));
    let pod_api: Api<Pod> = Api::namespaced(t.client.clone(), ns);
    let pod = pod_api.get(victim).await.expect("victim pod");
    assert!(pod.annotations().contains_key("sip.pbx.dev/drain-started"));

    // Its last call ends: that pod goes and the Deployment shrinks; the busy pods stay.
    victim_fake.set_calls(0);
    wait_replicas(&t.deploy, "pbx", 2).await;
    let mut busy: Vec<String> = fakes
        .iter()
        .map(|(name, _)| name.clone())
        .filter(|name| name != victim)
        .collect();
    busy.sort();
    eventually("only the busy pods left", WAIT, || async {
        let mut left: Vec<String> = pods(&t.client, ns, "pbx")
            .await
            .iter()
            .map(|p| p.name_any())
            .collect();
        left.sort();
        (left == busy).then_some(())
    })
    .await;
    for (name, fake) in &fakes {
        if name != victim {
            assert!(
                fake.drain_requests().is_empty(),
                "{name} was not to be drained"
            );
        }
    }
    let reasons = events(&t.client, ns).await;
    assert!(reasons.iter().any(|r| r == "DrainStarted"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "ScaledIn"), "{reasons:?}");
    eventually("Draining cleared", WAIT, || async {
        let p = get_pbx(&t.pbxes, "pbx").await;
        (condition(&p, "Draining")?.0 == "False").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaling_follows_active_calls() {
    let ns = "autoscale";
    let port = free_port();
    let spec = json!({
        "autoscaling": {"enabled": true, "minReplicas": 1, "maxReplicas": 4,
                        "targetActiveCallsPerPod": 10, "scaleDownStabilizationSeconds": 0},
        "drain": {"timeoutSeconds": 600},
        "config": {"monitoring": {"healthCheckPort": port}},
    });
    let t = setup(ns, "pbx", spec).await;
    let first = ready_pods(&t.client, ns, "pbx", 1, 5, port, &[25]).await;
    wait_replicas(&t.deploy, "pbx", 3).await;
    let all = eventually("3 pods", WAIT, || async {
        let p = pods(&t.client, ns, "pbx").await;
        (p.len() == 3).then_some(p)
    })
    .await;
    let mut fakes = Vec::new();
    for (i, pod) in all
        .iter()
        .filter(|p| p.name_any() != first[0].0)
        .enumerate()
    {
        let ip = format!("127.0.6.{}", i + 2);
        fakes.push(FakePbx::start(&ip, port, 0).await);
        make_ready(&t.client, ns, &pod.name_any(), &ip).await;
    }
    // Calls drop to 5: one pod is enough; the two empty pods go, the busy one stays.
    first[0].1.set_calls(5);
    wait_replicas(&t.deploy, "pbx", 1).await;
    assert!(
        first[0].1.drain_requests().is_empty(),
        "the busy pod was drained"
    );
    for fake in &fakes {
        assert_eq!(fake.drain_requests().len(), 1, "{} drained once", fake.ip);
    }
    let p = get_pbx(&t.pbxes, "pbx").await;
    assert_eq!(p.status.map(|s| s.desired_replicas), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_changes_and_deletion_when_not_kept() {
    let ns = "nokeep";
    let spec = json!({"cdr": {"keepOnDelete": false}});
    let t = setup(ns, "pbx", spec).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(t.client.clone(), ns);
    let pvc = eventually("CDR claim", WAIT, || async {
        claims.get_opt("pbx-cdr").await.ok().flatten()
    })
    .await;
    assert!(owned_by(&pvc, &t.pbx));

    // A change the server refuses (a bound claim's access modes are immutable)
    // is reported as Degraded, and retried with backoff until it is undone.
    let degraded = |want: &'static str| {
        let pbxes = t.pbxes.clone();
        async move {
            eventually(&format!("Degraded {want}"), WAIT, || async {
                let p = get_pbx(&pbxes, "pbx").await;
                let (status, reason, message) = condition(&p, "Degraded")?;
                (status == want).then(|| format!("{reason}: {message}"))
            })
            .await
        }
    };
    patch_spec(
        &t.pbxes,
        "pbx",
        json!({"cdr": {"storage": {"accessModes": ["ReadWriteOnce"]}}}),
    )
    .await;
    let message = degraded("True").await;
    assert!(
        message.starts_with("ApplyFailed: apply PersistentVolumeClaim pbx-cdr"),
        "{message}"
    );
    patch_spec(
        &t.pbxes,
        "pbx",
        json!({"cdr": {"storage": {"accessModes": ["ReadWriteMany"]}}}),
    )
    .await;
    degraded("False").await;
    let reasons = events(&t.client, ns).await;
    assert!(reasons.iter().any(|r| r == "ApplyFailed"), "{reasons:?}");
    t.pbxes
        .delete("pbx", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("claim deleted", WAIT, || async {
        claims
            .get_opt("pbx-cdr")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_lease() {
    use k8s_openapi::api::coordination::v1::Lease;
    let client = cluster().admin().await;
    let ns = "leader";
    namespace(&client, ns).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let holder = || async {
        leases
            .get_opt(&format!("lease-{ns}"))
            .await
            .ok()??
            .spec?
            .holder_identity
    };
    let a = Operator::start(ns, "op-a").await;
    eventually("op-a leads", WAIT, || async {
        (holder().await? == "op-a").then_some(())
    })
    .await;
    let b = Operator::start(ns, "op-b").await;
    let b_metrics = eventually("op-b metrics", WAIT, || b.metrics()).await;
    assert!(
        b_metrics.contains("sip_pbx_operator_leader 0"),
        "{b_metrics}"
    );
    assert_eq!(holder().await.as_deref(), Some("op-a"));

    // op-a stops (SIGTERM releases the lease): op-b takes over and reconciles.
    let pid = i32::try_from(a.child.id()).expect("pid");
    // SAFETY: sends SIGTERM to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    eventually("op-b leads", WAIT, || async {
        (holder().await? == "op-b").then_some(())
    })
    .await;
    let pbxes: Api<SipPbx> = Api::namespaced(client.clone(), ns);
    pbxes
        .create(&PostParams::default(), &sippbx("pbx", json!({})))
        .await
        .expect("create");
    let deploy: Api<Deployment> = Api::namespaced(client.clone(), ns);
    eventually("Deployment from op-b", WAIT, || async {
        deploy.get_opt("pbx").await.ok().flatten()
    })
    .await;
    let b_metrics = eventually("op-b metrics", WAIT, || b.metrics()).await;
    assert!(
        b_metrics.contains("sip_pbx_operator_leader 1"),
        "{b_metrics}"
    );

    // op-b dies without releasing: op-c takes over once the lease expires.
    let c = Operator::start(ns, "op-c").await;
    eventually("op-c waits", WAIT, || c.metrics()).await;
    let pid = i32::try_from(b.child.id()).expect("pid");
    // SAFETY: sends SIGKILL to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    eventually("op-c leads", WAIT, || async {
        (holder().await? == "op-c").then_some(())
    })
    .await;
    patch_spec(&pbxes, "pbx", json!({"replicas": 2})).await;
    wait_replicas(&deploy, "pbx", 2).await;
    drop(a);
}

/// Runs the cluster's own kubectl (1.20, built by tests/k8s/setup.sh) as admin.
fn kubectl_run(args: &[&str]) -> std::process::Output {
    let c = cluster();
    std::process::Command::new(cluster::bin_dir().join("kubectl"))
        .arg(format!(
            "--kubeconfig={}",
            c.dir.join("admin.kubeconfig").display()
        ))
        .args(args)
        .output()
        .expect("kubectl runs (tests/k8s/setup.sh builds it)")
}

/// `kubectl_run`, which must succeed; its standard output.
fn kubectl(args: &[&str]) -> String {
    let out = kubectl_run(args);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_get_and_explain() {
    let ns = "kubectl";
    let port = free_port();
    let spec = json!({"replicas": 1, "config": {"monitoring": {"healthCheckPort": port}}});
    let t = setup(ns, "pbx", spec).await;
    let _fakes = ready_pods(&t.client, ns, "pbx", 1, 7, port, &[2]).await;

    kubectl(&["-n", ns, "scale", "sippbx", "pbx", "--replicas=2"]);
    wait_replicas(&t.deploy, "pbx", 2).await;

    // Printer columns, filled from status.
    let table = eventually("kubectl get shows the calls", WAIT, || async {
        let table = kubectl(&["-n", ns, "get", "sippbx", "pbx"]);
        table
            .lines()
            .nth(1)?
            .split_whitespace()
            .nth(3)?
            .eq("2")
            .then_some(table)
    })
    .await;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(
        header,
        ["NAME", "REPLICAS", "READY", "ACTIVE CALLS", "AGE"],
        "{table}"
    );

    // kubectl explain reads the descriptions from the CRD schema.
    let explained = eventually("kubectl explain", WAIT, || async {
        let out = kubectl_run(&["explain", "sippbx.spec.autoscaling.targetActiveCallsPerPod"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await;
    assert!(explained.contains("ceil(total active calls"), "{explained}");
}
