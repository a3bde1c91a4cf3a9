//! The committed CRD must be what the code generates.

#[test]
fn committed_crd_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/sippbx.yaml");
    let committed = std::fs::read_to_string(path).expect("crds/sippbx.yaml is committed");
    let generated = sip_pbx_operator::crd::crd_yaml().expect("CRD serializes");
    assert!(
        committed == generated,
        "crds/sippbx.yaml is stale: run `cargo run -p sip-pbx-operator --bin crdgen crds/sippbx.yaml`"
    );
}
