//! Services: one per SIP protocol (a LoadBalancer cannot mix UDP and TCP on
//! older clusters) with client-IP affinity, and a metrics/API Service.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{meta, selector_labels, Names, HTTP_PORT_NAME};
use crate::crd::{NetworkMode, SipPbx};

/// The Services `pbx` should have. In HostNetwork mode SIP reaches the nodes
/// directly; the SIP Services are then ClusterIP, for in-cluster clients.
pub fn services(pbx: &SipPbx) -> Vec<Service> {
    let spec = &pbx.spec;
    let names = Names(&pbx.name_any());
    let cfg = &spec.config;
    let sip_type = match spec.network.mode {
        NetworkMode::HostNetwork => "ClusterIP",
        NetworkMode::Service => spec.network.service_type.as_str(),
    };
    let mut services = Vec::new();
    for (protocol, wanted) in [
        ("UDP", cfg.sip.transport.udp()),
        ("TCP", cfg.sip.transport.tcp()),
    ] {
        if wanted {
            let name = format!("sip-{}", protocol.to_lowercase());
            services.push(service(
                pbx,
                names.sip_service(protocol),
                sip_type,
                Some("ClientIP"),
                vec![service_port(&name, cfg.sip.listen_port, protocol)],
            ));
        }
    }
    services.push(service(
        pbx,
        names.metrics_service(),
        "ClusterIP",
        None,
        vec![
            service_port("metrics", cfg.monitoring.prometheus_port, "TCP"),
            service_port(HTTP_PORT_NAME, cfg.monitoring.health_check_port, "TCP"),
        ],
    ));
    services
}

fn service(
    pbx: &SipPbx,
    name: String,
    type_: &str,
    affinity: Option<&str>,
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        metadata: meta(pbx, name, true),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(selector_labels(pbx)),
            session_affinity: affinity.map(str::to_string),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn service_port(name: &str, port: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        protocol: Some(protocol.into()),
        target_port: Some(IntOrString::Int(port)),
        ..ServicePort::default()
    }
}
