//! Tenant-scoped pulls from the mirror, with real processes: a hub, an agent
//! started with `--mirror-auth token` that syncs one image for team-a and one
//! for team-b, and a real containerd configured by `imgfleet-agent hosts-toml
//! --token-file`. With a team-a token containerd pulls team-a's image and
//! fails on team-b's; without a token it pulls nothing. The upstream refuses
//! every connection meanwhile, so nothing can come from anywhere but the
//! mirror. A token for another namespace learns nothing: team-b's repository
//! answers exactly as one that does not exist.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use imgfleet_tests::containerd::Containerd;
use imgfleet_tests::fault::FaultProxy;
use imgfleet_tests::fleet::{
    AgentOptions, AgentProcess, HubOptions, HubProcess, wait_repository_synced, workspace_binary,
};
use imgfleet_tests::images::{ImageSpec, push_image};
use imgfleet_tests::registry::{Registry, RegistryOptions};

const SYNCED_WITHIN: Duration = Duration::from_secs(90);

fn policy(upstream: &str) -> String {
    let mut docs = Vec::new();
    for ns in ["team-a", "team-b"] {
        docs.push(format!(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: RegistrySecret\n\
             metadata: {{name: lab, namespace: {ns}}}\n\
             spec: {{domain: \"{upstream}\", insecure: true}}\n"
        ));
        docs.push(format!(
            "apiVersion: image.theriseunion.io/v1alpha1\nkind: Repository\n\
             metadata: {{name: app, namespace: {ns}}}\n\
             spec: {{repository: {ns}/app, tag: v1, registryRef: {{name: lab}}}}\n"
        ));
    }
    docs.join("---\n")
}

async fn hosts_toml(
    mirror: &str,
    upstream: &str,
    token: Option<&std::path::Path>,
    out: &std::path::Path,
) -> Result<()> {
    let mut cmd = tokio::process::Command::new(workspace_binary("imgfleet-agent")?);
    cmd.args(["hosts-toml", "--mirror"])
        .arg(format!("http://{mirror}"))
        .arg("--upstream")
        .arg(format!("http://{upstream}"))
        .arg("--out-dir")
        .arg(out);
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    let done = cmd.output().await.context("imgfleet-agent hosts-toml")?;
    ensure!(
        done.status.success(),
        "hosts-toml: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_a_token_pulls_team_a_only() -> Result<()> {
    let reg = Registry::start(RegistryOptions::plain()).await?;
    let proxy = FaultProxy::start(reg.addr().parse()?).await?;
    let upstream = proxy.addr().to_string();
    let a = push_image(&reg, "team-a/app", "v1", &ImageSpec::random(&[200_000], 11)).await?;
    push_image(&reg, "team-b/app", "v1", &ImageSpec::random(&[150_000], 12)).await?;

    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();
    cli.apply_yaml(&policy(&upstream)).await?;
    let creds = cli
        .enroll("edge-1", &[], &["team-a", "team-b"], &root.join("edge-1"))
        .await?;
    let agent = AgentProcess::start(AgentOptions {
        extra_args: vec!["--mirror-auth".into(), "token".into()],
        ..AgentOptions::new(vec![hub.url()], &creds, root.join("agent"))
    })
    .await?;
    wait_repository_synced(&cli, "team-a", "app", 1, SYNCED_WITHIN).await?;
    wait_repository_synced(&cli, "team-b", "app", 1, SYNCED_WITHIN).await?;

    let token_file = root.join("team-a.token");
    let token_text = token_file.to_string_lossy().into_owned();
    cli.ok(&[
        "cluster",
        "pull-token",
        "edge-1",
        "--namespace",
        "team-a",
        "--out",
        &token_text,
    ])
    .await?;
    let token = std::fs::read_to_string(&token_file)?;
    // The trail records the token's issue, never the token.
    let trail = cli.ok(&["audit", "-A", "-o", "json"]).await?;
    ensure!(trail.contains("pulltokens") && !trail.contains(token.trim()));

    // Straight to the mirror: no token is 401; a team-a token reads team-a,
    // and team-b's repository answers as one that does not exist.
    let http = reqwest::Client::builder().no_proxy().build()?;
    let url = |path: &str| format!("http://{}/v2/{path}", agent.mirror_addr());
    let status = |r: reqwest::Response| r.status().as_u16();
    ensure!(status(http.get(url("team-a/app/tags/list")).send().await?) == 401);
    let bearer = format!("Bearer {}", token.trim());
    let get = |path: &str| http.get(url(path)).header("Authorization", &bearer).send();
    ensure!(status(get("team-a/app/tags/list").await?) == 200);
    let b = get("team-b/app/tags/list").await?;
    let (b_status, b_body) = (b.status().as_u16(), b.text().await?);
    let none = get("team-c/app/tags/list").await?;
    let (none_status, none_body) = (none.status().as_u16(), none.text().await?);
    ensure!(b_status == 404 && none_status == 404);
    ensure!(
        b_body.replace("team-b", "X") == none_body.replace("team-c", "X"),
        "team-b's repository answers unlike a missing one: {b_body} / {none_body}"
    );
    ensure!(
        status(
            http.get(url(""))
                .header("Authorization", "Bearer imgfleet1.x.y")
                .send()
                .await?
        ) == 401
    );

    // containerd on a node, with and without the token.
    let with_token = root.join("certs.d");
    let without = root.join("certs.d-none");
    hosts_toml(
        &agent.mirror_addr(),
        &upstream,
        Some(&token_file),
        &with_token,
    )
    .await?;
    hosts_toml(&agent.mirror_addr(), &upstream, None, &without).await?;
    let file = with_token.join(&upstream).join("hosts.toml");
    let text = std::fs::read_to_string(&file)?;
    ensure!(
        text.contains("Authorization = \"Bearer imgfleet1."),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        ensure!(std::fs::metadata(&file)?.permissions().mode() & 0o777 == 0o600);
    }

    // Only the mirror can answer from now on.
    proxy.set_refuse(true);
    let node = Containerd::start().await?;
    let team_a = format!("{upstream}/team-a/app:v1");
    let team_b = format!("{upstream}/team-b/app:v1");
    node.pull(&team_a, &with_token).await?;
    ensure!(node.image_digest(&team_a).await? == a.manifest_digest);
    ensure!(
        node.pull(&team_b, &with_token).await.is_err(),
        "team-b's image was pulled with a team-a token"
    );
    drop(node);
    let node = Containerd::start().await?;
    ensure!(
        node.pull(&team_a, &without).await.is_err(),
        "an image was pulled without a token"
    );
    Ok(())
}
