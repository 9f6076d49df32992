//! Who may do what, end to end with real processes (a hub on etcd and one on
//! the embedded store, the `imgfleet` CLI): a user issued by `imgfleet user
//! issue` and bound as editor in team-a applies there, is refused with the
//! one message in team-b and for enrollment, `auth can-i` agrees, and the
//! audit trail (`imgfleet audit -o json`) holds the allowed and denied calls,
//! no password, and survives a SIGKILL of the hub.

use anyhow::{Context, Result, bail, ensure};
use imgfleet_tests::Etcd;
use imgfleet_tests::fleet::{Cli, HubOptions, HubProcess};

const PASSWORD: &str = "Hunter2-Never-Logged";

fn secret(ns: &str) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\n\
         kind: RegistrySecret\n\
         metadata: {{name: harbor-prod, namespace: {ns}}}\n\
         spec: {{domain: harbor.example.com, username: robot, password: \"{PASSWORD}\"}}\n"
    )
}

fn repo(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: image.theriseunion.io/v1alpha1\n\
         kind: Repository\n\
         metadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{repository: library/nginx, tag: latest, registryRef: {{name: harbor-prod}}}}\n"
    )
}

const BINDING: &str = "apiVersion: image.theriseunion.io/v1alpha1
kind: RoleBinding
metadata: {name: team-a-devs, namespace: team-a}
spec:
  role: editor
  subjects: [{kind: Group, name: dev}]
";

/// Runs the CLI expecting a refusal whose message says `message`.
async fn refused(cli: &Cli, args: &[&str], message: &str) -> Result<()> {
    let out = cli.run(args).await?;
    ensure!(
        !out.success(),
        "imgfleet {args:?} succeeded: {}",
        out.stdout
    );
    ensure!(
        out.stderr.contains(message),
        "imgfleet {args:?}: expected {message:?} in: {}",
        out.stderr
    );
    Ok(())
}

async fn scenario(mut hub: HubProcess, root: &std::path::Path) -> Result<()> {
    let admin = hub.cli();
    let user_dir = root.join("user-a");
    let user_dir_text = user_dir.to_string_lossy().into_owned();
    admin
        .ok(&[
            "user",
            "issue",
            "user-a",
            "--group",
            "dev",
            "--out",
            &user_dir_text,
        ])
        .await?;
    admin.apply_yaml(BINDING).await?;
    admin.apply_yaml(&secret("team-b")).await?;
    admin.apply_yaml(&repo("team-b", "b-app")).await?;
    let rbs = admin.ok(&["get", "rolebindings", "-A"]).await?;
    ensure!(
        rbs.contains("team-a-devs") && rbs.contains("editor") && rbs.contains("Group/dev"),
        "{rbs}"
    );

    let user = Cli::new(&hub.url(), &user_dir);
    user.apply_yaml(&secret("team-a")).await?;
    user.apply_yaml(&repo("team-a", "a-app")).await?;
    let repo_file = root.join("team-b.yaml");
    std::fs::write(&repo_file, repo("team-b", "sneaky"))?;
    let repo_file = repo_file.to_string_lossy().into_owned();
    refused(
        &user,
        &["apply", "-f", &repo_file],
        "user-a may not apply repositories in namespace team-b",
    )
    .await?;
    refused(
        &user,
        &["get", "repository", "b-app", "-n", "team-b"],
        "user-a may not get repositories in namespace team-b",
    )
    .await?;
    let creds = root.join("edge-9").to_string_lossy().into_owned();
    refused(
        &user,
        &["cluster", "enroll", "edge-9", "--out", &creds],
        "user-a may not enroll clusters",
    )
    .await?;
    // A list across namespaces shows only team-a's.
    let listed = user.ok(&["get", "repositories", "-A"]).await?;
    ensure!(
        listed.contains("a-app") && !listed.contains("b-app"),
        "{listed}"
    );
    // can-i answers yes (exit 0) or no (exit 1).
    let yes = user
        .run(&["auth", "can-i", "apply", "repositories", "-n", "team-a"])
        .await?;
    ensure!(yes.success() && yes.stdout.trim() == "yes", "{yes:?}");
    let no = user
        .run(&["auth", "can-i", "apply", "repositories", "-n", "team-b"])
        .await?;
    ensure!(!no.success() && no.stdout.trim() == "no", "{no:?}");

    // The trail survives a SIGKILL of the hub.
    hub.kill();
    hub.restart().await?;
    let json = admin.ok(&["audit", "-A", "-o", "json"]).await?;
    ensure!(!json.contains(PASSWORD), "a password in the audit trail");
    let events: Vec<serde_json::Value> = json
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("audit -o json writes JSON lines")?;
    let find = |verb: &str, ns: &str, code: u64| {
        events.iter().any(|e| {
            e["apiVersion"] == "audit.k8s.io/v1"
                && e["user"]["username"] == "user-a"
                && e["verb"] == verb
                && e["objectRef"]["namespace"] == ns
                && e["responseStatus"]["code"] == code
        })
    };
    ensure!(find("apply", "team-a", 200), "user-a's apply: {json}");
    ensure!(
        find("apply", "team-b", 403),
        "user-a's denied apply: {json}"
    );
    ensure!(find("get", "team-b", 403), "user-a's denied get: {json}");
    ensure!(
        events.iter().any(|e| e["verb"] == "enroll"
            && e["user"]["username"] == "user-a"
            && e["responseStatus"]["message"] == "user-a may not enroll clusters"),
        "user-a's denied enroll: {json}"
    );
    ensure!(
        events
            .iter()
            .filter(|e| e["user"]["username"] == "user-a" && e["responseStatus"]["code"] == 200)
            .all(|e| e["objectRef"]["resourceVersion"].is_string()),
        "every allowed change names its resourceVersion: {json}"
    );
    let table = user.run(&["audit", "-n", "team-a"]).await?;
    if table.success() {
        bail!("an editor read the audit trail: {}", table.stdout);
    }
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_and_audit_on_etcd() -> Result<()> {
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    let hub = HubProcess::start(HubOptions::etcd(&etcd.endpoint(), dir.path().join("hub"))).await?;
    scenario(hub, dir.path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_and_audit_on_the_embedded_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = HubProcess::start(HubOptions::embedded(dir.path().join("hub"))).await?;
    scenario(hub, dir.path()).await
}
