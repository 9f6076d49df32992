//! The hub as a certificate authority: the TLS material of the gRPC listener,
//! the CA that signs enrolled clusters' certificates, and the development PKI
//! generated under `<data-dir>/pki` (plus an admin bundle in
//! `<data-dir>/admin`) when no TLS flags are given.
//!
//! Files: `pki/ca.pem`, `pki/ca-key.pem` (0600), `pki/server.pem`,
//! `pki/server-key.pem` (0600); `admin/ca.pem`, `admin/cert.pem`,
//! `admin/key.pem` (0600). Later starts reuse them; missing leaves are issued
//! again from the CA.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imgfleet_common::pki::{self, CertificateAuthority, DEFAULT_LEAF_VALIDITY_DAYS, PkiError};
use imgfleet_common::tls::{TlsError, TlsMaterial};

use crate::config::Config;

/// Name of the admin identity in the generated admin bundle.
pub const DEV_ADMIN_NAME: &str = "admin";

/// Errors setting up the hub's PKI. None is worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {setting} {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{setting} {path}: {source}")]
    Pki {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: PkiError,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Writing the generated PKI into the data directory failed.
    #[error(transparent)]
    Write(PkiError),
    #[error("issuing a certificate: {0}")]
    Issue(#[source] PkiError),
    #[error(
        "no CA to issue the server certificate: give --ca-cert/--ca-key or --tls-cert/--tls-key/--client-ca"
    )]
    NoCa,
}

/// The hub's TLS material and, when it has one, its signing CA.
pub struct HubPki {
    /// Server certificate, key and the CA client certificates must chain to.
    pub server: TlsMaterial,
    /// Signs enrolled clusters' certificates; `None` when production flags
    /// give a server certificate but no `--ca-cert/--ca-key`.
    pub ca: Option<Arc<CertificateAuthority>>,
    /// True when this start generated a new CA (first start in development mode).
    pub generated: bool,
    /// The admin bundle directory, in development mode.
    pub admin_dir: Option<PathBuf>,
}

impl fmt::Debug for HubPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubPki")
            .field("server", &self.server)
            .field("ca", &self.ca.as_ref().map(|_| "<ca>"))
            .field("generated", &self.generated)
            .field("admin_dir", &self.admin_dir)
            .finish()
    }
}

impl HubPki {
    /// Load the TLS material named by the configuration, generating the
    /// development PKI for whatever was not given.
    pub fn load_or_init(config: &Config) -> Result<HubPki, CaError> {
        let pki_dir = config.data_dir.join("pki");
        let mut generated = false;

        let ca = match &config.tls.ca {
            Some(files) => {
                let cert = read(&files.cert, "--ca-cert")?;
                let key = read(&files.key, "--ca-key")?;
                Some(
                    CertificateAuthority::from_pem(&cert, &key).map_err(|source| CaError::Pki {
                        setting: "--ca-cert/--ca-key",
                        path: files.cert.clone(),
                        source,
                    })?,
                )
            }
            // With a given server certificate but no signing CA, the hub
            // serves but cannot enroll; generating a CA here would create one
            // nobody trusts.
            None if config.tls.server.is_some() => None,
            None => {
                let (ca, fresh) = load_or_generate_ca(&pki_dir)?;
                generated = fresh;
                Some(ca)
            }
        };

        let server = match &config.tls.server {
            Some(files) => TlsMaterial::from_files(&files.client_ca, &files.cert, &files.key)?,
            None => {
                // Development mode: `ca` is always set on this path.
                let Some(ca) = ca.as_ref() else {
                    return Err(CaError::NoCa);
                };
                let cert_path = pki_dir.join("server.pem");
                let key_path = pki_dir.join("server-key.pem");
                // A new CA invalidates any older server certificate.
                if generated || !cert_path.exists() || !key_path.exists() {
                    let leaf = ca
                        .issue_server(&config.server_names, DEFAULT_LEAF_VALIDITY_DAYS)
                        .map_err(CaError::Issue)?;
                    pki::write_private_file(&key_path, &leaf.key_pem).map_err(CaError::Write)?;
                    pki::write_public_file(&cert_path, &leaf.cert_pem).map_err(CaError::Write)?;
                }
                TlsMaterial {
                    ca_pem: ca.cert_pem().to_string(),
                    cert_pem: read(&cert_path, "server certificate")?,
                    key_pem: read(&key_path, "server key")?,
                }
            }
        };

        // An admin bundle is written whenever this hub holds the CA that
        // clients are checked against, so a fresh install is usable at once.
        let mut admin_dir = None;
        if config.tls.server.is_none()
            && let Some(ca) = ca.as_ref()
        {
            let dir = config.data_dir.join("admin");
            let complete = ["ca.pem", "cert.pem", "key.pem"]
                .iter()
                .all(|f| dir.join(f).exists());
            if generated || !complete {
                let leaf = ca
                    .issue_admin(DEV_ADMIN_NAME, DEFAULT_LEAF_VALIDITY_DAYS)
                    .map_err(CaError::Issue)?;
                TlsMaterial {
                    ca_pem: ca.cert_pem().to_string(),
                    cert_pem: leaf.cert_pem,
                    key_pem: leaf.key_pem,
                }
                .write_to_dir(&dir)?;
            }
            admin_dir = Some(dir);
        }

        Ok(HubPki {
            server,
            ca: ca.map(Arc::new),
            generated,
            admin_dir,
        })
    }
}

