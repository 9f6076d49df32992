//! Mutual TLS for the hub's gRPC services and their clients: loading a
//! credentials directory (`ca.pem`, `cert.pem`, `key.pem`), building tonic's
//! server and client TLS configuration, and reading the caller's
//! [`Identity`] from a request.
//!
//! `Request::peer_certs()` is filled only when tonic's own TLS serves the
//! connection (`Server::builder().tls_config(..)`), so servers must use
//! [`TlsMaterial::server_config`] rather than terminating TLS themselves.

use std::fmt;
use std::path::{Path, PathBuf};

use tonic::transport::{
    Certificate, CertificateDer, ClientTlsConfig, Endpoint, Identity as TonicIdentity,
    ServerTlsConfig,
};

use crate::pki::{self, Identity, PkiError};

/// File name of the CA certificate in a credentials directory.
pub const CA_FILE: &str = "ca.pem";
/// File name of the certificate in a credentials directory.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the private key in a credentials directory (mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// Errors of TLS setup and peer identification. None is worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: file not found")]
    Missing { what: &'static str, path: PathBuf },
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("writing credentials: {0}")]
    Write(#[source] PkiError),
    #[error("hub address {url:?}: {reason}")]
    BadEndpoint { url: String, reason: String },
    #[error("connecting to the hub at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection did not present a client certificate (or did not use
    /// tonic's TLS at all).
    #[error("no client certificate presented")]
    NoPeerCertificate,
    /// The client certificate was verified but carries no imgfleet identity.
    #[error("client certificate: {0}")]
    Identity(#[source] PkiError),
}

/// A CA certificate, a certificate and its private key, all PEM. `Debug`
/// never shows the key.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The CA that signs the peer's certificate (client CA for a server,
    /// server CA for a client).
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl TlsMaterial {
    /// Load `ca.pem`, `cert.pem` and `key.pem` from a credentials directory
    /// (an admin bundle, or the directory `imgfleet cluster enroll --out` wrote).
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        Self::from_files(
            &dir.join(CA_FILE),
            &dir.join(CERT_FILE),
            &dir.join(KEY_FILE),
        )
    }

    /// Load and check the three PEM files. Errors name the file and what is
    /// wrong with it.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let ca_pem = read_pem_file(ca, "CA certificate")?;
        let cert_pem = read_pem_file(cert, "certificate")?;
        let key_pem = read_pem_file(key, "private key")?;
        check_certificates(&ca_pem, ca, "CA certificate")?;
        check_certificates(&cert_pem, cert, "certificate")?;
        check_private_key(&key_pem, key)?;
        Ok(Self {
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Write the material as a credentials directory: `ca.pem` and
    /// `cert.pem` mode 0644, `key.pem` mode 0600, each atomically.
    pub fn write_to_dir(&self, dir: &Path) -> Result<(), TlsError> {
        pki::write_public_file(&dir.join(CA_FILE), &self.ca_pem).map_err(TlsError::Write)?;
        pki::write_public_file(&dir.join(CERT_FILE), &self.cert_pem).map_err(TlsError::Write)?;
        pki::write_private_file(&dir.join(KEY_FILE), &self.key_pem).map_err(TlsError::Write)?;
        Ok(())
    }

    /// Server side: present `cert`/`key`, and require every client to present
    /// a certificate signed by `ca`.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(TonicIdentity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
    }

    /// Client side: trust only `ca` for the server and present `cert`/`key`.
    /// `domain` is the name checked against the server certificate; `None`
    /// uses the host of the URL the channel connects to.
    pub fn client_config(&self, domain: Option<&str>) -> ClientTlsConfig {
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(TonicIdentity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(d) = domain {
            cfg = cfg.domain_name(d);
        }
        cfg
    }

    /// An endpoint for `url` (`https://host:port`) using this material as a
    /// client. Call `.connect().await` or `.connect_lazy()` on it.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let bad = |reason: String| TlsError::BadEndpoint {
            url: url.to_string(),
            reason,
        };
        if !url.starts_with("https://") {
            return Err(bad("expected https://HOST:PORT".into()));
        }
        let ep = Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?;
        // The server name to verify is the URL host; IPv6 hosts arrive in
        // brackets which certificate verification does not expect.
        let host = ep
            .uri()
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .ok_or_else(|| bad("expected https://HOST:PORT".into()))?;
        // A hub that vanishes without closing the connection (power cut,
        // cut link) is noticed by HTTP/2 pings rather than after minutes of
        // TCP retransmissions.
        Ok(ep
            .tls_config(self.client_config(Some(&host)))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .tcp_keepalive(Some(std::time::Duration::from_secs(30)))
            .http2_keep_alive_interval(std::time::Duration::from_secs(20))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .keep_alive_while_idle(true))
    }

    /// Connect a channel to `url` now, failing if the hub is unreachable.
    pub async fn connect(&self, url: &str) -> Result<tonic::transport::Channel, TlsError> {
        self.endpoint(url)?
            .connect()
            .await
            .map_err(|source| TlsError::Connect {
                url: url.to_string(),
                source,
            })
    }
}

