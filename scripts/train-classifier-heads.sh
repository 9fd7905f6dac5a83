#!/usr/bin/env bash
# Rebuild the two classifier heads shipped in the repository, deterministically (seeded, full
# batch), from their configs:
#   configs/classifier/tone.yaml  -> crates/ifs/assets/tone_head.safetensors (+ .json)
#   configs/classifier/judge.yaml -> crates/objecqa/assets/judge_head.safetensors (+ .json)
# Needs the MiniLM encoder in the cache (scripts/fetch-test-models.sh). About 4 minutes on 2 cores.
# The crates compile the heads in (include_bytes!), so rebuild sft afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p sft-cli --bin sft
sft=$(scripts/target-dir)/release/sft
for cfg in configs/classifier/judge.yaml configs/classifier/tone.yaml; do
  "$sft" classifier train --config "$cfg" | tail -n 2
done
