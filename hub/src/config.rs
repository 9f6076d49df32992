//! The hub's configuration: flags with environment fallbacks, parsed by one
//! pure function ([`Config::parse`]) that tests call with plain lists and maps.
//! Bad configuration is a [`ConfigError`] naming the setting; `main` turns it
//! into exit code 64.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::Parser;
use zeroize::Zeroizing;

/// Default address of the gRPC listener (admin and agent APIs).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
/// Default address of the metrics and health listener.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Default `--offline-after`.
pub const DEFAULT_OFFLINE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./hub-data";
/// Default etcd key prefix.
pub const DEFAULT_ETCD_PREFIX: &str = "/imgfleet";

/// The command line. Every flag is optional here; defaults and environment
/// fallbacks are applied in [`Config::parse`] so that parsing stays pure.
#[derive(Debug, Parser)]
#[command(
    name = "imgfleet-hub",
    version,
    about = "The imgfleet hub: fleet policy, admin API and agent API over mTLS"
)]
struct Cli {
    /// gRPC listen address HOST:PORT (admin and agent APIs) [env: IMGFLEET_HUB_LISTEN] [default: 127.0.0.1:7443]
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Directory for the embedded store, the secret key and the development PKI [env: IMGFLEET_HUB_DATA_DIR] [default: ./hub-data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Comma-separated etcd endpoints (http://HOST:PORT); without it the embedded store <data-dir>/policy.redb is used [env: IMGFLEET_ETCD_ENDPOINTS]
    #[arg(long, value_name = "URL,...")]
    etcd_endpoints: Option<String>,
    /// Key prefix in etcd [env: IMGFLEET_ETCD_PREFIX] [default: /imgfleet]
    #[arg(long, value_name = "PREFIX")]
    etcd_prefix: Option<String>,
    /// Metrics and health listen address HOST:PORT, or "off" [env: IMGFLEET_METRICS_LISTEN] [default: 127.0.0.1:9464]
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    /// File holding the secret encryption keyring, created with mode 0600 on first start [env: IMGFLEET_SECRET_KEY_FILE] [default: <data-dir>/secret.key]
    #[arg(long, value_name = "FILE")]
    secret_key_file: Option<PathBuf>,
    /// The secret encryption key as 64 hex digits, instead of a key file. Prefer the environment variable IMGFLEET_SECRET_KEY: flags are visible in the process list
    #[arg(long, value_name = "HEX", hide_env_values = true)]
    secret_key: Option<String>,
    /// Server certificate (PEM) for the gRPC listener; needs --tls-key and --client-ca [env: IMGFLEET_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert [env: IMGFLEET_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to [env: IMGFLEET_CLIENT_CA]
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// CA certificate (PEM) used to sign enrolled clusters' certificates; needs --ca-key [env: IMGFLEET_CA_CERT]
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --ca-cert [env: IMGFLEET_CA_KEY]
    #[arg(long, value_name = "FILE")]
    ca_key: Option<PathBuf>,
    /// Extra DNS name or IP address for the generated server certificate (repeatable) [env: IMGFLEET_SERVER_NAMES, comma-separated]
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Log format: text or json [env: IMGFLEET_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Mark a cluster Offline when nothing was heard from its agent for this long, e.g. 30s [env: IMGFLEET_OFFLINE_AFTER] [default: 30s]
    #[arg(long, value_name = "DURATION")]
    offline_after: Option<String>,
    /// Delete audit records older than this, e.g. 90d [env: IMGFLEET_AUDIT_RETENTION] [default: 90d]
    #[arg(long, value_name = "DURATION")]
    audit_retention: Option<String>,
    /// Lifetime of cluster certificates issued by enrollment and renewal, e.g. 30d; agents renew after two thirds of it [env: IMGFLEET_CLUSTER_CERT_LIFETIME] [default: 30d]
    #[arg(long, value_name = "DURATION")]
    cluster_cert_lifetime: Option<String>,
}

/// Where policy is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded redb file.
    Embedded { path: PathBuf },
    /// An etcd cluster.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

/// Where the key that encrypts RegistrySecret passwords comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretKeySource {
    /// A keyring file, created on first start.
    File(PathBuf),
    /// A raw 32-byte key given by flag or environment.
    Raw(Zeroizing<Vec<u8>>),
}

impl fmt::Debug for SecretKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretKeySource::File(p) => f.debug_tuple("File").field(p).finish(),
            SecretKeySource::Raw(_) => f.write_str("Raw(<redacted>)"),
        }
    }
}

