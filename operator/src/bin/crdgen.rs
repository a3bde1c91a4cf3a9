//! `crdgen [PATH]`: writes the SipPbx CustomResourceDefinition as YAML to
//! PATH (the repository keeps it in crds/sippbx.yaml), or to standard output.

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match sip_pbx_operator::crd::crd_yaml() {
        Ok(yaml) => yaml,
        Err(err) => {
            eprintln!("crdgen: {err}");
            return ExitCode::FAILURE;
        }
    };
    match std::env::args_os().nth(1) {
        Some(path) => match std::fs::write(&path, yaml) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("crdgen: {}: {err}", path.to_string_lossy());
                ExitCode::FAILURE
            }
        },
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
    }
}
