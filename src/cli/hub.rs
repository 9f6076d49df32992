//! The connection to the hub's AdminService (mTLS), gRPC errors as plain
//! messages, and writing enrolled credentials to disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use imgfleet::api::v1::admin_service_client::AdminServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where the hub is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct Target {
    /// `--hub`.
    pub url: String,
    /// `--credentials`.
    pub credentials: Option<PathBuf>,
}

const CREDENTIALS_HINT: &str = "--credentials (or IMGFLEET_CREDENTIALS) must name a folder holding ca.pem, cert.pem and key.pem; imgfleet-hub prints where its admin bundle is";

fn read_credential(dir: &Path, file: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(file);
    std::fs::read(&path)
        .map_err(|e| anyhow!("cannot read {}: {e}; {CREDENTIALS_HINT}", path.display()))
}

/// Loads the client's CA and identity from the credentials folder.
fn tls_config(target: &Target) -> anyhow::Result<ClientTlsConfig> {
    let Some(dir) = &target.credentials else {
        bail!("no client credentials given: {CREDENTIALS_HINT}");
    };
    let ca = read_credential(dir, "ca.pem")?;
    let cert = read_credential(dir, "cert.pem")?;
    let key = read_credential(dir, "key.pem")?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key)))
}

/// The AdminService client every verb talks through.
pub type Client = AdminServiceClient<Channel>;

/// Opens a channel to the hub and returns an AdminService client on it.
pub async fn connect(target: &Target) -> anyhow::Result<Client> {
    let url = &target.url;
    if !url.starts_with("https://") {
        bail!(
            "--hub {url:?}: expected an https:// URL; the hub's admin API is served over mutual TLS only"
        );
    }
    let tls = tls_config(target)?;
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--hub {url:?}: expected a URL like https://127.0.0.1:7443"))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .tls_config(tls)
        .context("cannot use the client credentials")?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the hub at {url}: {}", error_chain(&e)))?;
    // A fleet's list answers (10,000 Clusters is ~5 MB) pass tonic's 4 MiB
    // default.
    Ok(AdminServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

/// Largest admin answer the CLI accepts.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// An error and its causes on one line, without repeating a cause that its
/// wrapper already quotes.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// Turns a gRPC status into a message about `what` (an object such as
/// `Repository default/nginx`, or a list).
pub fn status_error(status: tonic::Status, what: &str, target: &Target) -> anyhow::Error {
    if status.code() == Code::Unavailable
        && status
            .message()
            .starts_with(imgfleet::api::STORE_UNAVAILABLE)
    {
        // The hub answered; the store's own error may mention a transport
        // error (etcd's), which is not the hub's.
        return anyhow!(status_message(
            status.code(),
            status.message(),
            what,
            &target.url
        ));
    }
    let mut message = status.message().to_owned();
    // Transport failures (TLS alerts, resets) carry the real cause as a source.
    if let Some(source) = std::error::Error::source(&status) {
        let chain = error_chain(source);
        if !message.contains(&chain) {
            message = if message.is_empty() {
                chain
            } else {
                format!("{message}: {chain}")
            };
        }
    }
    if matches!(
        status.code(),
        Code::Unknown | Code::Cancelled | Code::Unavailable
    ) && message.contains("transport error")
    {
        // With TLS 1.3 a refused client certificate only shows on the first call.
        return anyhow!(
            "the connection to the hub at {} failed: {message}; if the hub refused the client certificate, check --credentials",
            target.url
        );
    }
    anyhow!(status_message(status.code(), &message, what, &target.url))
}

/// The message for a gRPC status code; pure so it can be tested.
pub fn status_message(code: Code, message: &str, what: &str, hub: &str) -> String {
    let detail = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    match code {
        Code::NotFound => format!("{what} not found"),
        Code::InvalidArgument => format!("the hub refused {what}{detail}"),
        Code::AlreadyExists => format!("{what} already exists{detail}"),
        // The hub's message says which precondition failed: a stale
        // resourceVersion, or a RegistrySecret still in use.
        Code::FailedPrecondition => format!("the hub refused {what}{detail}"),
        Code::Aborted => {
            format!("{what} was changed by someone else{detail}; get it again and retry")
        }
        Code::PermissionDenied => format!("permission denied for {what}{detail}"),
        Code::Unauthenticated => format!(
            "the hub at {hub} did not accept the client certificate{detail}; check --credentials"
        ),
        Code::Unavailable => match message.strip_prefix(imgfleet::api::STORE_UNAVAILABLE) {
            // The hub answered: it is its policy store (etcd) that does not.
            Some(why) => format!(
                "the hub at {hub} is up, but its policy store is unavailable{why}; \
                 nothing was read or changed: retry once the store is back (the hub's /readyz then answers 200)"
            ),
            None => format!("cannot reach the hub at {hub}{detail}"),
        },
        Code::DeadlineExceeded => format!("the hub at {hub} did not answer in time{detail}"),
        Code::Unimplemented => format!(
            "the hub at {hub} does not support this request{detail}; is it an older version?"
        ),
        Code::ResourceExhausted => format!("the hub at {hub} is overloaded{detail}; retry later"),
        other => format!("the hub failed on {what} ({other:?}){detail}"),
    }
}

const CREDENTIAL_FILES: [&str; 3] = ["ca.pem", "cert.pem", "key.pem"];

/// Creates the output folder (mode 0700) and makes sure no credentials would be overwritten.
pub fn prepare_credentials_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    for file in CREDENTIAL_FILES {
        let path = dir.join(file);
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite credentials: choose another --out or remove it",
                path.display()
            );
        }
    }
    Ok(())
}