/// TLS material given by flags. Anything not given is generated under
/// `<data-dir>/pki` (development mode).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    /// `--tls-cert`, `--tls-key`, `--client-ca`: all three or none.
    pub server: Option<ServerTlsFiles>,
    /// `--ca-cert`, `--ca-key`: both or neither.
    pub ca: Option<CaFiles>,
}

/// The gRPC listener's certificate, key and client CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// The signing CA for enrollments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The hub's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    /// `None` when metrics are switched off.
    pub metrics_listen: Option<SocketAddr>,
    pub secret_key: SecretKeySource,
    pub tls: TlsFiles,
    pub server_names: Vec<String>,
    pub log_format: LogFormat,
    /// Silence after which a cluster is shown Offline (`--offline-after`).
    pub offline_after: std::time::Duration,
    /// How long audit records are kept (`--audit-retention`).
    pub audit_retention: std::time::Duration,
    /// Lifetime of cluster certificates (`--cluster-cert-lifetime`).
    pub cluster_cert_lifetime: std::time::Duration,
}

/// Why the configuration was refused, or that help/version was asked for.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--help` or `--version`: print the text and exit 0.
    #[error("{0}")]
    Display(String),
    /// Unknown flag, missing value and the like (clap's message names the flag).
    #[error(transparent)]
    Usage(clap::Error),
    /// A setting with a bad value.
    #[error("{setting} {value:?}: {expected}")]
    Invalid {
        setting: &'static str,
        value: String,
        expected: String,
    },
}

impl ConfigError {
    fn invalid(
        setting: &'static str,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            setting,
            value: value.into(),
            expected: expected.into(),
        }
    }
}

impl Config {
    /// A configuration for tests and embedding: everything on loopback with
    /// OS-chosen ports, embedded store and development PKI under `data_dir`.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        let loopback0 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Config {
            listen: loopback0,
            data_dir: data_dir.to_path_buf(),
            store: StoreConfig::Embedded {
                path: data_dir.join("policy.redb"),
            },
            metrics_listen: Some(loopback0),
            secret_key: SecretKeySource::File(data_dir.join("secret.key")),
            tls: TlsFiles::default(),
            server_names: Vec::new(),
            log_format: LogFormat::Text,
            offline_after: DEFAULT_OFFLINE_AFTER,
            audit_retention: crate::audit::DEFAULT_RETENTION,
            cluster_cert_lifetime: DEFAULT_CLUSTER_CERT_LIFETIME,
        }
    }

    /// Parse flags (`args[0]` is the program name) with environment
    /// fallbacks from `env`. Flags win over the environment. Each setting is
    /// read by one function below, which names it in its errors.
    pub fn parse<I, S>(args: I, env: &HashMap<String, String>) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|e| {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    ConfigError::Display(e.to_string())
                }
                _ => ConfigError::Usage(e),
            }
        })?;
        let env = Env(env);
        let listen_raw = env
            .or(cli.listen, "IMGFLEET_HUB_LISTEN")
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = parse_addr("--listen", &listen_raw)?;
        let data_dir = data_dir(&env, cli.data_dir)?;
        let store = store(&env, cli.etcd_endpoints, cli.etcd_prefix, &data_dir)?;
        let metrics_listen = metrics_listen(&env, cli.metrics_listen, listen)?;
        let secret_key = secret_key(&env, cli.secret_key_file, cli.secret_key, &data_dir)?;
        let tls = TlsFiles {
            server: server_tls(&env, cli.tls_cert, cli.tls_key, cli.client_ca)?,
            ca: ca_files(&env, cli.ca_cert, cli.ca_key)?,
        };
        let server_names = server_names(&env, cli.server_names)?;
        let log_format = log_format(&env, cli.log_format)?;
        let offline_after = offline_after(&env, cli.offline_after)?;
        let audit_retention = audit_retention(&env, cli.audit_retention)?;
        let cluster_cert_lifetime = cluster_cert_lifetime(&env, cli.cluster_cert_lifetime)?;
        Ok(Config {
            cluster_cert_lifetime,
            offline_after,
            audit_retention,
            listen,
            data_dir,
            store,
            metrics_listen,
            secret_key,
            tls,
            server_names,
            log_format,
        })
    }
}

/// The environment fallbacks: a flag wins, and an empty variable counts as
/// unset.
struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn get(&self, var: &str) -> Option<String> {
        self.0.get(var).filter(|v| !v.is_empty()).cloned()
    }

    /// The flag's value, else the variable's.
    fn or(&self, flag: Option<String>, var: &str) -> Option<String> {
        flag.or_else(|| self.get(var))
    }

    fn path_or(&self, flag: Option<PathBuf>, var: &str) -> Option<PathBuf> {
        flag.or_else(|| self.get(var).map(PathBuf::from))
    }
}

