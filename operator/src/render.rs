//! `sip-pbx-operator render`: the objects a SipPbx file would produce, as YAML.

use crate::crd::SipPbx;
use crate::objects::{self, ConfigError, YamlError};
use crate::validate::{blocks_apply, validate, Problem, Severity};

/// Rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("not a SipPbx: {0}")]
    Parse(serde_norway::Error),
    #[error("invalid SipPbx:\n{}", list(.0))]
    Invalid(Vec<Problem>),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Yaml(#[from] YamlError),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {}", p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The YAML of every object `input` (a SipPbx manifest) asks for, and the
/// warnings the operator would report.
pub fn render(input: &str) -> Result<(String, Vec<String>), RenderError> {
    let pbx: SipPbx = serde_norway::from_str(input).map_err(RenderError::Parse)?;
    let problems = validate(&pbx.spec);
    if blocks_apply(&problems) {
        return Err(RenderError::Invalid(problems));
    }
    let warnings = problems
        .into_iter()
        .filter(|p| p.severity == Severity::Warning)
        .map(|p| p.message)
        .collect();
    let replicas = if pbx.spec.autoscaling.enabled {
        pbx.spec.autoscaling.min_replicas
    } else {
        pbx.spec.replicas
    };
    Ok((objects::desired(&pbx, replicas)?.to_yaml()?, warnings))
}
