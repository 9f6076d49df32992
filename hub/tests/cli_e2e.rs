//! End to end with real processes: the `imgfleet` CLI against the
//! `imgfleet-hub` binary, on the embedded store and on a real etcd: apply
//! the seed, get/describe/delete, a stale resourceVersion, enrollment, and a
//! SIGKILL restart that loses nothing. The password appears in no answer,
//! no log and no stored byte.
//!
//! The CLI binary must be built first: `cargo build -p imgfleet --bin imgfleet`
//! (cargo builds only this package's binaries for its tests).

use imgfleet_common::pki::{self, Identity};
use imgfleet_tests::{Etcd, free_port};

mod support;
use support::{ETCD_PREFIX, Hub, Out, cli_binary, run_cli, start_hub};

const SEED_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/testdata/seed-quickstart.yaml"
);
const PASSWORD: &str = "Harbor12345";

fn cli(hub: &Hub, args: &[&str]) -> Out {
    let o = run_cli(hub, args);
    // No answer of the CLI ever shows the password.
    assert!(
        !o.stdout.contains(PASSWORD) && !o.stderr.contains(PASSWORD),
        "{args:?} printed the password"
    );
    o
}

fn ok(hub: &Hub, args: &[&str]) -> String {
    let o = cli(hub, args);
    assert_eq!(
        o.code,
        Some(0),
        "imgfleet {args:?}\nstdout: {}\nstderr: {}",
        o.stdout,
        o.stderr
    );
    o.stdout
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn scenario(etcd: Option<&Etcd>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("hub-data");
    let mut hub = start_hub(&data, &dir.path().join("hub1.log"), etcd).await;

    // The hub's resolver contacts the registry named in the seed; point it at
    // a closed loopback port so no test traffic leaves the machine.
    let upstream = format!("127.0.0.1:{}", free_port());
    let seed = std::fs::read_to_string(SEED_FILE)
        .expect("seed")
        .replace("harbor.example.com", &upstream);
    let seed_path = dir.path().join("seed.yaml");
    std::fs::write(&seed_path, &seed).expect("write seed copy");
    let seed_file = seed_path.to_str().expect("utf-8 temp path");

    let out = ok(&hub, &["apply", "-f", seed_file]);
    assert!(
        out.contains("RegistrySecret default/harbor-prod created"),
        "{out}"
    );
    assert!(
        out.contains("Repository default/nginx-latest created"),
        "{out}"
    );
    let out = ok(&hub, &["apply", "-f", seed_file]);
    assert!(out.contains("unchanged"), "{out}");

    let out = ok(&hub, &["get", "repositories"]);
    assert!(
        out.contains("nginx-latest") && out.contains("library/nginx"),
        "{out}"
    );
    let out = ok(&hub, &["get", "repositories", "-A"]);
    assert!(out.contains("nginx-latest"), "{out}");

    let out = ok(&hub, &["get", "rs", "-o", "yaml"]);
    assert!(
        out.contains("harbor-prod") && out.contains(&upstream),
        "{out}"
    );
    assert!(
        !out.lines().any(|l| l.trim_start().starts_with("password:")),
        "password field in get -o yaml:\n{out}"
    );

    let out = ok(&hub, &["describe", "repository", "nginx-latest"]);
    assert!(
        out.contains("library/nginx") && out.contains("harbor-prod"),
        "{out}"
    );

    // A stale resourceVersion is refused: update once, then reapply the
    // version the first apply returned.
    let shown = ok(&hub, &["get", "repository", "nginx-latest", "-o", "yaml"]);
    let rv = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("resourceVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no resourceVersion in:\n{shown}"));
    let stale_yaml = seed
        .replace(
            "  name: nginx-latest\n",
            &format!("  name: nginx-latest\n  resourceVersion: \"{rv}\"\n"),
        )
        .replace("syncInterval: \"1h\"", "syncInterval: \"2h\"");
    let stale_file = dir.path().join("stale.yaml");
    std::fs::write(&stale_file, &stale_yaml).expect("write");
    let stale = stale_file.to_str().expect("utf8");
    ok(&hub, &["apply", "-f", stale]);
    let o = cli(&hub, &["apply", "-f", stale]);
    assert_ne!(o.code, Some(0), "stale apply accepted: {}", o.stdout);
    assert!(o.stderr.contains("resourceVersion"), "{}", o.stderr);

    // Enrollment writes the agent's credentials; the certificate binds the name.
    let creds = dir.path().join("edge-1");
    let creds_s = creds.to_str().expect("utf8");
    ok(
        &hub,
        &[
            "cluster",
            "enroll",
            "edge-1",
            "--label",
            "region=eu",
            "--namespace",
            "default",
            "--out",
            creds_s,
        ],
    );
    let cert = std::fs::read_to_string(creds.join("cert.pem")).expect("cert.pem");
    assert_eq!(
        pki::identity_from_pem(&cert).expect("identity"),
        Identity::Cluster("edge-1".into())
    );
    let ca = std::fs::read_to_string(creds.join("ca.pem")).expect("ca.pem");
    assert_eq!(
        ca,
        std::fs::read_to_string(data.join("admin/ca.pem")).expect("admin ca")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(creds.join("key.pem"))
            .expect("key.pem")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = ok(&hub, &["get", "clusters"]);
    assert!(
        out.contains("edge-1") && out.contains("region=eu") && out.contains("default"),
        "{out}"
    );

    // SIGKILL and restart: everything is still there.
    hub.child.kill();
    let log1 = hub.log.clone();
    let hub2 = start_hub(&data, &dir.path().join("hub2.log"), etcd).await;
    let out = ok(&hub2, &["get", "rs"]);
    assert!(out.contains("harbor-prod"), "{out}");
    let out = ok(&hub2, &["get", "repositories"]);
    assert!(out.contains("nginx-latest"), "{out}");
    let out = ok(&hub2, &["get", "clusters"]);
    assert!(out.contains("edge-1"), "{out}");

    ok(&hub2, &["delete", "repository", "nginx-latest"]);
    let o = cli(&hub2, &["get", "repository", "nginx-latest"]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("not found"), "{}", o.stderr);

    // The plaintext password is in no log and no stored byte; its sealed form is stored.
    for log in [&log1, &hub2.log] {
        let text = std::fs::read_to_string(log).expect("log");
        assert!(!text.contains(PASSWORD), "password in {}", log.display());
    }
    let raw = match etcd {
        Some(e) => e
            .get(&format!(
                "{ETCD_PREFIX}/registrysecrets/default/harbor-prod"
            ))
            .await
            .expect("etcd get")
            .expect("key present"),
        None => std::fs::read(data.join("policy.redb")).expect("redb"),
    };
    assert!(contains(&raw, b"enc:v1:"), "sealed password stored");
    assert!(
        !contains(&raw, PASSWORD.as_bytes()),
        "plaintext password stored"
    );
}

#[tokio::test]
async fn cli_against_hub_on_embedded_store() {
    cli_binary();
    scenario(None).await;
}

#[tokio::test]
async fn cli_against_hub_on_etcd() {
    cli_binary();
    let etcd = Etcd::start().await.expect("etcd starts");
    scenario(Some(&etcd)).await;
}