fn data_dir(env: &Env, flag: Option<PathBuf>) -> Result<PathBuf, ConfigError> {
    let data_dir = env
        .path_or(flag, "IMGFLEET_HUB_DATA_DIR")
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    if data_dir.as_os_str().is_empty() {
        return Err(ConfigError::invalid("--data-dir", "", "a directory path"));
    }
    Ok(data_dir)
}

/// etcd when endpoints are given, else the embedded store in `data_dir`.
fn store(
    env: &Env,
    endpoints: Option<String>,
    prefix: Option<String>,
    data_dir: &Path,
) -> Result<StoreConfig, ConfigError> {
    let prefix = env
        .or(prefix, "IMGFLEET_ETCD_PREFIX")
        .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.into());
    let Some(raw) = env.or(endpoints, "IMGFLEET_ETCD_ENDPOINTS") else {
        return Ok(StoreConfig::Embedded {
            path: data_dir.join("policy.redb"),
        });
    };
    let endpoints = parse_endpoints(&raw)?;
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
        return Err(ConfigError::invalid(
            "--etcd-prefix",
            prefix,
            "a key prefix like /imgfleet (starts with '/', does not end with '/')",
        ));
    }
    Ok(StoreConfig::Etcd { endpoints, prefix })
}

/// `None` for "off"; never the gRPC listener's address.
fn metrics_listen(
    env: &Env,
    flag: Option<String>,
    listen: SocketAddr,
) -> Result<Option<SocketAddr>, ConfigError> {
    let raw = env
        .or(flag, "IMGFLEET_METRICS_LISTEN")
        .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.into());
    if raw == "off" {
        return Ok(None);
    }
    let addr = parse_addr("--metrics-listen", &raw)?;
    if addr == listen && listen.port() != 0 {
        return Err(ConfigError::invalid(
            "--metrics-listen",
            raw,
            "an address different from --listen",
        ));
    }
    Ok(Some(addr))
}

/// A key file or a raw key, not both; by default `<data-dir>/secret.key`.
fn secret_key(
    env: &Env,
    file: Option<PathBuf>,
    hex: Option<String>,
    data_dir: &Path,
) -> Result<SecretKeySource, ConfigError> {
    let file = env.path_or(file, "IMGFLEET_SECRET_KEY_FILE");
    let hex = env.or(hex, "IMGFLEET_SECRET_KEY");
    match (file, hex) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            "--secret-key",
            "<redacted>",
            "either --secret-key (IMGFLEET_SECRET_KEY) or --secret-key-file, not both",
        )),
        (Some(f), None) => Ok(SecretKeySource::File(f)),
        (None, Some(hex)) => Ok(SecretKeySource::Raw(parse_key_hex(hex)?)),
        (None, None) => Ok(SecretKeySource::File(data_dir.join("secret.key"))),
    }
}

/// `--tls-cert`, `--tls-key` and `--client-ca`: all three or none.
fn server_tls(
    env: &Env,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<ServerTlsFiles>, ConfigError> {
    let cert = env.path_or(cert, "IMGFLEET_TLS_CERT");
    let key = env.path_or(key, "IMGFLEET_TLS_KEY");
    let client_ca = env.path_or(client_ca, "IMGFLEET_CLIENT_CA");
    match (cert, key, client_ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(client_ca)) => Ok(Some(ServerTlsFiles {
            cert,
            key,
            client_ca,
        })),
        (cert, key, ca) => {
            let missing: Vec<&str> = [
                (cert.is_none(), "--tls-cert"),
                (key.is_none(), "--tls-key"),
                (ca.is_none(), "--client-ca"),
            ]
            .iter()
            .filter(|(m, _)| *m)
            .map(|(_, n)| *n)
            .collect();
            Err(ConfigError::invalid(
                "--tls-cert/--tls-key/--client-ca",
                format!("missing {}", missing.join(", ")),
                "all three together, or none for a generated development PKI",
            ))
        }
    }
}

/// `--ca-cert` and `--ca-key`: both or neither.
fn ca_files(
    env: &Env,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<CaFiles>, ConfigError> {
    match (
        env.path_or(cert, "IMGFLEET_CA_CERT"),
        env.path_or(key, "IMGFLEET_CA_KEY"),
    ) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(CaFiles { cert, key })),
        (Some(_), None) => Err(ConfigError::invalid(
            "--ca-key",
            "",
            "the CA private key file, required with --ca-cert",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            "--ca-cert",
            "",
            "the CA certificate file, required with --ca-key",
        )),
    }
}

