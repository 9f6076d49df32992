//! What the suites' smoke tests share: running the debug `imgfleet-bench`
//! (built next to the other debug binaries by `cargo test --workspace`).

use std::process::Command;

/// Runs `imgfleet-bench args` and returns its stdout (the results table).
/// Fails the test with both outputs when it does not succeed; `hint` says
/// what usually causes that.
pub fn run_bench(args: &[&str], hint: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_imgfleet-bench"))
        .args(args)
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