fn read_pem_file(path: &Path, what: &'static str) -> Result<String, TlsError> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: "expected PEM text".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TlsError::Missing {
            what,
            path: path.to_path_buf(),
        }),
        Err(source) => Err(TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn check_certificates(pem: &str, path: &Path, what: &'static str) -> Result<(), TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let mut found = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| invalid(format!("expected PEM: {e}")))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        x509_parser::parse_x509_certificate(&block.contents)
            .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
        found += 1;
    }
    if found == 0 {
        return Err(invalid("expected a PEM CERTIFICATE block".into()));
    }
    Ok(())
}

fn check_private_key(pem: &str, path: &Path) -> Result<(), TlsError> {
    // Only the labels are inspected: the key bytes never reach an error.
    let ok = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .any(|b| b.label.ends_with("PRIVATE KEY"));
    if ok {
        Ok(())
    } else {
        Err(TlsError::Invalid {
            what: "private key",
            path: path.to_path_buf(),
            reason: "expected a PEM PRIVATE KEY block".into(),
        })
    }
}

/// The identity of the caller of a gRPC request served with tonic's TLS.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<Identity, TlsError> {
    let certs = request.peer_certs();
    identity_from_peer_certs(certs.as_deref().map(Vec::as_slice))
}

/// The identity in the leaf (first) certificate of a verified peer chain.
pub fn identity_from_peer_certs(
    certs: Option<&[CertificateDer<'static>]>,
) -> Result<Identity, TlsError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    pki::identity_from_der(leaf.as_ref()).map_err(TlsError::Identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = TlsMaterial::from_dir(dir.path()).expect_err("empty dir");
        let msg = err.to_string();
        assert!(msg.contains("ca.pem") && msg.contains("not found"), "{msg}");

        let ca = CertificateAuthority::generate().expect("ca");
        let admin = ca.issue_admin("admin", 10).expect("admin");
        std::fs::write(dir.path().join(CA_FILE), ca.cert_pem()).expect("write");
        std::fs::write(dir.path().join(CERT_FILE), &admin.cert_pem).expect("write");
        let msg = TlsMaterial::from_dir(dir.path())
            .expect_err("no key")
            .to_string();
        assert!(msg.contains("key.pem"), "{msg}");

        std::fs::write(dir.path().join(KEY_FILE), "garbage").expect("write");
        let msg = TlsMaterial::from_dir(dir.path())
            .expect_err("bad key")
            .to_string();
        assert!(
            msg.contains("key.pem") && msg.contains("PRIVATE KEY"),
            "{msg}"
        );
    }

    #[test]
    fn round_trip_and_redacted_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate().expect("ca");
        let leaf = ca.issue_cluster("edge-9", 10).expect("leaf");
        let m = TlsMaterial {
            ca_pem: ca.cert_pem().into(),
            cert_pem: leaf.cert_pem.clone(),
            key_pem: leaf.key_pem.clone(),
        };
        m.write_to_dir(dir.path()).expect("write");
        let back = TlsMaterial::from_dir(dir.path()).expect("load");
        assert_eq!(back.key_pem, leaf.key_pem);
        assert!(!format!("{back:?}").contains("PRIVATE"));
        assert!(matches!(
            back.endpoint("http://127.0.0.1:1"),
            Err(TlsError::BadEndpoint { .. })
        ));
        back.endpoint("https://127.0.0.1:7443").expect("endpoint");
        back.endpoint("https://[::1]:7443").expect("endpoint v6");
    }

    #[test]
    fn identity_needs_a_certificate() {
        assert!(matches!(
            identity_from_peer_certs(None),
            Err(TlsError::NoPeerCertificate)
        ));
        assert!(matches!(
            identity_from_peer_certs(Some(&[])),
            Err(TlsError::NoPeerCertificate)
        ));
        let ca = CertificateAuthority::generate().expect("ca");
        let leaf = ca.issue_cluster("edge-3", 10).expect("leaf");
        let der = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes())
            .expect("pem")
            .1
            .contents;
        let certs = vec![CertificateDer::from(der)];
        assert_eq!(
            identity_from_peer_certs(Some(&certs)).expect("identity"),
            Identity::Cluster("edge-3".into())
        );
    }
}
