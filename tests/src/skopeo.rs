//! Helpers that run the real `skopeo` (Debian `skopeo`) as an independent OCI client.
//!
//! The functions are async (tokio::process) so that in-process servers and the fault proxy
//! on the same runtime keep running while skopeo talks to them.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::images::sha256_digest;
use crate::process::require_binary;

/// How long one skopeo invocation may take before it is killed.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(300);

/// The skopeo binary; panics with the install hint when missing.
pub fn binary() -> PathBuf {
    require_binary("skopeo", "skopeo")
}

/// Runs `skopeo --insecure-policy <args...>` and returns its stdout. The error carries the
/// exit status and stderr. `--insecure-policy` spares the test a policy.json.
pub async fn run<I, S>(args: I) -> Result<Vec<u8>>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    // Never show passwords given with --creds/--src-creds/--dest-creds.
    let shown = redact_creds(&shown);
    let mut cmd = tokio::process::Command::new(binary());
    cmd.arg("--insecure-policy")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SKOPEO_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("skopeo {shown}: no result after {SKOPEO_TIMEOUT:?}"))?
        .with_context(|| format!("run skopeo {shown}"))?;
    if !out.status.success() {
        bail!(
            "skopeo {shown}: {}\n{}",
            out.status,
            redact_creds(String::from_utf8_lossy(&out.stderr).trim())
        );
    }
    Ok(out.stdout)
}

fn redact_creds(s: &str) -> String {
    s.split(' ')
        .map(|w| match w.split_once("creds=") {
            Some((flag, val)) => {
                let user = val.split(':').next().unwrap_or("");
                format!("{flag}creds={user}:<redacted>")
            }
            None => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `skopeo copy [extra...] SRC DST`, e.g. `copy("docker://127.0.0.1:5000/a:1",
/// "oci:/tmp/x:1", &["--src-tls-verify=false", "--all"])`.
pub async fn copy(src: &str, dst: &str, extra: &[&str]) -> Result<()> {
    let mut args: Vec<&str> = vec!["copy", "--quiet"];
    args.extend_from_slice(extra);
    args.push(src);
    args.push(dst);
    run(args).await.map(drop)
}

/// The raw manifest (or index) of `image_ref` as served: `skopeo inspect --raw`.
pub async fn inspect_raw(image_ref: &str, extra: &[&str]) -> Result<Vec<u8>> {
    let mut args: Vec<&str> = vec!["inspect", "--raw"];
    args.extend_from_slice(extra);
    args.push(image_ref);
    run(args).await
}

/// The digest of the manifest (or index) `image_ref` points at: sha256 of the raw bytes
/// from `skopeo inspect --raw`. `extra` takes `--tls-verify=false`, `--creds`, `--cert-dir`.
pub async fn inspect_digest(image_ref: &str, extra: &[&str]) -> Result<String> {
    Ok(sha256_digest(&inspect_raw(image_ref, extra).await?))
}

/// Lists the tags of a repository: `skopeo list-tags docker://HOST/REPO`.
pub async fn list_tags(repo_ref: &str, extra: &[&str]) -> Result<Vec<String>> {
    let mut args: Vec<&str> = vec!["list-tags"];
    args.extend_from_slice(extra);
    args.push(repo_ref);
    let out = run(args).await?;
    let v: serde_json::Value = serde_json::from_slice(&out)
        .with_context(|| format!("skopeo list-tags {repo_ref}: output is not JSON"))?;
    let tags = v
        .get("Tags")
        .and_then(|t| t.as_array())
        .with_context(|| format!("skopeo list-tags {repo_ref}: no Tags array"))?;
    Ok(tags
        .iter()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect())
}

/// Every blob digest present in an OCI image layout directory (`<dir>/blobs/sha256/*`).
pub fn oci_layout_blobs(layout_dir: &std::path::Path) -> Result<Vec<String>> {
    let dir = layout_dir.join("blobs").join("sha256");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        out.push(format!("sha256:{}", entry.file_name().to_string_lossy()));
    }
    out.sort();
    Ok(out)
}
