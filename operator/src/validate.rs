//! Checks of a `SipPbxSpec` that the CRD schema cannot express.
//!
//! An `Invalid` problem stops the operator from applying the spec (the running
//! objects stay as they were); a `Warning` is applied but reported. Both end up
//! in the `Degraded` condition with their messages.

use crate::crd::{MediaMode, NetworkMode, SipPbxSpec};

/// Lowest and highest port the PBX may be configured with.
pub const PORT_RANGE: std::ops::RangeInclusive<i32> = 1024..=65535;

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The spec cannot be applied.
    Invalid,
    /// The spec is applied, but will not work as the user probably expects.
    Warning,
}

/// One problem, with a message naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
}

impl Problem {
    fn invalid(message: String) -> Self {
        Problem {
            severity: Severity::Invalid,
            message,
        }
    }
}

/// All problems of `spec`, in field order; empty when it is fine.
pub fn validate(spec: &SipPbxSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    let a = &spec.autoscaling;
    if a.min_replicas > a.max_replicas {
        problems.push(Problem::invalid(format!(
            "spec.autoscaling: minReplicas {} is above maxReplicas {}",
            a.min_replicas, a.max_replicas
        )));
    }
    let c = &spec.config;
    let ports = [
        ("spec.config.sip.listenPort", c.sip.listen_port),
        (
            "spec.config.monitoring.healthCheckPort",
            c.monitoring.health_check_port,
        ),
        (
            "spec.config.monitoring.prometheusPort",
            c.monitoring.prometheus_port,
        ),
        ("spec.config.media.portPool.start", c.media.port_pool.start),
        ("spec.config.media.portPool.end", c.media.port_pool.end),
    ];
    for (field, port) in ports {
        if !PORT_RANGE.contains(&port) {
            problems.push(Problem::invalid(format!(
                "{field}: {port} is outside {}..{}",
                PORT_RANGE.start(),
                PORT_RANGE.end()
            )));
        }
    }
    let pool = &c.media.port_pool;
    if pool.start >= pool.end {
        problems.push(Problem::invalid(format!(
            "spec.config.media.portPool: start {} is not below end {}",
            pool.start, pool.end
        )));
    }
    for (i, (field, port)) in ports[..3].iter().enumerate() {
        for (other, other_port) in &ports[..i] {
            if port == other_port {
                problems.push(Problem::invalid(format!(
                    "{field}: {port} is already used by {other}"
                )));
            }
        }
        if (pool.start..=pool.end).contains(port) {
            problems.push(Problem::invalid(format!(
                "{field}: {port} is inside spec.config.media.portPool"
            )));
        }
    }
    if spec.network.mode == NetworkMode::Service
        && c.media.mode == MediaMode::Bypass
        && spec.network.advertised_address.is_empty()
    {
        problems.push(Problem {
            severity: Severity::Warning,
            message: "spec.network: in Service mode the media relay's port pool is not exposed; \
                      set config.media.mode to direct, or advertisedAddress to where media is reached"
                .into(),
        });
    }
    problems
}

/// All problems' messages on one line.
pub fn summary(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// True when some problem stops the spec from being applied.
pub fn blocks_apply(problems: &[Problem]) -> bool {
    problems.iter().any(|p| p.severity == Severity::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SipPbx;

    fn spec(yaml: &str) -> SipPbxSpec {
        let pbx: SipPbx = serde_norway::from_str(&format!(
            "apiVersion: sip.pbx.dev/v1alpha1\nkind: SipPbx\nmetadata: {{name: t}}\nspec:\n{yaml}"
        ))
        .expect("test spec parses");
        pbx.spec
    }

    fn messages(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.message.as_str()).collect()
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(validate(&spec("  image: x")), vec![]);
    }

    #[test]
    fn table_of_invalid_specs() {
        let cases = [
            (
                "  autoscaling: {minReplicas: 5, maxReplicas: 2}",
                "spec.autoscaling: minReplicas 5 is above maxReplicas 2",
            ),
            (
                "  config: {sip: {listenPort: 80}}",
                "spec.config.sip.listenPort: 80 is outside 1024..65535",
            ),
            (
                "  config: {media: {portPool: {start: 20000, end: 10000}}}",
                "spec.config.media.portPool: start 20000 is not below end 10000",
            ),
            (
                "  config: {monitoring: {prometheusPort: 8080}}",
                "spec.config.monitoring.prometheusPort: 8080 is already used by spec.config.monitoring.healthCheckPort",
            ),
            (
                "  config: {sip: {listenPort: 12000}}",
                "spec.config.sip.listenPort: 12000 is inside spec.config.media.portPool",
            ),
        ];
        for (yaml, want) in cases {
            let problems = validate(&spec(yaml));
            assert_eq!(messages(&problems), vec![want], "{yaml}");
            assert!(blocks_apply(&problems), "{yaml}");
        }
    }

    #[test]
    fn service_mode_with_relay_is_a_warning_unless_address_given() {
        let problems = validate(&spec("  network: {mode: Service}"));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].severity, Severity::Warning);
        assert!(!blocks_apply(&problems));
        let ok = spec("  network: {mode: Service, advertisedAddress: 203.0.113.7}");
        assert_eq!(validate(&ok), vec![]);
        let direct = spec("  network: {mode: Service}\n  config: {media: {mode: direct}}");
        assert_eq!(validate(&direct), vec![]);
    }
}
