//! End-to-end tests of sip-pbx-operator against a real Kubernetes 1.20 API
//! server and controller manager (built by tests/k8s/setup.sh). Each test has
//! its own namespace and its own operator process, which runs with the
//! ServiceAccount token of deploy/rbac.yaml, not as admin.

mod cluster;
mod fakepod;

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
use sip_pbx_operator::crd::SipPbx;

use cluster::{cluster, eventually, OPERATOR_NAMESPACE};
use fakepod::FakePbx;

const WAIT: Duration = Duration::from_secs(60);

/// An operator process; killed when dropped.
struct Operator {
    child: Child,
    log: PathBuf,
    metrics_port: u16,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    async fn start(ns: &str, identity: &str) -> Operator {
        let c = cluster();
        let token = c.operator_token().await;
        let kubeconfig = c
            .kubeconfig(&format!("operator-{ns}-{identity}"), &token)
            .expect("kubeconfig");
        let metrics_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
            l.local_addr().expect("addr").port()
        };
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

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    l.local_addr().expect("addr").port()
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
    let client = cluster().admin().await;
    let ns = "lifecycle";
    namespace(&client, ns).await;
    let op = Operator::start(ns, "op-1").await;
    let port = free_port();
    let pbxes: Api<SipPbx> = Api::namespaced(client.clone(), ns);
    let spec = json!({
        "replicas": 2,
        "usersSecretRef": {"name": "office-users"},
        "config": {"monitoring": {"healthCheckPort": port}},
    });
    pbxes
        .create(&PostParams::default(), &sippbx("office", spec))
        .await
        .expect("create SipPbx");
    let pbx = get_pbx(&pbxes, "office").await;

    let deploy: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let d = eventually("Deployment", WAIT, || async {
        deploy.get_opt("office").await.ok().flatten()
    })
    .await;
    assert!(owned_by(&d, &pbx));
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("office-config")
        .await
        .expect("ConfigMap");
    assert!(owned_by(&cm, &pbx));
    let config = cm
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("config.yaml");
    assert!(
        config.contains("users_file: /etc/sip-pbx/users/users.yaml"),
        "{config}"
    );
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    for name in ["office-sip-udp", "office-metrics"] {
        let svc = svcs.get(name).await.expect(name);
        assert!(owned_by(&svc, &pbx), "{name}");
    }
    let udp = svcs.get("office-sip-udp").await.expect("udp service");
    let udp_spec = udp.spec.expect("spec");
    assert_eq!(udp_spec.session_affinity.as_deref(), Some("ClientIP"));
    assert!(svcs.get_opt("office-sip-tcp").await.expect("get").is_none());
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get("office-admin-token")
        .await
        .expect("admin token Secret");
    assert!(owned_by(&secret, &pbx));
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get("office-cdr")
        .await
        .expect("CDR claim");
    assert!(!owned_by(&pvc, &pbx), "the kept PVC has no owner");
    let pdb = pdb_api(&client, ns).get("office").await.expect("PDB");
    assert!(owned_by(&pdb, &pbx));
    assert_eq!(pdb.data["spec"]["maxUnavailable"], 1);

    let _fakes = ready_pods(&client, ns, "office", 2, 1, port, &[3, 4]).await;
    let ready = eventually("Ready condition", WAIT, || async {
        let p = get_pbx(&pbxes, "office").await;
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
        let p = get_pbx(&pbxes, "office").await;
        (p.status.map(|s| s.active_calls) == Some(7)).then_some(())
    })
    .await;
    assert_eq!(condition(&ready, "Degraded").map(|c| c.0), Some("False"));
    let reasons = events(&client, ns).await;
    assert!(reasons.iter().any(|r| r == "Created"), "{reasons:?}");
    let metrics = op.metrics().await.expect("operator /metrics");
    assert!(metrics.contains("sip_pbx_operator_leader 1"), "{metrics}");

    // Deleting the SipPbx removes its children (garbage collector), but the CDR claim stays.
    pbxes
        .delete("office", &DeleteParams::foreground())
        .await
        .expect("delete");
    eventually("children deleted", WAIT, || async {
        let gone = deploy.get_opt("office").await.ok()?.is_none()
            && svcs.get_opt("office-metrics").await.ok()?.is_none()
            && Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get_opt("office-config")
                .await
                .ok()?
                .is_none()
            && pdb_api(&client, ns).get_opt("office").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    assert!(Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt("office-cdr")
        .await
        .expect("get")
        .is_some());
    assert!(!op.log().contains("forbidden"), "{}", op.log());
}