/// Repeated flags, or the comma-separated variable; each a DNS name or an
/// IP address.
fn server_names(env: &Env, flags: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut names = flags;
    if names.is_empty()
        && let Some(v) = env.get("IMGFLEET_SERVER_NAMES")
    {
        names = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
    }
    for n in &names {
        let ok = n.parse::<IpAddr>().is_ok()
            || (!n.is_empty()
                && n.len() <= 253
                && n.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                }));
        if !ok {
            return Err(ConfigError::invalid(
                "--server-name",
                n.clone(),
                "a DNS name or IP address",
            ));
        }
    }
    Ok(names)
}

fn log_format(env: &Env, flag: Option<String>) -> Result<LogFormat, ConfigError> {
    match env.or(flag, "IMGFLEET_LOG_FORMAT").as_deref() {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(ConfigError::invalid("--log-format", other, "text or json")),
    }
}

fn offline_after(env: &Env, flag: Option<String>) -> Result<std::time::Duration, ConfigError> {
    match env.or(flag, "IMGFLEET_OFFLINE_AFTER") {
        None => Ok(DEFAULT_OFFLINE_AFTER),
        Some(raw) => imgfleet::model::parse_duration(&raw)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ConfigError::invalid("--offline-after", raw, "a duration like 30s or 2m")
            }),
    }
}

/// Default `--cluster-cert-lifetime`.
pub const DEFAULT_CLUSTER_CERT_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);
/// The shortest `--cluster-cert-lifetime`: renewal at two thirds of it must
/// leave the agent time to reach a hub.
const MIN_CLUSTER_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

fn cluster_cert_lifetime(
    env: &Env,
    flag: Option<String>,
) -> Result<std::time::Duration, ConfigError> {
    match env.or(flag, "IMGFLEET_CLUSTER_CERT_LIFETIME") {
        None => Ok(DEFAULT_CLUSTER_CERT_LIFETIME),
        Some(raw) => imgfleet::model::parse_duration(&raw)
            .ok()
            .filter(|d| {
                *d >= MIN_CLUSTER_CERT_LIFETIME
                    && d.as_secs()
                        <= u64::from(imgfleet_common::pki::MAX_LEAF_VALIDITY_DAYS) * 86_400
            })
            .ok_or_else(|| {
                ConfigError::invalid(
                    "--cluster-cert-lifetime",
                    raw,
                    "a duration from 30s to 3650d, like 30d or 2m",
                )
            }),
    }
}

fn audit_retention(env: &Env, flag: Option<String>) -> Result<std::time::Duration, ConfigError> {
    match env.or(flag, "IMGFLEET_AUDIT_RETENTION") {
        None => Ok(crate::audit::DEFAULT_RETENTION),
        Some(raw) => imgfleet::model::parse_duration(&raw)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ConfigError::invalid("--audit-retention", raw, "a duration like 90d or 720h")
            }),
    }
}

/// HOST:PORT where HOST is an IP address, `[v6]` or `localhost`. Names other
/// than localhost are refused so that parsing needs no DNS.
fn parse_addr(setting: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    let expected = "expected HOST:PORT with an IP address or localhost, e.g. 127.0.0.1:7443";
    if let Ok(a) = raw.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = raw.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(ConfigError::invalid(setting, raw, expected))
}

fn parse_endpoints(raw: &str) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for ep in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let rest = ep
            .strip_prefix("http://")
            .or_else(|| ep.strip_prefix("https://"))
            .unwrap_or(ep);
        let hostport_ok = rest
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
        if !hostport_ok || rest.contains('/') {
            return Err(ConfigError::invalid(
                "--etcd-endpoints",
                raw,
                format!("endpoint {ep:?}: expected http://HOST:PORT, comma-separated"),
            ));
        }
        out.push(ep.to_string());
    }
    if out.is_empty() {
        return Err(ConfigError::invalid(
            "--etcd-endpoints",
            raw,
            "at least one http://HOST:PORT",
        ));
    }
    Ok(out)
}

