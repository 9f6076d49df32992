//! Hand-written `Debug` for the wire messages that carry a registry password
//! (build.rs skips their derived `Debug`): the password prints as
//! `<redacted>` when set, so a logged request never leaks it.

use std::fmt;

use crate::api::v1::{RegistryCredential, RegistrySecretSpec};

fn redacted(password: &str) -> &'static str {
    if password.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

impl fmt::Debug for RegistrySecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrySecretSpec")
            .field("domain", &self.domain)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("provider", &self.provider)
            .field("insecure", &self.insecure)
            .field("password_set", &self.password_set)
            .finish()
    }
}

impl fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("key", &self.key)
            .field("domain", &self.domain)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("insecure", &self.insecure)
            .field("provider", &self.provider)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::api::v1 as pb;

    #[test]
    fn debug_of_wire_messages_never_shows_a_password() {
        let spec = pb::RegistrySecretSpec {
            domain: "harbor.example.com".into(),
            username: "admin".into(),
            password: "Harbor12345".into(),
            ..Default::default()
        };
        let request = pb::ApplyRequest {
            object: Some(pb::Object {
                kind: Some(pb::object::Kind::RegistrySecret(pb::RegistrySecret {
                    spec: Some(spec),
                    ..Default::default()
                })),
            }),
            dry_run: false,
        };
        let shown = format!("{request:?}");
        assert!(!shown.contains("Harbor12345"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");

        let set = pb::DesiredSet {
            registries: vec![pb::RegistryCredential {
                password: "s3cret".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let shown = format!("{set:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
