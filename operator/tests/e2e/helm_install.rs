//! `helm install` of charts/sip-pbx into the test API server: the operator's
//! Deployment, ServiceAccount, metrics Service, RBAC and the SipPbx exist,
//! the ServiceAccount may do what the operator needs and no more, and no
//! ServiceMonitor is attempted where monitoring.coreos.com is not served.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::PostParams;
use kube::{Api, Client};
use sip_pbx_operator::crd::SipPbx;

use crate::cluster::cluster;
use crate::helm::{chart, helm};

const NAMESPACE: &str = "helm-install";
const RELEASE: &str = "voice";

/// Whether the ServiceAccount `user` may `verb` `resource` in `namespace`.
async fn allowed(client: &Client, user: &str, verb: &str, group: &str, resource: &str) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(vec!["system:serviceaccounts".into()]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some("telephony".into()),
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_creates_the_operator_and_its_rbac() {
    let c = cluster();
    let kubeconfig = c.dir.join("admin.kubeconfig");
    let chart = chart();
    let out = helm(&[
        "install",
        RELEASE,
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8 path"),
        "--set",
        "pbx.enabled=true,pbx.name=office,metrics.serviceMonitor.enabled=true",
    ]);
    assert!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let notes = String::from_utf8_lossy(&out.stdout);
    assert!(
        notes.contains("does not serve\nmonitoring.coreos.com/v1"),
        "{notes}"
    );

    let client = c.admin().await;
    let name = format!("{RELEASE}-sip-pbx");
    let deployment = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{name}-operator"))
        .await
        .expect("operator Deployment");
    let pod = deployment
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(name.as_str()));
    Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .get(&name)
        .await
        .expect("ServiceAccount");
    Api::<Service>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{name}-operator-metrics"))
        .await
        .expect("metrics Service");
    Api::<ClusterRole>::all(client.clone())
        .get(&name)
        .await
        .expect("ClusterRole");
    Api::<ClusterRoleBinding>::all(client.clone())
        .get(&name)
        .await
        .expect("ClusterRoleBinding");
    Api::<Role>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{name}-leader"))
        .await
        .expect("leader Role");
    Api::<RoleBinding>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{name}-leader"))
        .await
        .expect("leader RoleBinding");
    let pbx = Api::<SipPbx>::namespaced(client.clone(), NAMESPACE)
        .get("office")
        .await
        .expect("the chart's SipPbx");
    assert_eq!(pbx.spec.image, "sip-pbx:0.1.0");

    let user = format!("system:serviceaccount:{NAMESPACE}:{name}");
    for (verb, group, resource) in [
        ("watch", "sip.pbx.dev", "sippbxes"),
        ("patch", "sip.pbx.dev", "sippbxes/status"),
        ("patch", "apps", "deployments"),
        ("delete", "", "pods"),
        ("create", "", "secrets"),
    ] {
        assert!(
            allowed(&client, &user, verb, group, resource).await,
            "{verb} {resource}"
        );
    }
    for (verb, group, resource) in [
        ("delete", "apps", "deployments"),
        ("list", "", "secrets"),
        ("update", "sip.pbx.dev", "sippbxes"),
        ("create", "", "pods"),
    ] {
        assert!(
            !allowed(&client, &user, verb, group, resource).await,
            "{verb} {resource} is more than the operator needs"
        );
    }
}
