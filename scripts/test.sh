#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): fetch and import the test models (cached),
# build the binaries the CLI tests run, then every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-test-models.sh >/dev/null
cargo build --release -p sft-cli --bins
cargo test --release --workspace "$@"
