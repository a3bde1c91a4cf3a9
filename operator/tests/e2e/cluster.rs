//! A real Kubernetes control plane for the tests: etcd, kube-apiserver (token
//! auth, RBAC) and kube-controller-manager (Deployments, ReplicaSets, garbage
//! collection) on loopback, started once per test binary. No kubelet: pods
//! stay Pending until a test patches their status.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Discovery;
use kube::{Api, Client, Config, ResourceExt};

/// Namespace of the operator's ServiceAccount and Leases (from deploy/rbac.yaml).
pub const OPERATOR_NAMESPACE: &str = "sip-pbx-system";

/// The running control plane.
pub struct Cluster {
    pub url: String,
    pub dir: PathBuf,
    admin_token: String,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The control plane, started on first use. Its processes are tied to a
/// thread that lives as long as the test binary (PR_SET_PDEATHSIG), so they
/// end with it.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let children = launch();
            let failed = children.is_err();
            let _ = tx.send(children.map(|(cluster, _)| cluster));
            if !failed {
                loop {
                    std::thread::park();
                }
            }
        });
        match rx.recv() {
            Ok(Ok(cluster)) => cluster,
            Ok(Err(err)) => panic!("cannot start the test cluster: {err}"),
            Err(_) => panic!("cluster thread died"),
        }
    })
}

/// Where tests/k8s/setup.sh caches the Kubernetes binaries.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("SIP_PBX_K8S_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/sip-pbx-k8s/bin"))
}

pub fn spawn(
    program: &Path,
    args: &[String],
    env: &[(&str, &Path)],
    log: &Path,
) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        format!(
            "cannot start {}: {e} (run tests/k8s/setup.sh)",
            program.display()
        )
    })
}

fn require(path: PathBuf) -> Result<PathBuf, String> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: run tests/k8s/setup.sh first (or set SIP_PBX_K8S_BIN)",
            path.display()
        ))
    }
}

fn which(program: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{program} is not on PATH: run tests/k8s/setup.sh first"))
}

fn launch() -> Result<(Cluster, Vec<Child>), String> {
    let apiserver = require(bin_dir().join("kube-apiserver"))?;
    let kcm = require(bin_dir().join("kube-controller-manager"))?;
    require(bin_dir().join("kubectl"))?;
    let etcd = which("etcd")?;
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("k8s-{}", std::process::id()));
    remove_stale_dirs(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let d = |name: &str| dir.join(name).display().to_string();

    let (etcd_port, peer_port, api_port) = (
        sip_pbx_e2e::free_port(),
        sip_pbx_e2e::free_port(),
        sip_pbx_e2e::free_port(),
    );
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut children = vec![spawn(
        &etcd,
        &[
            format!("--data-dir={}", d("etcd")),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
        ],
        &[],
        &dir.join("etcd.log"),
    )?];

    let status = Command::new("openssl")
        .args(["genrsa", "-out", &d("sa.key"), "2048"])
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("openssl: {e}"))?;
    if !status.success() {
        return Err("openssl genrsa failed".into());
    }
    let admin_token = format!("admin-{}", std::process::id());
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{admin_token},admin,admin,\"system:masters\"\n"),
    )
    .map_err(|e| e.to_string())?;
    children.push(spawn(
        &apiserver,
        &[
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", d("certs")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", d("sa.key")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
        ],
        &[],
        &dir.join("kube-apiserver.log"),
    )?);
    let url = format!("https://127.0.0.1:{api_port}");
    let cluster = Cluster {
        url,
        dir: dir.clone(),
        admin_token,
    };
    let admin_kubeconfig = cluster.kubeconfig("admin", &cluster.admin_token)?;
    children.push(spawn(
        &kcm,
        &[
            format!("--kubeconfig={}", admin_kubeconfig.display()),
            "--controllers=deployment,replicaset,garbagecollector,pvc-protection".into(),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
        ],
        &[],
        &dir.join("kube-controller-manager.log"),
    )?);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(cluster.bootstrap())?;
    Ok((cluster, children))
}

/// Removes the directories of earlier test runs whose process is gone.
fn remove_stale_dirs(ours: &Path) {
    let Some(parent) = ours.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("k8s-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Polls `check` until it returns `Some`, failing after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    /// Writes a kubeconfig for `token` and returns its path.
    pub fn kubeconfig(&self, user: &str, token: &str) -> Result<PathBuf, String> {
        let path = self.dir.join(format!("{user}.kubeconfig"));
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: {user}}}\ncurrent-context: test\n",
            self.url
        );
        std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// A client with cluster-admin rights (for the tests' own actions).
    pub async fn admin(&self) -> Client {
        let path = self.dir.join("admin.kubeconfig");
        client_from(&path).await
    }

    async fn bootstrap(&self) -> Result<(), String> {
        let client = client_from(&self.dir.join("admin.kubeconfig")).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| e.to_string())?;
            if client.request_text(req).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-apiserver not ready in 60 s; see {}",
                    self.dir.join("kube-apiserver.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The CRD, installed with create (1.20 has no CEL; the CRD has none).
        let crd_yaml =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/sippbx.yaml"))
                .map_err(|e| e.to_string())?;
        let crd: CustomResourceDefinition =
            serde_norway::from_str(&crd_yaml).map_err(|e| e.to_string())?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &crd)
            .await
            .map_err(|e| format!("creating the CRD: {e}"))?;
        let established = |c: &CustomResourceDefinition| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        };
        while !established(&crds.get(&crd.name_any()).await.map_err(|e| e.to_string())?) {
            if Instant::now() > deadline {
                return Err("CRD not established".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The operator's RBAC, exactly as shipped.
        let ns: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": OPERATOR_NAMESPACE}
        }))
        .map_err(|e| e.to_string())?;
        ns.create(&PostParams::default(), &namespace)
            .await
            .map_err(|e| e.to_string())?;
        apply_manifest(&client, include_str!("../../deploy/rbac.yaml")).await
    }

    /// A token of the operator's ServiceAccount (TokenRequest API).
    pub async fn operator_token(&self) -> String {
        let client = self.admin().await;
        let sas: Api<ServiceAccount> = Api::namespaced(client, OPERATOR_NAMESPACE);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let resp = sas
            .create_token_request("sip-pbx-operator", &PostParams::default(), &req)
            .await
            .expect("token request");
        resp.status.expect("token status").token
    }
}

pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

/// Server-side applies every document of a YAML manifest.
pub async fn apply_manifest(client: &Client, yaml: &str) -> Result<(), String> {
    use serde::Deserialize;
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .map_err(|e| e.to_string())?;
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let obj = DynamicObject::deserialize(doc).map_err(|e| e.to_string())?;
        let types = obj
            .types
            .clone()
            .ok_or("document without apiVersion/kind")?;
        let gvk = kube::api::GroupVersionKind::try_from(&types).map_err(|e| e.to_string())?;
        let (ar, caps) = discovery
            .resolve_gvk(&gvk)
            .ok_or(format!("unknown kind {gvk:?}"))?;
        let api: Api<DynamicObject> = match (caps.scope, obj.namespace()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), &ns, &ar)
            }
            _ => Api::all_with(client.clone(), &ar),
        };
        api.patch(
            &obj.name_any(),
            &PatchParams::apply("e2e-test"),
            &Patch::Apply(&obj),
        )
        .await
        .map_err(|e| format!("applying {}: {e}", obj.name_any()))?;
    }
    Ok(())
}
