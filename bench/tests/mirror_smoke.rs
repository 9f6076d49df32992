//! Smoke test of the `mirror` suite: runs the debug `imgfleet-bench mirror`
//! at a tiny scale (8 MiB image, 1 and 2 nodes, 50 non-reading clients, 20
//! against the registry, one run) against the debug agent and the real docker-registry, and checks that
//! every row is in the table with a positive median and the targets.

mod support;

use std::time::{Duration, Instant};

/// Rows the table must hold (fragments of the Measurement column), and the
/// target each is held to, if any.
const ROWS: &[(&str, Option<&str>)] = &[
    (
        "1 node(s) pulling 8 MiB / 4 layers at once: imgfleet mirror",
        None,
    ),
    (
        "1 node(s) pulling 8 MiB / 4 layers at once: docker-registry |",
        None,
    ),
    (
        "1 node(s) pulling 8 MiB / 4 layers at once: mirror throughput",
        None,
    ),
    (
        "1 node(s) pulling 8 MiB / 4 layers at once: docker-registry ÷ mirror",
        Some("≥ 1.00×"),
    ),
    (
        "2 node(s) pulling 8 MiB / 4 layers at once: docker-registry ÷ mirror",
        Some("≥ 1.20×"),
    ),
    ("mirror idle RSS before the clients", None),
    (
        "mirror RSS with 50 clients not reading a 2 MiB blob",
        Some("≤ 100.0 MiB"),
    ),
    ("mirror peak RSS since start", None),
    (
        "mirror: slowest GET /v2/ of 10 beside 50 stuck clients",
        Some("≤ 1000 ms"),
    ),
    ("docker-registry RSS with 20 clients not reading", None),
    (
        "docker-registry: slowest GET /v2/ of 10 beside 20 stuck clients",
        None,
    ),
];

#[test]
fn mirror_suite_reports_every_row() {
    let started = Instant::now();
    let stdout = support::run_bench(
        "mirror --size-mib 8 --nodes 1,2 --clients 50 --registry-clients 20 --settle-secs 1 --runs 1",
        "it needs the debug agent (cargo build --workspace --bins) and docker-registry",
    );
    for (row, target) in ROWS {
        let cells = support::row_cells(&stdout, "mirror", row);
        let median = cells.get(3).copied().unwrap_or("");
        let value = support::leading_number(median)
            .unwrap_or_else(|| panic!("row {row:?}: median {median:?} is not a number"));
        assert!(
            value > 0.0,
            "row {row:?}: median {median:?} is not positive"
        );
        if let Some(t) = target {
            assert!(
                cells.get(5).is_some_and(|c| c.starts_with(t)),
                "row {row:?} is not held to {t}: {cells:?}"
            );
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the smoke run took {:?}",
        started.elapsed()
    );
}
