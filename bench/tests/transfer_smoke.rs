//! Smoke test of the `transfer` suite: runs the debug `imgfleet-bench
//! transfer` at a tiny scale against the debug agent, the real
//! docker-registry, skopeo and curl, and checks that its table holds every
//! case's row with a positive median.

mod support;

use std::time::Instant;

/// Rows the table must hold, each as a fragment of the measurement's name
/// (the sizes in the names come from the options given below).
const ROWS: &[&str] = &[
    "8 MiB / 4 layers: imgfleet-agent sync",
    "8 MiB / 4 layers: skopeo copy",
    "8 MiB / 4 layers: skopeo copy ÷ agent",
    "8 MiB / 4 layers: agent throughput (MiB/s)",
    "8 MiB / 4 layers: curl GET limit, to /dev/null",
    "8 MiB / 4 layers: curl GET limit, to files + fsync",
    "8 MiB / 4 layers: agent speed, % of curl + fsync limit",
    "8 MiB / 4 layers: agent speed, % of curl to /dev/null limit",
    "3 images sharing a 1 MiB base: imgfleet-agent sync",
    "3 images sharing a 1 MiB base: skopeo sync",
    "3 images sharing a 1 MiB base: skopeo sync ÷ agent",
    "2-platform index, 2 MiB each: imgfleet-agent sync",
    "2-platform index, 2 MiB each: skopeo copy --multi-arch all",
    "2-platform index, 2 MiB each: skopeo copy --multi-arch all ÷ agent",
    "no-op re-sync of the 3, pinned by digest (the hub's path): imgfleet-agent sync",
    "no-op re-sync of the 3, pinned by digest (the hub's path): skopeo sync",
    "no-op re-sync of the 3, pinned by digest (the hub's path): skopeo sync ÷ agent",
    "no-op re-sync of the 3, by tag (sync --from): imgfleet-agent sync",
    "no-op re-sync of the 3, by tag (sync --from): skopeo sync",
    "no-op re-sync of the 3, by tag (sync --from): skopeo sync ÷ agent",
    "no-op floor: curl HEAD of the 3 tags",
];

#[test]
fn transfer_suite_reports_every_case() {
    let started = Instant::now();
    let stdout = support::run_bench(
        "transfer --runs 1 --size-mib 8 --images 3 --base-mib 1 --index-mib 2",
        "if the agent is missing, run `cargo build --workspace --bins` first",
    );
    for row in ROWS {
        let cells = support::row_cells(&stdout, "transfer", &format!("| {row} |"));
        let median = cells
            .get(3)
            .and_then(|c| support::leading_number(c))
            .unwrap_or_else(|| panic!("row {row:?}: no numeric median in {cells:?}"));
        assert!(median > 0.0, "row {row:?}: median {median} is not positive");
    }
    eprintln!("transfer smoke took {:?}", started.elapsed());
}
