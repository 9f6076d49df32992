//! A real upstream OCI registry (Debian `docker-registry`, CNCF distribution 2.8) on a free
//! loopback port with filesystem storage in a temporary directory: plain HTTP, with
//! htpasswd basic auth, and/or with TLS from a freshly generated CA.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

use crate::process::{ChildGuard, free_port, install_crypto_provider, require_binary};

/// Stands for the port in the config template.
const PORT_PLACEHOLDER: &str = "@PORT@";

/// How long the registry may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How to run the registry. `Default` is plain HTTP without auth.
#[derive(Clone, Default)]
pub struct RegistryOptions {
    /// Require HTTP basic auth with this `(username, password)` (htpasswd, bcrypt).
    pub auth: Option<(String, String)>,
    /// Serve HTTPS with a server certificate for `127.0.0.1` and `localhost`, signed by a
    /// CA generated for this registry (see [`Registry::ca_pem`], [`Registry::ca_dir`]).
    pub tls: bool,
}

impl fmt::Debug for RegistryOptions {
    // The password never appears in Debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryOptions")
            .field(
                "auth",
                &self.auth.as_ref().map(|(u, _)| format!("{u}:<redacted>")),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

impl RegistryOptions {
    /// Plain HTTP, anonymous access.
    pub fn plain() -> Self {
        Self::default()
    }

    /// Basic auth with the given credentials.
    pub fn with_auth(mut self, username: &str, password: &str) -> Self {
        self.auth = Some((username.to_string(), password.to_string()));
        self
    }

    /// Serve HTTPS with a generated CA.
    pub fn with_tls(mut self) -> Self {
        self.tls = true;
        self
    }
}

/// A running registry; killed on drop, its storage removed with its temp dir.
pub struct Registry {
    child: Option<ChildGuard>,
    binary: PathBuf,
    port: u16,
    /// config.yml with [`PORT_PLACEHOLDER`] for the port.
    config: String,
    options: RegistryOptions,
    ca_pem: Option<String>,
    http: reqwest::Client,
    // Held for its Drop; declared last so the process dies before its files go.
    dir: TempDir,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("addr", &self.addr())
            .field("options", &self.options)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Registry {
    crate::process::restartable!("the registry");

    /// Writes a config, htpasswd file and certificates as `options` asks, starts
    /// `docker-registry serve` on a free 127.0.0.1 port, and waits until `GET /v2/`
    /// answers 200 or 401 (at most 20 s).
    pub async fn start(options: RegistryOptions) -> Result<Registry> {
        let binary = require_binary("docker-registry", "docker-registry");
        install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix("imgfleet-registry-")
            .tempdir()
            .context("create registry temp dir")?;
        let port = free_port();
        std::fs::create_dir_all(dir.path().join("storage"))
            .context("create registry storage dir")?;

        let mut tls_yaml = String::new();
        let mut ca_pem = None;
        if options.tls {
            let (ca, cert, key) = generate_tls().context("generate registry TLS certificates")?;
            let ca_dir = dir.path().join("certs");
            std::fs::create_dir_all(&ca_dir).context("create CA dir")?;
            std::fs::write(ca_dir.join("ca.pem"), &ca).context("write ca.pem")?;
            // containers/image (skopeo) only reads `*.crt` files as CAs from a cert dir.
            std::fs::write(ca_dir.join("ca.crt"), &ca).context("write ca.crt")?;
            let tls_dir = dir.path().join("tls");
            std::fs::create_dir_all(&tls_dir).context("create TLS dir")?;
            std::fs::write(tls_dir.join("server.pem"), &cert).context("write server cert")?;
            std::fs::write(tls_dir.join("server.key"), &key).context("write server key")?;
            tls_yaml = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                yaml_str(&tls_dir.join("server.pem")),
                yaml_str(&tls_dir.join("server.key"))
            );
            ca_pem = Some(ca);
        }

        let mut auth_yaml = String::new();
        if let Some((user, pass)) = &options.auth {
            let hash = bcrypt::hash(pass, 5).context("bcrypt the registry password")?;
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, format!("{user}:{hash}\n")).context("write htpasswd")?;
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: imgfleet-test\n    path: {}\n",
                yaml_str(&path)
            );
        }

        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:@PORT@\n  secret: imgfleet-test-secret\n{tls_yaml}\
             {auth_yaml}",
            storage = yaml_str(&dir.path().join("storage")),
        );

        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy();
        if let Some(ca) = &ca_pem {
            let cert =
                reqwest::Certificate::from_pem(ca.as_bytes()).context("parse generated CA")?;
            builder = builder.tls_certs_only([cert]);
        }
        let http = builder
            .build()
            .context("build HTTP client for the registry")?;

