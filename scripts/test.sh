#!/usr/bin/env bash
# Runs imgfleet's whole test suite against real components (etcd, the
# distribution registry, skopeo), installing them first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo test --workspace --locked
