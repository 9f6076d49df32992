//! Smoke test of the `control` suite at tiny scale: runs the (debug) `imgfleet-bench
//! control` against the debug hub and CLI next to it, with 60 Repositories and one run,
//! and checks that every row is in the table with a positive value and its target.

mod support;

/// The table's rows this suite must print (substrings of the Measurement column).
const ROWS: [&str; 6] = [
    "bulk apply, cost per object, first 20 objects",
    "bulk apply, cost per object, the next 40",
    "bulk apply throughput, first batch",
    "bulk apply throughput, second batch",
    "growth of the cost per object",
    "hub CPU with 60 Repositories failing to resolve",
];

#[test]
fn control_suite_reports_every_row() {
    let stdout = support::run_bench(
        "control --repos 60 --first 20 --warmup-secs 1 --idle-secs 2 --runs 1",
        "it needs the debug hub and CLI: cargo build --workspace --bins",
    );
    for row in ROWS {
        let median = support::median(&stdout, "control", row);
        let number = support::leading_number(median)
            .unwrap_or_else(|| panic!("row {row:?}: median {median:?} is not a number"));
        // CPU may read 0 over two seconds on an idle hub; the rest must be positive.
        assert!(
            number > 0.0 || row.starts_with("hub CPU"),
            "row {row:?}: median {median:?}"
        );
    }
    for held in ["growth of the cost per object", "hub CPU with"] {
        let line = stdout
            .lines()
            .find(|l| l.contains(held))
            .unwrap_or_default();
        assert!(line.contains('≤'), "{held} has no target: {line}");
    }
}