        let mut reg = Registry {
            child: None,
            binary,
            port,
            config,
            options,
            ca_pem,
            http,
            dir,
        };
        // Another process may grab a port between free_port() and the registry binding it;
        // then try again on a new one.
        for attempt in 1.. {
            match reg.spawn().await {
                Ok(()) => break,
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    reg.port = free_port();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(reg)
    }

    async fn spawn(&mut self) -> Result<()> {
        let config = self
            .config
            .replace(PORT_PLACEHOLDER, &self.port.to_string());
        std::fs::write(self.dir.path().join("config.yml"), config)
            .context("write registry config.yml")?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve").arg(self.dir.path().join("config.yml"));
        let mut child = ChildGuard::spawn("registry", cmd)?;
        child
            .wait_distribution_api(&self.http, &self.base_url(), READY_TIMEOUT)
            .await?;
        self.child = Some(child);
        Ok(())
    }

    /// `127.0.0.1:PORT`, as used in image references (`127.0.0.1:PORT/repo:tag`).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:PORT/<repo_and_reference>` for skopeo, e.g.
    /// `reg.docker_ref("team/app:v1")` or `reg.docker_ref("team/app@sha256:...")`.
    pub fn docker_ref(&self, repo_and_reference: &str) -> String {
        format!("docker://{}/{repo_and_reference}", self.addr())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    /// True when the registry serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.options.tls
    }

    /// The basic-auth credentials, if the registry requires them.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.options
            .auth
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The PEM of the CA that signed the server certificate (TLS registries only).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// A directory holding the CA as `ca.pem` and `ca.crt` (TLS registries only); pass it to
    /// skopeo's `--src-cert-dir`/`--dest-cert-dir`/`--cert-dir`.
    pub fn ca_dir(&self) -> Option<PathBuf> {
        self.options.tls.then(|| self.dir.path().join("certs"))
    }

    /// The filesystem storage root (`docker/registry/v2/...` lives below it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The log file of the current registry process, if it runs.
    pub fn log_path(&self) -> Option<&Path> {
        self.child.as_ref().map(ChildGuard::log_path)
    }

    /// An HTTP client that trusts this registry's CA (and nothing else when TLS is on). It
    /// does not add credentials by itself; see [`Registry::credentials`].
    pub fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    /// skopeo flags for reading from this registry: `--src-tls-verify=false` or
    /// `--src-cert-dir=DIR`, plus `--src-creds=USER:PASS` when auth is on.
    pub fn skopeo_src_args(&self) -> Vec<String> {
        self.skopeo_flags("src-")
    }

    /// skopeo flags for writing to this registry (`--dest-...`).
    pub fn skopeo_dest_args(&self) -> Vec<String> {
        self.skopeo_flags("dest-")
    }

    /// skopeo flags for `inspect`, `delete` and other one-image commands (`--tls-verify`,
    /// `--cert-dir`, `--creds`).
    pub fn skopeo_args(&self) -> Vec<String> {
        self.skopeo_flags("")
    }

    fn skopeo_flags(&self, prefix: &str) -> Vec<String> {
        let mut args = Vec::new();
        match self.ca_dir() {
            Some(dir) => args.push(format!("--{prefix}cert-dir={}", dir.display())),
            None => args.push(format!("--{prefix}tls-verify=false")),
        }
        if let Some((u, p)) = self.credentials() {
            args.push(format!("--{prefix}creds={u}:{p}"));
        }
        args
    }
}

fn yaml_str(p: &Path) -> String {
    // JSON strings are valid YAML scalars, and this quotes any odd characters in temp paths.
    serde_json::to_string(&p.to_string_lossy()).unwrap_or_default()
}

/// Generates a CA and a server certificate for `127.0.0.1` and `localhost`; returns
/// `(ca_pem, server_cert_pem, server_key_pem)`.
pub fn generate_tls() -> Result<(String, String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "imgfleet test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}
