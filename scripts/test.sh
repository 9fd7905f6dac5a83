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
# Open MPI, and libclang for the MPI bindings' build (bindgen): the data-parallel tests run
# `mpirun -np 2`. Installed where missing (Debian's packages; apt-get as root), quietly.
mpi_packages=(openmpi-bin libopenmpi-dev libclang-dev clang)
missing=()
for p in "${mpi_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]} (the data-parallel tests)" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"; } >/dev/null; then
    echo "test.sh: cannot install ${missing[*]}: install Open MPI and libclang (see the README's Data-parallel training)" >&2
    exit 1
  fi
fi
scripts/fetch-test-models.sh >/dev/null
scripts/fetch-tensorboard-venv.sh >/dev/null
# Here a missing TensorBoard venv fails its tests instead of skipping them.
export SFT_REQUIRE_TENSORBOARD=1
# With MPI (the `mpi` feature): the CLI tests run every plain run with the binaries that can
# also run under mpirun, and the data-parallel tests (tests/data_parallel.rs) run.
cargo build --release -p sft-cli --bins --features mpi
cargo test --release --workspace --features sft-cli/mpi "$@"
# The emulated GPU's kernels under AddressSanitizer and ThreadSanitizer (about 6 minutes), last:
# they rebuild the kernels and the model crate in the same target folder.
if (($# == 0)); then
  SANITIZE_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target} scripts/kernel-sanitize
fi
