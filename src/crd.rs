//! The Kubernetes CRDs generated from the resource model, as checked in under `deploy/crds/`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::model::{Cluster, ClusterRoleBinding, Kind, RegistrySecret, Repository, RoleBinding};

/// The CRD of one kind.
pub fn crd(kind: Kind) -> CustomResourceDefinition {
    match kind {
        Kind::RegistrySecret => RegistrySecret::crd(),
        Kind::Repository => Repository::crd(),
        Kind::Cluster => Cluster::crd(),
        Kind::RoleBinding => RoleBinding::crd(),
        Kind::ClusterRoleBinding => ClusterRoleBinding::crd(),
    }
}

/// The CRDs, in dependency order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    Kind::ALL.into_iter().map(crd).collect()
}

/// The file each CRD is checked in as, relative to `deploy/crds/`.
pub fn crd_file_name(kind: Kind) -> String {
    format!("{}.yaml", kind.plural())
}

/// One CRD as the YAML checked in under `deploy/crds/`.
pub fn crd_yaml(kind: Kind) -> Result<String, serde_saphyr::SerializeError> {
    let body = serde_saphyr::to_string(&crd(kind))?;
    Ok(format!(
        "# Generated from the imgfleet resource model (src/model); do not edit.\n\
         # Regenerate with: IMGFLEET_UPDATE_CRDS=1 cargo test -p imgfleet crds\n{body}"
    ))
}

/// The CRDs as YAML: `(file name, contents)`.
pub fn crds_yaml() -> Result<Vec<(String, String)>, serde_saphyr::SerializeError> {
    Kind::ALL
        .into_iter()
        .map(|k| Ok((crd_file_name(k), crd_yaml(k)?)))
        .collect()
}

/// The OpenAPI v3 schema of one kind's CRD as a generic value; the strict YAML
/// reader walks documents against it.
pub(crate) fn open_api_schema(kind: Kind) -> serde_json::Value {
    crd(kind)
        .spec
        .versions
        .into_iter()
        .next()
        .and_then(|v| v.schema)
        .and_then(|s| s.open_api_v3_schema)
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails when `deploy/crds/` differs from the types. Set
    /// `IMGFLEET_UPDATE_CRDS=1` to rewrite the files instead.
    #[test]
    fn crds_are_up_to_date() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/crds");
        let update = std::env::var_os("IMGFLEET_UPDATE_CRDS").is_some();
        let mut stale = Vec::new();
        for (file, generated) in crds_yaml().expect("CRDs serialize") {
            let path = dir.join(&file);
            if update {
                std::fs::create_dir_all(&dir).expect("create deploy/crds");
                std::fs::write(&path, &generated).expect("write CRD");
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(existing) if existing == generated => {}
                _ => stale.push(path.display().to_string()),
            }
        }
        assert!(
            stale.is_empty(),
            "the checked-in CRDs differ from the resource model: {stale:?}\n\
             regenerate them with: IMGFLEET_UPDATE_CRDS=1 cargo test -p imgfleet crds"
        );
    }

    #[test]
    fn crds_carry_names_and_scope() {
        let [rs, repo, cluster] = [
            crd(Kind::RegistrySecret),
            crd(Kind::Repository),
            crd(Kind::Cluster),
        ];
        assert_eq!(rs.spec.names.short_names, Some(vec!["rs".to_owned()]));
        assert_eq!(repo.spec.names.short_names, Some(vec!["repo".to_owned()]));
        assert_eq!(rs.spec.scope, "Namespaced");
        assert_eq!(cluster.spec.scope, "Cluster");
        assert_eq!(
            repo.metadata.name.as_deref(),
            Some("repositories.image.theriseunion.io")
        );
    }
}
