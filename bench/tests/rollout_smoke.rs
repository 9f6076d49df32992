//! Smoke test of the `rollout` suite at small scale: runs the (debug)
//! `imgfleet-bench rollout` against the debug hub, CLI and agents next to it,
//! with 2 clusters, a 1 MiB layer and one run, and checks that both rows are
//! in the table with their targets, and that the undo received no byte.

mod support;

#[test]
fn rollout_suite_reports_every_row() {
    let stdout = support::run_bench(
        "rollout --clusters 2 --layer-mib 1 --runs 1",
        "it needs the debug hub, CLI and agent, docker-registry: cargo build --workspace --bins; bash scripts/install-deps.sh",
    );
    let undo = support::median(&stdout, "rollout", "rollout undo until all 2 mirrors");
    let ms = support::leading_number(undo)
        .unwrap_or_else(|| panic!("the undo's median {undo:?} is not a number"));
    assert!(ms > 0.0, "the undo took {undo}");
    let bytes = support::median(&stdout, "rollout", "blob bytes received");
    assert_eq!(
        support::leading_number(bytes),
        Some(0.0),
        "the undo is served from what the edge holds: {bytes}"
    );
    for row in ["rollout undo until", "blob bytes received"] {
        let line = stdout.lines().find(|l| l.contains(row)).unwrap_or_default();
        assert!(line.contains('≤'), "{row} has no target: {line}");
    }
}
