//! The checked-in `crds/` must be exactly what the Rust types generate: a field changed in
//! Rust without `crdgen --out-dir crds` fails here, and so does a hand edit of the YAML.

use std::{collections::BTreeSet, fs, path::Path};

fn crds_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds"))
}

#[test]
fn checked_in_crds_match_the_rust_types() {
    let mut stale = Vec::new();
    for crd in wgmesh_api::crds() {
        let name = wgmesh_api::crd_file_name(&crd);
        let want = wgmesh_api::crd_yaml(&crd).expect("render CRD");
        let have = fs::read_to_string(crds_dir().join(&name)).unwrap_or_default();
        if have != want {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "crds/ is out of date for {stale:?}: run `cargo run -p wgmesh-api --bin crdgen -- --out-dir crds` and commit the result"
    );
}

#[test]
fn crds_dir_holds_nothing_else() {
    let want: BTreeSet<String> = wgmesh_api::crds()
        .iter()
        .map(wgmesh_api::crd_file_name)
        .collect();
    let have: BTreeSet<String> = fs::read_dir(crds_dir())
        .expect("read crds/")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        have, want,
        "crds/ must hold exactly the generated definitions"
    );
}

/// The kinds with a status the operator or agents write; a `MeshPeerReport` is all spec,
/// written by one agent.
const REPORT: &str = "MeshPeerReport";

#[test]
fn every_kind_is_cluster_scoped_with_status_and_printer_columns() {
    for crd in wgmesh_api::crds() {
        assert_eq!(crd.spec.group, "wgmesh.dev");
        assert_eq!(crd.spec.scope, "Cluster", "{:?}", crd.metadata.name);
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        let report = crd.spec.names.kind == REPORT;
        assert_eq!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            !report,
            "{:?}",
            crd.metadata.name
        );
        let cols: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        let headline = if report { "Paths" } else { "Ready" };
        assert!(
            cols.contains(&headline) && cols.contains(&"Age"),
            "{cols:?}"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty())
        );
    }
}

#[test]
fn conditions_are_list_maps_keyed_by_type() {
    for crd in wgmesh_api::crds() {
        if crd.spec.names.kind == REPORT {
            continue;
        }
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema json");
        let conditions =
            &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{:?}",
            crd.metadata.name
        );
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
    }
}