/// Writes ca.pem, cert.pem and key.pem (0600) into `dir`, each by temp file,
/// fsync and rename, so a crash never leaves a half-written key behind.
pub fn write_credentials(dir: &Path, ca: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    for (file, contents, mode) in [
        ("ca.pem", ca, 0o644),
        ("cert.pem", cert, 0o644),
        ("key.pem", key, 0o600),
    ] {
        let path = dir.join(file);
        let tmp = dir.join(format!(".{file}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(contents.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}

/// Writes a secret (a pull token) to `path`, mode 0600 from the start, by
/// temp file, fsync and rename.
pub fn write_secret_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "token".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_become_plain_messages() {
        let hub = "https://127.0.0.1:7443";
        let what = "Repository default/x";
        assert_eq!(
            status_message(Code::NotFound, "key not found", what, hub),
            "Repository default/x not found"
        );
        assert_eq!(
            status_message(Code::InvalidArgument, "spec.tag: bad", what, hub),
            "the hub refused Repository default/x: spec.tag: bad"
        );
        assert!(status_message(Code::Aborted, "", what, hub).contains("get it again and retry"));
        assert_eq!(
            status_message(
                Code::FailedPrecondition,
                "still used by Repository default/y",
                what,
                hub
            ),
            "the hub refused Repository default/x: still used by Repository default/y"
        );
        assert_eq!(
            status_message(Code::Unavailable, "connection reset", what, hub),
            "cannot reach the hub at https://127.0.0.1:7443: connection reset"
        );
        assert_eq!(
            status_message(
                Code::Unavailable,
                "policy store unavailable: etcd get on [\"http://127.0.0.1:2379\"]: connection refused",
                what,
                hub
            ),
            "the hub at https://127.0.0.1:7443 is up, but its policy store is unavailable: \
             etcd get on [\"http://127.0.0.1:2379\"]: connection refused; nothing was read or changed: \
             retry once the store is back (the hub's /readyz then answers 200)"
        );
        assert!(
            status_message(Code::Unauthenticated, "", what, hub).contains("check --credentials")
        );
        assert!(
            status_message(Code::PermissionDenied, "tenant a", what, hub)
                .starts_with("permission denied for Repository default/x")
        );
    }

    #[test]
    fn credentials_are_written_privately_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("edge-1");
        prepare_credentials_dir(&dir).expect("creates");
        write_credentials(&dir, "CA", "CERT", "KEY").expect("writes");
        let mode = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o777)
                .expect("stat")
        };
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("key.pem")), 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.join("cert.pem")).expect("read"),
            "CERT"
        );
        let e = prepare_credentials_dir(&dir).expect_err("would overwrite");
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
    }

    #[test]
    fn missing_credentials_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = Target {
            url: "https://127.0.0.1:7443".into(),
            credentials: Some(tmp.path().to_owned()),
        };
        let e = tls_config(&target).expect_err("no files");
        let text = format!("{e:#}");
        assert!(
            text.contains(&tmp.path().join("ca.pem").display().to_string()),
            "{text}"
        );
        assert!(
            text.contains("imgfleet-hub prints where its admin bundle is"),
            "{text}"
        );
        let e = tls_config(&Target {
            url: target.url.clone(),
            credentials: None,
        })
        .expect_err("none");
        assert!(e.to_string().contains("no client credentials given"));
    }
}
