//! Smoke test of the `footprint` suite at tiny scale: runs the (debug) `imgfleet-bench
//! footprint` against the debug binaries next to it, with an 8 MiB image and one run, and
//! checks that every row is in the table with a positive value.

mod support;

use std::time::{Duration, Instant};

/// The table's rows this suite must print (substrings of the Measurement column).
const ROWS: [&str; 12] = [
    "agent daemon idle RSS (VmRSS",
    "agent daemon idle RSS, anonymous part",
    "agent daemon threads while idle",
    "agent daemon peak RSS syncing 8 MiB",
    "agent daemon max sampled VmRSS syncing 8 MiB",
    "agent daemon idle RSS 2 s after that sync",
    "`imgfleet-agent sync` peak RSS copying 8 MiB",
    "`imgfleet-agent sync` max sampled VmRSS copying 8 MiB",
    "`imgfleet-agent serve` idle RSS",
    " binary size: imgfleet |",
    " binary size: imgfleet-hub |",
    " binary size: imgfleet-agent |",
];

/// `12.3 MiB` / `512.0 KiB` / `7` as a number of bytes (or a count).
fn parse_value(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let n: f64 = parts.next()?.parse().ok()?;
    Some(match parts.next() {
        Some("MiB") => n * 1024.0 * 1024.0,
        Some("KiB") => n * 1024.0,
        None => n,
        Some(_) => return None,
    })
}

#[test]
fn footprint_suite_reports_every_row() {
    let started = Instant::now();
    let stdout = support::run_bench(
        "footprint --size-mib 8 --settle-secs 2 --runs 1",
        "it needs the debug hub, agent and CLI: cargo build --workspace --bins",
    );
    // Every row's median is a positive size or count.
    for row in ROWS {
        let median = support::median(&stdout, "footprint", row);
        match parse_value(median) {
            Some(value) if value > 0.0 => {}
            Some(_) => panic!("row {row:?}: median {median:?} is not positive"),
            None => panic!("row {row:?}: median {median:?} is not a number"),
        }
    }
    // The idle RSS row is held to the target.
    let idle = stdout
        .lines()
        .find(|l| l.contains("agent daemon idle RSS (VmRSS"))
        .unwrap_or_default();
    assert!(
        idle.contains("≤ 19.1 MiB"),
        "idle row has no target: {idle}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the smoke run took {:?}",
        started.elapsed()
    );
}
