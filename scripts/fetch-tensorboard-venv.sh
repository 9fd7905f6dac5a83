#!/usr/bin/env bash
# Make and cache a small Python virtual environment with the `tensorboard` PyPI package, whose
# own event reader (EventAccumulator) the tests use to read back the event files that training
# writes: $SFT_CACHE/venvs/tensorboard-<version>/ (SFT_CACHE defaults to ~/.cache/sft, as for
# scripts/fetch-test-models.sh). Idempotent: a second run does nothing. Prints the venv's python.
set -euo pipefail
version=2.20.0
cache=${SFT_CACHE:-$HOME/.cache/sft}
venv=$cache/venvs/tensorboard-$version
if [[ ! -f $venv/.complete ]]; then
  echo "fetch-tensorboard-venv: installing tensorboard==$version into $venv" >&2
  mkdir -p "$cache/venvs"
  # Built in place (a venv's scripts name its folder); .complete marks a finished one.
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "tensorboard==$version" >&2
  "$venv/bin/python" -c 'from tensorboard.backend.event_processing import event_accumulator' >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
