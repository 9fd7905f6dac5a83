#!/usr/bin/env bash
# Collects the real model responses behind crates/classifier/data/real_outputs/ (see the README
# there): SmolLM2-135M-Instruct, greedy, through `sft ifs` and the quickstart's own IFS
# evaluations. Writes raw, unlabelled responses under OUT (default real-outputs/); labelling is
# by hand. Needs scripts/fetch-test-models.sh. About 30 minutes on 2 cores (step 5: 2.5, step 6: 2, step 7: 4).
#
# The split is by instruction, fixed before any response was read:
#   test:  ifs-0031 ... ifs-0068 (lines 31-68 of crates/ifs/assets/instructions.jsonl)
#   train: ifs-0001 ... ifs-0016 (the quickstart's IFS instructions) and ifs-0069 ... ifs-0082
#   validation: ifs-0083 ... ifs-0088 (and the older set's ifs-0017 ... ifs-0030)
#   later (step 5): train ifs-0089 ... ifs-0124, validation ifs-0125 ... ifs-0136
#   later (step 6): train ifs-0137 ... ifs-0181, validation ifs-0182 ... ifs-0196
#   later (step 7): a fresh test split, ifs-0197 ... ifs-0234 (the first test split, ifs-0031 ...
#   ifs-0068, became validation once it had been used to judge heads)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-real-outputs}
mkdir -p "$out"
cargo build --release -q -p sft-cli --bins
bin=$(scripts/target-dir)/release
model=cache:smollm2-135m-instruct
sed -n 31,68p crates/ifs/assets/instructions.jsonl >"$out/test-items.jsonl"
ckpt=$out/checkpoints/past-plateau

# answer ITEMS DIR TEMPLATE [STEP]: `sft ifs` (64 new tokens, full and fragment prompts) on
# ITEMS under TEMPLATE, the base model or the past-plateau run's checkpoint STEP; responses in
# DIR/base-TEMPLATE or DIR/quickstart-step-STEP, the summary in the same name plus .json.
answer() {
  local items=$1 dir=$2 t=$3 step=${4:-} name
  name=${step:+quickstart-step-$step}
  name=${name:-base-$t}
  mkdir -p "$dir"
  "$bin/sft" ifs --model "$model" ${step:+--adapter "$ckpt/step-$step"} --template "$t" \
    --items "$items" --out "$dir/$name" >"$dir/$name.json"
}

# answer_lines FIRST LAST NAME TEMPLATE...: lines FIRST-LAST of instructions.jsonl (saved as
# NAME-items.jsonl) answered by the base model under each TEMPLATE and by the checkpoints at the
# plateau (step 16) and past it (step 61) under alpaca_modified; responses under NAME/.
answer_lines() {
  local first=$1 last=$2 name=$3 t step
  shift 3
  sed -n "${first},${last}p" crates/ifs/assets/instructions.jsonl >"$out/$name-items.jsonl"
  for t in "$@"; do
    answer "$out/$name-items.jsonl" "$out/$name" "$t"
  done
  for step in 000016 000061; do
    answer "$out/$name-items.jsonl" "$out/$name" alpaca_modified "$step"
  done
}

# 1. The base model under each template, full and fragment prompts, 64 new tokens (test).
for t in raw alpaca_modified alpaca_modified_nl chat_template; do
  answer "$out/test-items.jsonl" "$out/test" "$t"
done

# 2. The quickstart pushed past its plateau: early stopping off, every checkpoint kept, so it
#    trains its whole 480 examples (61 steps, 486 examples); each IFS evaluation (ifs-0001 ...
#    ifs-0016, 32 new tokens) writes evals/step-*/ifs-responses.jsonl: the train split.
"$bin/sft-train" --set run.name=past-plateau --set checkpoint.dir="$out/checkpoints" \
  --set early_stopping.enabled=false --set checkpoint.keep_last=100 --set checkpoint.every_steps=8

# 3. Its checkpoints at the plateau (128 examples: step 16) and at the end (486 examples: step
#    61) on the test instructions, under the template it was tuned with.
for step in 000016 000061; do
  answer "$out/test-items.jsonl" "$out/test" alpaca_modified "$step"
done

# 4. Train side, added later (lines 69-88 of instructions.jsonl; 69-82 go to the train split,
#    83-88 to the validation split): the base model under each template and the run's last
#    checkpoint (step 61, past the plateau), 64 new tokens.
sed -n 69,88p crates/ifs/assets/instructions.jsonl >"$out/train-items.jsonl"
for t in raw alpaca_modified alpaca_modified_nl chat_template; do
  answer "$out/train-items.jsonl" "$out/train" "$t"
done
answer "$out/train-items.jsonl" "$out/train" alpaca_modified 000061

# 5. More train and validation data on the weakest templates, added later (lines 89-124 of
#    instructions.jsonl go to the train split, 125-136 to the validation split, fixed by
#    position before any response was read): the base model under alpaca_modified and
#    alpaca_modified_nl, and the checkpoints at the plateau (step 16) and past it (step 61)
#    under alpaca_modified, 64 new tokens.
answer_lines 89 136 more alpaca_modified alpaca_modified_nl

# 6. The same four settings on the next 60 instructions, added later (lines 137-181 go to the
#    train split, 182-196 to the validation split, fixed by position before any response was
#    generated or read).
answer_lines 137 196 more2 alpaca_modified alpaca_modified_nl

# 7. A fresh test split (lines 197-234 of instructions.jsonl), the same six settings as step 1
#    and step 3: the base model under each template, and the checkpoints at the plateau and
#    past it under alpaca_modified, 64 new tokens.
answer_lines 197 234 test2 raw alpaca_modified alpaca_modified_nl chat_template
