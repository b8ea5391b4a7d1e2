//! The committed CRD YAML must be exactly what the Rust types generate.

mod common;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let crd_dir = common::repo_root().join("crds");
    for (name, yaml) in finetune_crds::crd_files() {
        let committed = std::fs::read_to_string(crd_dir.join(name))
            .unwrap_or_else(|e| panic!("crds/{name} is missing ({e}); run `make crds`"));
        let body = committed
            .split_once('\n')
            .map(|(_header, body)| body)
            .unwrap_or_default();
        assert!(
            body == yaml,
            "crds/{name} is stale: run `make crds` and commit the result"
        );
    }
}

#[test]
fn every_cel_rule_compiles() {
    use kube::core::cel;
    for (name, yaml) in finetune_crds::crd_files() {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let compiled = cel::compile_schema(schema);
        let errors: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        assert!(
            errors.is_empty(),
            "{name}: CEL rules that do not compile: {errors:#?}"
        );
    }
}
