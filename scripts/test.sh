#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): fetch and import the test models (cached),
# make the cached venv whose TensorBoard reads back the event files training writes, build the
# binaries the CLI tests run, then every test in release mode (the CUDA kernels among them, on
# the emulated GPU), then the kernel tests under the sanitizers (scripts/kernel-sanitize; not
# when test arguments are given).
set -euo pipefail
cd "$(dirname "$0")/.."

# The repository stands alone: no tracked file may read or link a sibling `shared` folder, or
# send the reader to the tracker (an issue number, in words or as #N). The patterns below do
# not match their own text, so nothing is excluded.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  if git grep -nIE \
      -e '\.\./shared|shared/(fixtures|gpu|hooks|PAPER|CANDLE|ARCHITECTURE)' \
      -e '\b[Ii]ssues? #?[0-9]+' \
      -e '(^|[[:space:](])#[0-9]{1,3}\b' >&2; then
    echo "test.sh: the tracked lines above point outside the repository or at the tracker" >&2
    exit 1
  fi
fi
scripts/fetch-test-models.sh >/dev/null
scripts/fetch-tensorboard-venv.sh >/dev/null
# Here a missing TensorBoard venv fails its tests instead of skipping them.
export SFT_REQUIRE_TENSORBOARD=1
cargo build --release -p sft-cli --bins
cargo test --release --workspace "$@"
# The emulated GPU's kernels under AddressSanitizer and ThreadSanitizer (about 6 minutes), last:
# they rebuild the kernels and the model crate in the same target folder.
if (($# == 0)); then
  SANITIZE_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target} scripts/kernel-sanitize
fi
