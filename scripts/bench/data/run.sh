#!/usr/bin/env bash
# Data-path benchmark: 100k synthetic gpt4all-shaped rows, as JSONL and as parquet,
# read + templated (alpaca_modified) + tokenized (SmolLM2's tokenizer) + cached, then loaded
# from the cache, then one epoch of batches (length-grouped under an 8192-token budget, and
# packed). Prints rows/s for each stage.
# Usage: scripts/bench/data/run.sh [ROWS] [TOKENIZER_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/../../.." && pwd)
cache=${SFT_CACHE:-$HOME/.cache/sft}
rows=${1:-100000}
tok=${2:-$cache/models/smollm2-135m-instruct}
if [[ ! -f $tok/tokenizer.json ]]; then
  echo "no $tok/tokenizer.json: run scripts/fetch-test-models.sh first" >&2
  exit 1
fi
cd "$here"
cargo run --release -q -p sft-data --example bench_data -- "$tok" "$rows"
