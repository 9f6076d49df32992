//! What the suites' smoke tests share: running the debug `imgfleet-bench`
//! (built next to the other debug binaries by `cargo test --workspace`) and
//! reading its results table.

// Each smoke test is a crate of its own that uses only some of these helpers.
#![allow(dead_code)]

use std::process::Command;

/// Runs `imgfleet-bench ARGS` (`args` split at spaces) and returns its stdout
/// (the results table). Fails the test with both outputs when it does not
/// succeed; `hint` says what usually causes that.
pub fn run_bench(args: &str, hint: &str) -> String {
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = Command::new(env!("CARGO_BIN_EXE_imgfleet-bench"))
        .args(&args)
        .output()
        .expect("running imgfleet-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "imgfleet-bench {} failed ({}); {hint}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        args.first().copied().unwrap_or(""),
        out.status
    );
    stdout
}

/// The cells of the results-table row of `suite` whose measurement contains
/// `row`: `["", suite, measurement, median, runs, target, ""]`. Fails the test,
/// quoting the table, when there is none.
pub fn row_cells<'a>(table: &'a str, suite: &str, row: &str) -> Vec<&'a str> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {suite} |")) && l.contains(row))
        .unwrap_or_else(|| panic!("no row {row:?} in:\n{table}"));
    line.split('|').map(str::trim).collect()
}

/// The number at the start of a shown value (`1.234 s`, `1.72×`, `95%`, `74 ms`).
pub fn leading_number(cell: &str) -> Option<f64> {
    let end = cell
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(cell.len());
    cell[..end].parse().ok()
}

/// The median cell of the results-table row of `suite` whose measurement
/// contains `row` (see [`row_cells`]).
pub fn median<'a>(table: &'a str, suite: &str, row: &str) -> &'a str {
    row_cells(table, suite, row).get(3).copied().unwrap_or("")
}
