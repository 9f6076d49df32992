#!/usr/bin/env bash
# Runs imgfleet's benchmarks (BENCHMARKS.md) on this machine: installs the
# real components they compare against (etcd, docker-registry, skopeo, curl),
# builds the release binaries and runs imgfleet-bench.
#
#   bash scripts/bench.sh                  # all suites, medians of 3 runs
#   bash scripts/bench.sh transfer         # one suite: transfer | fanout | footprint | mirror | control | rollout
#   bash scripts/bench.sh fanout --agents 2000 --store etcd
#
# The results table is printed and written to target/bench/<suite>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --locked --workspace --bins
suite="${1:-all}"
shift || true
mkdir -p target/bench
exec target/release/imgfleet-bench "$suite" --out "target/bench/$suite.md" "$@"
