//! The YAML of the objects tests apply, written in one place: the seed's own
//! RegistrySecret and Repository pointed at a harness registry, and short RegistrySecrets
//! and Repositories in `default` for everything else.
//!
//! ```text
//! cli.apply_yaml(&policy::objects(&[
//!     policy::registry_secret("harbor-prod", &registry.addr(), Some(("admin", "Harbor12345"))),
//!     policy::repository("app", "library/app", "v1", "harbor-prod", "  syncInterval: 10s\n"),
//! ])).await?;
//! ```

/// The seed's quickstart RegistrySecret, byte for byte (the model's tests check it against
/// the seed document).
pub const SEED_REGISTRY_SECRET: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../src/model/testdata/seed-quickstart-registrysecret.yaml"
));

/// The seed's quickstart Repository, byte for byte: `default/nginx-latest` of
/// `library/nginx:latest` through `harbor-prod`, without placement.
pub const SEED_REPOSITORY: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../src/model/testdata/seed-quickstart-repository.yaml"
));

/// The seed's RegistrySecret (`default/harbor-prod`, user `admin`, password `Harbor12345`)
/// with only `domain` pointed at `domain` and `insecure: true` (plain HTTP) added.
///
/// # Panics
/// If the seed's domain line is not found: the seed file is a constant of this crate.
pub fn seed_registry_secret(domain: &str) -> String {
    let secret = SEED_REGISTRY_SECRET.replace(
        "domain: \"harbor.example.com\"",
        &format!("domain: \"{domain}\"\n  insecure: true"),
    );
    assert_ne!(
        secret, SEED_REGISTRY_SECRET,
        "the seed's domain line was found"
    );
    secret
}

/// A RegistrySecret `default/<name>` for the plain-HTTP registry at `domain`, anonymous or
/// with `(username, password)`.
pub fn registry_secret(name: &str, domain: &str, credentials: Option<(&str, &str)>) -> String {
    let login = credentials
        .map(|(user, password)| format!(", username: {user}, password: {password}"))
        .unwrap_or_default();
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\n\
         kind: RegistrySecret\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec: {{domain: \"{domain}\"{login}, insecure: true}}\n"
    )
}

/// A Repository `default/<name>` of `repository:tag` through the RegistrySecret `registry`,
/// with `more` appended to its `spec` (whole lines, indented by two spaces).
pub fn repository(name: &str, repository: &str, tag: &str, registry: &str, more: &str) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\n\
         kind: Repository\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  \
           repository: {repository}\n  \
           tag: \"{tag}\"\n  \
           registryRef: {{name: {registry}}}\n\
         {more}"
    )
}

/// Several objects as one multi-document YAML input.
pub fn objects(documents: &[String]) -> String {
    documents.join("---\n")
}
