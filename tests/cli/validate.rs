//! Runs the real `imgfleet validate` binary against seed and malformed files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/model/testdata")
        .join(name)
}

const SEED_RESOURCE_FILES: [&str; 4] = [
    "seed-quickstart-registrysecret.yaml",
    "seed-quickstart-repository.yaml",
    "seed-production.yaml",
    "seed-development.yaml",
];

fn imgfleet(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgfleet"))
        .args(args)
        // A hub or credentials from the environment must not change what is tested.
        .env_remove("IMGFLEET_HUB")
        .env_remove("IMGFLEET_CREDENTIALS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the imgfleet binary starts");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("imgfleet finishes")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `yaml` to `file` and runs `imgfleet validate -f FILE`, which must fail and print
/// nothing valid; returns the file's path as given and the errors printed.
fn refused(file: &Path, yaml: &str) -> (String, String) {
    std::fs::write(file, yaml).expect("write");
    let path = file.display().to_string();
    let out = imgfleet(&["validate", "-f", &path], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
    (path, text(&out.stderr))
}

#[test]
fn seed_files_are_valid() {
    let files: Vec<String> = SEED_RESOURCE_FILES
        .iter()
        .map(|f| testdata(f).display().to_string())
        .collect();
    let mut args = vec!["validate"];
    for f in &files {
        args.extend(["-f", f.as_str()]);
    }
    let out = imgfleet(&args, None);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    for line in [
        "RegistrySecret default/harbor-prod: valid",
        "Repository default/nginx-latest: valid",
        "RegistrySecret production/harbor-prod: valid",
        "Repository production/myapp-v1.0.0: valid",
        "RegistrySecret development/dockerhub-dev: valid",
        "Repository development/myapp-dev: valid",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in\n{stdout}"
        );
    }
    assert_eq!(stdout.lines().count(), 6, "{stdout}");
}

#[test]
fn standard_input_is_read_with_dash() {
    let seed = std::fs::read_to_string(testdata("seed-production.yaml")).expect("seed");
    let out = imgfleet(&["validate", "-f", "-"], Some(&seed));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Repository production/myapp-v1.0.0: valid"));

    let bad = seed.replace("syncInterval: \"24h\"", "syncInterval: \"1x\"");
    let out = imgfleet(&["validate", "-f", "-"], Some(&bad));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(r#"<stdin>: Repository production/myapp-v1.0.0: spec.syncInterval "1x": expected a duration like 30m, 1h or 24h"#),
        "{stderr}"
    );
    // The valid object of the same input is still reported as valid.
    assert!(text(&out.stdout).contains("RegistrySecret production/harbor-prod: valid"));
}

#[test]
fn malformed_files_fail_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = std::fs::read_to_string(testdata("seed-quickstart-repository.yaml")).expect("seed");
    let secret =
        std::fs::read_to_string(testdata("seed-quickstart-registrysecret.yaml")).expect("seed");
    let cases: Vec<(String, &str)> = vec![
        (
            seed.replace("syncInterval", "syncIntervall"),
            "spec.syncIntervall: unknown field, did you mean syncInterval?",
        ),
        (
            seed.replace("\"library/nginx\"", "\"Library/Nginx\""),
            "spec.repository \"Library/Nginx\": expected a repository path",
        ),
        (
            seed.replace(
                "  registryRef:\n    name: harbor-prod\n    namespace: \"default\"\n",
                "",
            ),
            "spec.registryRef: required field is missing",
        ),
        (
            seed.replace("tag: \"latest\"", "tag: [a]"),
            "spec.tag: expected a string, got a list",
        ),
        (
            secret.replace("provider: \"harbor\"", "provider: \"quay\""),
            "spec.provider \"quay\": expected one of harbor, dockerhub, aliyun, generic",
        ),
        (
            secret.replace("\"harbor.example.com\"", "\"https://harbor.example.com\""),
            "spec.domain \"https://harbor.example.com\": expected a host or host:port",
        ),
        (
            secret.replace("  password: \"Harbor12345\"\n", ""),
            "spec.password: required field is missing",
        ),
        (
            std::fs::read_to_string(testdata("seed-alert-rules.yaml")).expect("seed"),
            "document 1: not an imgfleet object",
        ),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        assert_ne!(yaml, &seed, "case {i} changed nothing");
        let path = dir.path().join(format!("case-{i}.yaml"));
        std::fs::write(&path, yaml).expect("write case");
        let path = path.display().to_string();
        let out = imgfleet(&["validate", "-f", &path], None);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "case {i}: {stderr}");
        assert!(
            stderr.contains(expected),
            "case {i}: expected {expected:?} in\n{stderr}"
        );
        assert!(
            stderr.contains(&path),
            "case {i}: the file is named in\n{stderr}"
        );
        assert!(
            !stderr.contains("Harbor12345"),
            "case {i}: the password leaked:\n{stderr}"
        );
    }
}

#[test]
fn an_empty_input_is_an_error() {
    let out = imgfleet(&["validate", "-f", "-"], Some("# only a comment\n---\n"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("<stdin>: no objects found"), "{stderr}");
}

#[test]
fn a_missing_file_is_named() {
    let out = imgfleet(&["validate", "-f", "/nonexistent/x.yaml"], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("error: cannot read /nonexistent/x.yaml"),
        "{stderr}"
    );
}

#[test]
fn bad_kinds_and_flags_are_explained() {
    let out = imgfleet(&["get", "foo"], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            r#"unknown kind "foo": expected one of registrysecret (rs), repository (repo), cluster"#
        ),
        "{stderr}"
    );
    let out = imgfleet(&["validate", "--frobnicate"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--frobnicate"));
    let out = imgfleet(&["validate"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--filename <FILE>"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_file_over_the_document_limit_is_named_with_the_limit_and_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = std::fs::read_to_string(testdata("seed-quickstart-repository.yaml")).expect("seed");
    let many = |n: usize| {
        (0..n)
            .map(|i| seed.replace("name: nginx-latest", &format!("name: nginx-{i}")))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let at_limit = dir.path().join("at-limit.yaml");
    std::fs::write(&at_limit, format!("{}---\n", many(1024))).expect("write");
    let out = imgfleet(&["validate", "-f", &at_limit.display().to_string()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1024);

    let (path, stderr) = refused(&dir.path().join("over.yaml"), &many(1100));
    assert_eq!(
        stderr,
        format!(
            "{path}: input: more than 1024 documents: one file holds at most 1024 objects \
             (documents separated by ---); split it into several files and give each with -f, \
             e.g. imgfleet apply -f part-1.yaml -f part-2.yaml\nerror: 1 problem found\n"
        )
    );
}

#[test]
fn a_50_mib_password_is_refused_naming_the_field_and_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret =
        std::fs::read_to_string(testdata("seed-quickstart-registrysecret.yaml")).expect("seed");
    let huge = "s".repeat(50 * 1024 * 1024);
    let (path, stderr) = refused(
        &dir.path().join("secret.yaml"),
        &secret.replace("Harbor12345", &huge),
    );
    assert_eq!(
        stderr,
        format!(
            "{path}: RegistrySecret default/harbor-prod: spec.password: 50 MiB long: \
             expected a password or token of at most 64 KiB\nerror: 1 problem found\n"
        )
    );
}
