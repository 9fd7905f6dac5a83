#!/usr/bin/env bash
# Collects the real model responses behind crates/classifier/data/real_outputs/ (see the README
# there): SmolLM2-135M-Instruct, greedy, through `sft ifs` and the quickstart's own IFS
# evaluations. Writes raw, unlabelled responses under OUT (default real-outputs/); labelling is
# by hand. Needs scripts/fetch-test-models.sh. About 23 minutes on 2 cores (step 5: 2.5).
#
# The split is by instruction, fixed before any response was read:
#   test:  ifs-0031 ... ifs-0068 (lines 31-68 of crates/ifs/assets/instructions.jsonl)
#   train: ifs-0001 ... ifs-0016 (the quickstart's IFS instructions) and ifs-0069 ... ifs-0082
#   validation: ifs-0083 ... ifs-0088 (and the older set's ifs-0017 ... ifs-0030)
#   later (step 5): train ifs-0089 ... ifs-0124, validation ifs-0125 ... ifs-0136
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-real-outputs}
mkdir -p "$out"
cargo build --release -q -p sft-cli --bins
bin=$(scripts/target-dir)/release
model=cache:smollm2-135m-instruct
sed -n 31,68p crates/ifs/assets/instructions.jsonl >"$out/test-items.jsonl"

# 1. The base model under each template, full and fragment prompts, 64 new tokens (test).
mkdir -p "$out/test"
for t in raw alpaca_modified alpaca_modified_nl chat_template; do
  "$bin/sft" ifs --model "$model" --template "$t" --items "$out/test-items.jsonl" \
    --out "$out/test/base-$t" >"$out/test/base-$t.json"
done

# 2. The quickstart pushed past its plateau: early stopping off, every checkpoint kept, so it
#    trains its whole 480 examples (61 steps, 486 examples); each IFS evaluation (ifs-0001 ...
#    ifs-0016, 32 new tokens) writes evals/step-*/ifs-responses.jsonl: the train split.
"$bin/sft-train" --set run.name=past-plateau --set checkpoint.dir="$out/checkpoints" \
  --set early_stopping.enabled=false --set checkpoint.keep_last=100 --set checkpoint.every_steps=8

# 3. Its checkpoints at the plateau (128 examples: step 16) and at the end (486 examples: step
#    61) on the test instructions, under the template it was tuned with.
for step in 000016 000061; do
  "$bin/sft" ifs --model "$model" --adapter "$out/checkpoints/past-plateau/step-$step" \
    --template alpaca_modified --items "$out/test-items.jsonl" \
    --out "$out/test/quickstart-step-$step" >"$out/test/quickstart-step-$step.json"
done

# 4. Train side, added later (lines 69-88 of instructions.jsonl; 69-82 go to the train split,
#    83-88 to the validation split): the base model under each template and the run's last
#    checkpoint (step 61, past the plateau), 64 new tokens.
sed -n 69,88p crates/ifs/assets/instructions.jsonl >"$out/train-items.jsonl"
mkdir -p "$out/train"
for t in raw alpaca_modified alpaca_modified_nl chat_template; do
  "$bin/sft" ifs --model "$model" --template "$t" --items "$out/train-items.jsonl" \
    --out "$out/train/base-$t" >"$out/train/base-$t.json"
done
"$bin/sft" ifs --model "$model" --adapter "$out/checkpoints/past-plateau/step-000061" \
  --template alpaca_modified --items "$out/train-items.jsonl" \
  --out "$out/train/quickstart-step-000061" >"$out/train/quickstart-step-000061.json"

# 5. More train and validation data on the weakest templates, added later (lines 89-124 of
#    instructions.jsonl go to the train split, 125-136 to the validation split, fixed by
#    position before any response was read): the base model under alpaca_modified and
#    alpaca_modified_nl, and the checkpoints at the plateau (step 16) and past it (step 61)
#    under alpaca_modified, 64 new tokens.
sed -n 89,136p crates/ifs/assets/instructions.jsonl >"$out/more-items.jsonl"
mkdir -p "$out/more"
for t in alpaca_modified alpaca_modified_nl; do
  "$bin/sft" ifs --model "$model" --template "$t" --items "$out/more-items.jsonl" \
    --out "$out/more/base-$t" >"$out/more/base-$t.json"
done
for step in 000016 000061; do
  "$bin/sft" ifs --model "$model" --adapter "$out/checkpoints/past-plateau/step-$step" \
    --template alpaca_modified --items "$out/more-items.jsonl" \
    --out "$out/more/quickstart-step-$step" >"$out/more/quickstart-step-$step.json"
done