fn load_or_generate_ca(pki_dir: &Path) -> Result<(CertificateAuthority, bool), CaError> {
    let cert_path = pki_dir.join("ca.pem");
    let key_path = pki_dir.join("ca-key.pem");
    if cert_path.exists() || key_path.exists() {
        let cert = read(&cert_path, "CA certificate")?;
        let key = read(&key_path, "CA key")?;
        let ca = CertificateAuthority::from_pem(&cert, &key).map_err(|source| CaError::Pki {
            setting: "CA",
            path: cert_path.clone(),
            source,
        })?;
        return Ok((ca, false));
    }
    let ca = CertificateAuthority::generate().map_err(CaError::Issue)?;
    // The key goes first: a crash between the two writes leaves a key
    // without a certificate, which the next start reports instead of
    // silently replacing a CA that clients may already trust.
    pki::write_private_file(&key_path, ca.key_pem()).map_err(CaError::Write)?;
    pki::write_public_file(&cert_path, ca.cert_pem()).map_err(CaError::Write)?;
    Ok((ca, true))
}

fn read(path: &Path, setting: &'static str) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        setting,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgfleet_common::pki::Identity;

    #[test]
    fn first_start_generates_and_later_starts_reuse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = Config::for_data_dir(dir.path());
        let first = HubPki::load_or_init(&cfg).expect("first");
        assert!(first.generated);
        let admin = TlsMaterial::from_dir(&dir.path().join("admin")).expect("admin bundle");
        assert_eq!(
            pki::identity_from_pem(&admin.cert_pem).expect("id"),
            Identity::User(pki::User {
                name: "admin".into(),
                groups: vec![pki::ADMIN_ORGANIZATION.into()],
            })
        );
        #[cfg(unix)]
        for f in ["pki/ca-key.pem", "pki/server-key.pem", "admin/key.pem"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(f))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let second = HubPki::load_or_init(&cfg).expect("second");
        assert!(!second.generated);
        assert_eq!(second.server.ca_pem, first.server.ca_pem);
        assert_eq!(second.server.cert_pem, first.server.cert_pem);
        let admin2 = TlsMaterial::from_dir(&dir.path().join("admin")).expect("admin bundle");
        assert_eq!(admin2.cert_pem, admin.cert_pem);
    }

    #[test]
    fn given_files_are_used_and_errors_name_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::for_data_dir(dir.path());
        cfg.tls.server = Some(crate::config::ServerTlsFiles {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope-key.pem"),
            client_ca: dir.path().join("ca.pem"),
        });
        let msg = HubPki::load_or_init(&cfg).expect_err("missing").to_string();
        assert!(msg.contains("ca.pem"), "{msg}");

        let ca = CertificateAuthority::generate().expect("ca");
        let leaf = ca.issue_server(&[], 10).expect("leaf");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("w");
        std::fs::write(dir.path().join("nope.pem"), &leaf.cert_pem).expect("w");
        std::fs::write(dir.path().join("nope-key.pem"), &leaf.key_pem).expect("w");
        let p = HubPki::load_or_init(&cfg).expect("given");
        assert!(p.ca.is_none() && p.admin_dir.is_none() && !p.generated);
        assert!(!dir.path().join("pki").exists());
    }
}
