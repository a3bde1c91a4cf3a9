//! The PBX's config.yaml, rendered from `spec.config` (camelCase) to the
//! PBX's snake_case keys, with the keys the operator owns (file paths,
//! retention, drain timeout) filled in.

use kube::ResourceExt;
use serde_json::{Map, Value};

use crate::crd::SipPbx;

/// File name of the config inside the ConfigMap and its mount.
pub const CONFIG_FILE: &str = "config.yaml";
/// Where the ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/sip-pbx/config";
/// Where the users Secret is mounted.
pub const USERS_DIR: &str = "/etc/sip-pbx/users";
/// File name of the users list inside its mount.
pub const USERS_FILE: &str = "users.yaml";
/// Where the admin token Secret is mounted.
pub const ADMIN_DIR: &str = "/etc/sip-pbx/admin";
/// Where the CDR volume is mounted.
pub const CDR_DIR: &str = "/var/lib/sip-pbx/cdr";
/// Where the webhook spool lives.
pub const SPOOL_DIR: &str = "/var/lib/sip-pbx/spool";

/// The config could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("spec.config of {name} cannot be converted: {source}")]
    Convert {
        name: String,
        source: serde_json::Error,
    },
    #[error("spec.config of {name} cannot be written as YAML: {source}")]
    Yaml {
        name: String,
        source: serde_norway::Error,
    },
}

/// The PBX config file of `pbx`, as YAML.
pub fn render_config(pbx: &SipPbx) -> Result<String, ConfigError> {
    let spec = &pbx.spec;
    let camel = serde_json::to_value(&spec.config).map_err(|source| ConfigError::Convert {
        name: pbx.name_any(),
        source,
    })?;
    let mut config = snake_keys(camel);
    if spec.users_secret_ref.is_some() {
        set(
            &mut config,
            "auth",
            "users_file",
            format!("{USERS_DIR}/{USERS_FILE}"),
        );
    }
    set(
        &mut config,
        "monitoring",
        "admin_token_file",
        format!("{ADMIN_DIR}/{}", super::ADMIN_TOKEN_KEY),
    );
    set(&mut config, "cdr", "output_dir", CDR_DIR);
    set(
        &mut config,
        "cdr",
        "retention_days",
        spec.cdr.retention_days,
    );
    set(&mut config, "events", "spool_dir", SPOOL_DIR);
    set(&mut config, "logging", "output", "stdout");
    set(
        &mut config,
        "drain",
        "timeout_seconds",
        spec.drain.timeout_seconds,
    );
    serde_norway::to_string(&config).map_err(|source| ConfigError::Yaml {
        name: pbx.name_any(),
        source,
    })
}

fn set(config: &mut Value, section: &str, key: &str, value: impl Into<Value>) {
    if let Value::Object(root) = config {
        let entry = root
            .entry(section)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(section) = entry {
            section.insert(key.to_string(), value.into());
        }
    }
}

/// Renames every object key from camelCase to snake_case. The config has no
/// user-named keys (lists hold the user data), so every key is a field name.
fn snake_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (snake_case(&k), snake_keys(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(snake_keys).collect()),
        other => other,
    }
}

fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_of_config_keys() {
        assert_eq!(snake_case("listenPort"), "listen_port");
        assert_eq!(snake_case("trustedCidrs"), "trusted_cidrs");
        assert_eq!(snake_case("sip"), "sip");
    }

    #[test]
    fn renders_snake_case_with_operator_keys() {
        let pbx: SipPbx = serde_norway::from_str(
            r#"
apiVersion: sip.pbx.dev/v1alpha1
kind: SipPbx
metadata: {name: office, namespace: tel}
spec:
  usersSecretRef: {name: users}
  cdr: {retentionDays: 30}
  drain: {timeoutSeconds: 120}
  config:
    sip: {listenPort: 5080, transport: both, maxConcurrentCalls: 20}
    routes: [{match: "^9(\\d+)$", target: "sip:$1@carrier"}]
    monitoring: {healthCheckPort: 8081}
"#,
        )
        .expect("parses");
        let yaml = render_config(&pbx).expect("renders");
        let v: Value = serde_norway::from_str(&yaml).expect("yaml");
        assert_eq!(v["sip"]["listen_port"], 5080);
        assert_eq!(v["sip"]["transport"], "both");
        assert_eq!(v["sip"]["max_concurrent_calls"], 20);
        assert_eq!(v["routes"][0]["match"], "^9(\\d+)$");
        assert_eq!(v["monitoring"]["health_check_port"], 8081);
        assert_eq!(v["monitoring"]["prometheus_port"], 9090);
        assert_eq!(
            v["monitoring"]["admin_token_file"],
            "/etc/sip-pbx/admin/token"
        );
        assert_eq!(v["auth"]["users_file"], "/etc/sip-pbx/users/users.yaml");
        assert_eq!(v["cdr"]["output_dir"], CDR_DIR);
        assert_eq!(v["cdr"]["retention_days"], 30);
        assert_eq!(v["drain"]["timeout_seconds"], 120);
        assert_eq!(v["media"]["port_pool"]["start"], 10000);
        assert!(!yaml.contains("listenPort"));
        assert!(!yaml.contains("webhook_secret"));
    }
}