fn parse_key_hex(hex: String) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    let hex = Zeroizing::new(hex);
    match ::hex::decode(hex.trim()) {
        Ok(bytes) if bytes.len() == 32 => Ok(Zeroizing::new(bytes)),
        Ok(mut bytes) => {
            zeroize::Zeroize::zeroize(&mut bytes);
            Err(ConfigError::invalid(
                "--secret-key",
                "<redacted>",
                "64 hex digits (a 32-byte AES-256 key)",
            ))
        }
        Err(_) => Err(ConfigError::invalid(
            "--secret-key",
            "<redacted>",
            "64 hex digits (a 32-byte AES-256 key)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut all = vec!["imgfleet-hub"];
        all.extend_from_slice(args);
        Config::parse(all, &env)
    }

    #[test]
    fn defaults() {
        let c = parse(&[], &[]).expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:7443");
        assert_eq!(c.data_dir, PathBuf::from("./hub-data"));
        assert_eq!(
            c.store,
            StoreConfig::Embedded {
                path: PathBuf::from("./hub-data/policy.redb")
            }
        );
        assert_eq!(
            c.metrics_listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9464")
        );
        assert_eq!(
            c.secret_key,
            SecretKeySource::File(PathBuf::from("./hub-data/secret.key"))
        );
        assert_eq!(c.tls, TlsFiles::default());
        assert_eq!(c.cluster_cert_lifetime, DEFAULT_CLUSTER_CERT_LIFETIME);
        assert_eq!(c.audit_retention, crate::audit::DEFAULT_RETENTION);
        let c = parse(
            &["--cluster-cert-lifetime", "2m"],
            &[("IMGFLEET_AUDIT_RETENTION", "7d")],
        )
        .expect("lifetimes");
        assert_eq!(c.cluster_cert_lifetime, std::time::Duration::from_secs(120));
        assert_eq!(
            c.audit_retention,
            std::time::Duration::from_secs(7 * 24 * 3600)
        );
    }

    #[test]
    fn flags_env_and_precedence() {
        let c = parse(
            &[
                "--listen",
                "0.0.0.0:8443",
                "--etcd-endpoints",
                "http://127.0.0.1:2379,127.0.0.1:2380",
            ],
            &[
                ("IMGFLEET_HUB_LISTEN", "127.0.0.1:1"),
                ("IMGFLEET_ETCD_PREFIX", "/fleet"),
            ],
        )
        .expect("parse");
        assert_eq!(c.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(
            c.store,
            StoreConfig::Etcd {
                endpoints: vec!["http://127.0.0.1:2379".into(), "127.0.0.1:2380".into()],
                prefix: "/fleet".into()
            }
        );
        let key = "ab".repeat(32);
        let c = parse(
            &["--metrics-listen", "off"],
            &[("IMGFLEET_SECRET_KEY", &key)],
        )
        .expect("parse");
        assert_eq!(c.metrics_listen, None);
        assert!(matches!(c.secret_key, SecretKeySource::Raw(ref k) if k.len() == 32));
        assert!(!format!("{c:?}").contains(&key));
    }

    /// Each bad setting is refused with an error naming it.
    #[test]
    fn bad_settings_are_named() {
        // (flags, environment, text the error must contain)
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                &["--listen", "abc"],
                &[],
                "--listen \"abc\": expected HOST:PORT",
            ),
            (&["--listen", "127.0.0.1:99999"], &[], "--listen"),
            (&[], &[("IMGFLEET_HUB_LISTEN", "nope")], "--listen \"nope\""),
            (&["--metrics-listen", "x:y"], &[], "--metrics-listen"),
            (&["--etcd-endpoints", "http://h"], &[], "--etcd-endpoints"),
            (&["--etcd-endpoints", ","], &[], "--etcd-endpoints"),
            (
                &["--etcd-endpoints", "h:1", "--etcd-prefix", "x"],
                &[],
                "--etcd-prefix",
            ),
            (&["--secret-key", "zz"], &[], "--secret-key"),
            (
                &["--secret-key", "ab", "--secret-key-file", "/k"],
                &[],
                "--secret-key",
            ),
            (&["--tls-cert", "/c"], &[], "missing --tls-key, --client-ca"),
            (&["--ca-cert", "/c"], &[], "--ca-key"),
            (&["--server-name", "a b"], &[], "--server-name"),
            (&["--log-format", "xml"], &[], "--log-format"),
            (&["--no-such-flag"], &[], "--no-such-flag"),
            (
                &["--cluster-cert-lifetime", "10s"],
                &[],
                "--cluster-cert-lifetime \"10s\": a duration from 30s",
            ),
            (
                &[],
                &[("IMGFLEET_CLUSTER_CERT_LIFETIME", "soon")],
                "--cluster-cert-lifetime",
            ),
            (&["--audit-retention", "0s"], &[], "--audit-retention"),
        ];
        for (args, env, want) in cases {
            let err = parse(args, env).expect_err(&format!("{args:?} must fail"));
            let msg = err.to_string();
            assert!(msg.contains(want), "{args:?}: {msg:?} lacks {want:?}");
        }
        let msg = parse(&["--secret-key", "0123456789"], &[])
            .expect_err("short")
            .to_string();
        assert!(!msg.contains("0123456789"), "{msg}");
    }
}
