//! The seed's YAML as written syncs: its `RegistrySecret` and `Repository`, byte for byte as
//! the seed document has them (only `domain` pointed at the test registry and `insecure: true`
//! added), applied to a real hub with one enrolled cluster that admits `default`, reach that
//! cluster's mirror, and `get repositories` shows `SYNCED 1/1`. Before any cluster admits the
//! namespace, `describe` and `get -o wide` say why nothing syncs. Deleting the RegistrySecret
//! while the Repository uses it is refused, naming the Repository; `--force` deletes it and
//! the Repository's status then says the secret is gone.

use std::time::Duration;

use anyhow::{Context, Result};
use imgfleet_tests::fleet::{HubOptions, HubProcess};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::{Registry, RegistryOptions, policy, skopeo, wait_until};

const CONVERGE: Duration = Duration::from_secs(60);

/// The seed's two objects with only the domain changed and `insecure: true` added.
fn seed_yaml(domain: &str) -> String {
    assert!(
        !policy::SEED_REPOSITORY.contains("placement"),
        "the seed's Repository has no placement"
    );
    policy::objects(&[
        policy::seed_registry_secret(domain),
        policy::SEED_REPOSITORY.to_owned(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_yaml_syncs_to_every_cluster_that_admits_its_namespace() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    // The seed's credentials, on a registry that requires them.
    let registry =
        Registry::start(RegistryOptions::plain().with_auth("admin", "Harbor12345")).await?;
    let nginx = PushTarget::from(&registry)
        .push_image(
            "library/nginx",
            "latest",
            &ImageSpec::random(&[300 << 10], 7),
        )
        .await?;
    let hub = HubProcess::start(HubOptions::embedded(root.join("hub"))).await?;
    let cli = hub.cli();

    // Step 1: the seed's YAML with no cluster yet. Nothing can sync, and the hub says why.
    cli.apply_yaml(&seed_yaml(&registry.addr())).await?;
    wait_until(
        "describe saying no cluster admits the namespace",
        CONVERGE,
        || async {
            let text = cli.ok(&["describe", "repository", "nginx-latest"]).await?;
            Ok(text.contains("Not placed:") && text.contains("NoClusterAdmitsNamespace"))
        },
    )
    .await?;
    let wide = cli.ok(&["get", "repositories", "-o", "wide"]).await?;
    assert!(
        wide.contains("REASON") && wide.contains("NoClusterAdmitsNamespace"),
        "{wide}"
    );

    // Step 2: a cluster that admits `default` (and carries no label any placement names).
    let agent = hub.start_agent("edge-1", &["default"], root).await?;
    wait_until("get repositories showing SYNCED 1/1", CONVERGE, || async {
        let table = cli.ok(&["get", "repositories"]).await?;
        Ok(table
            .lines()
            .any(|l| l.contains("nginx-latest") && l.contains(" 1/1 ")))
    })
    .await?;
    let table = cli.ok(&["get", "repositories", "-o", "wide"]).await?;
    let row = table
        .lines()
        .find(|l| l.contains("nginx-latest"))
        .context("nginx-latest row")?;
    assert!(
        row.contains(&nginx.manifest_digest) && row.trim_end().ends_with('-'),
        "the row shows the upstream digest and no reason: {table}"
    );
    let served = skopeo::inspect_digest(
        &agent.docker_ref("library/nginx:latest"),
        &["--tls-verify=false"],
    )
    .await?;
    assert_eq!(served, nginx.manifest_digest, "the mirror serves the image");

    // Step 3: the RegistrySecret is in use: a plain delete is refused and names the user.
    let refused = cli.run(&["delete", "rs", "harbor-prod"]).await?;
    assert!(!refused.success(), "delete of a used secret must fail");
    assert!(
        refused
            .stderr
            .contains("the hub refused RegistrySecret default/harbor-prod")
            && refused.stderr.contains("still used by Repository"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("default/nginx-latest") && refused.stderr.contains("--force"),
        "the error names the Repository and the way out: {}",
        refused.stderr
    );
    cli.ok(&["get", "rs", "harbor-prod"])
        .await
        .context("the secret is still there")?;

    // Step 4: --force deletes it; the Repository then says its secret is gone.
    cli.ok(&["delete", "rs", "harbor-prod", "--force"]).await?;
    wait_until(
        "describe saying the RegistrySecret is gone",
        CONVERGE,
        || async {
            let text = cli.ok(&["describe", "repository", "nginx-latest"]).await?;
            Ok(text.contains("SecretNotFound")
                && text.contains("default/harbor-prod: RegistrySecret not found"))
        },
    )
    .await?;
    Ok(())
}
