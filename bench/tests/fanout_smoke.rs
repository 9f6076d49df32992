//! Smoke test of the `fanout` suite at tiny scale: 20 simulated agents against
//! the debug hub on both stores, one run, checking that the table holds the
//! fan-out latency and RSS rows with positive values.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

/// The median column of the table row whose measurement starts with `prefix`.
fn median_of(table: &str, prefix: &str) -> Option<String> {
    table.lines().find_map(|line| {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| fanout | metric | median | runs | target |" splits into 7 cells.
        (cells.len() >= 6 && cells[1] == "fanout" && cells[2].starts_with(prefix))
            .then(|| cells[3].to_owned())
    })
}

/// The number in a shown value such as `74 ms`, `52.0 KiB` or `1.2 MiB`, in the
/// unit shown.
fn number(shown: &str) -> Option<f64> {
    shown.split_whitespace().next()?.parse().ok()
}

#[test]
fn fanout_suite_runs_at_small_scale() {
    let bench = Path::new(env!("CARGO_BIN_EXE_imgfleet-bench"));
    // The suite runs the hub binary next to itself; `cargo test --workspace`
    // builds it, `cargo test -p imgfleet-bench` alone does not.
    let hub = bench.with_file_name("imgfleet-hub");
    assert!(
        hub.is_file(),
        "{} not found: build it first with: cargo build -p imgfleet-hub",
        hub.display()
    );
    let started = Instant::now();
    let stdout = support::run_bench(
        "fanout --agents 20 --store both --runs 1 --idle-secs 2",
        "see the hub's log under target/test-logs/",
    );
    for store in ["embedded", "etcd"] {
        for stat in ["p50", "p99", "max"] {
            let prefix = format!("fan-out {stat} ({store}, 20 agents)");
            let shown = median_of(&stdout, &prefix)
                .unwrap_or_else(|| panic!("no row {prefix:?} in:\n{stdout}"));
            assert!(shown.ends_with(" ms"), "{prefix}: {shown:?} is not in ms");
            let v = number(&shown).unwrap_or_else(|| panic!("{prefix}: {shown:?} is not a number"));
            assert!(v > 0.0 && v < 120_000.0, "{prefix}: {v} ms out of range");
        }
        let prefix = format!("fan-out agents reached within 120 s ({store})");
        let reached = median_of(&stdout, &prefix).unwrap_or_else(|| panic!("no row {prefix:?}"));
        assert_eq!(number(&reached), Some(20.0), "{prefix}: {reached:?}");
        let prefix = format!("hub RSS per connected agent ({store})");
        let rss = median_of(&stdout, &prefix)
            .unwrap_or_else(|| panic!("no row {prefix:?} in:\n{stdout}"));
        let v = number(&rss).unwrap_or_else(|| panic!("{prefix}: {rss:?} is not a number"));
        assert!(
            rss.ends_with("KiB") || rss.ends_with("MiB"),
            "{prefix}: {rss:?} is not a size"
        );
        // RSS grows in pages; with 20 agents the difference could be noise,
        // but a hub holding 20 sessions never shrinks below its idle size.
        assert!(v >= 0.0, "{prefix}: {rss:?} is negative");
        let prefix = format!("reconnect all 20 agents after hub restart ({store})");
        let secs = median_of(&stdout, &prefix).unwrap_or_else(|| panic!("no row {prefix:?}"));
        assert!(number(&secs).is_some_and(|v| v > 0.0), "{prefix}: {secs:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the smoke test took {:?}; it must stay under 40 s",
        started.elapsed()
    );
}
