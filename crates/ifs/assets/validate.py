#!/usr/bin/env python3
"""Checks instructions.jsonl: valid JSON per line, required fields non-empty,
ids and texts unique, 5-40 words per instruction, file under 1 MiB.
Prints the counts that README.md quotes. Exit status 1 on any problem."""
import collections, json, os, re, sys

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "instructions.jsonl")
errors = []
rows = []
with open(PATH, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"line {n}: invalid JSON ({e})")
            continue
        for key in ("id", "instruction", "category"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                errors.append(f"line {n}: field {key!r} missing or empty")
        if set(obj) != {"id", "instruction", "category"}:
            errors.append(f"line {n}: unexpected fields {sorted(obj)}")
        rows.append((n, obj))

ids = collections.Counter(o.get("id") for _, o in rows)
texts = collections.Counter(str(o.get("instruction", "")).strip().lower() for _, o in rows)
for n, o in rows:
    if ids[o.get("id")] > 1:
        errors.append(f"line {n}: duplicate id {o.get('id')}")
    if texts[str(o.get("instruction", "")).strip().lower()] > 1:
        errors.append(f"line {n}: duplicate instruction")
    if not re.fullmatch(r"ifs-\d{4}", str(o.get("id"))):
        errors.append(f"line {n}: id {o.get('id')!r} is not ifs-NNNN")
    words = len(str(o.get("instruction", "")).split())
    if not 5 <= words <= 40:
        errors.append(f"line {n}: {words} words, expected 5-40")
size = os.path.getsize(PATH)
if size >= 1 << 20:
    errors.append(f"{PATH}: {size} bytes, expected under 1 MiB")

wc = [len(o["instruction"].split()) for _, o in rows if "instruction" in o]
cats = collections.Counter(o.get("category") for _, o in rows)
print(f"instructions: {len(rows)}  bytes: {size}")
print(f"words: min {min(wc)} max {max(wc)} mean {sum(wc)/len(wc):.1f}; "
      f"8-25 words: {sum(8 <= w <= 25 for w in wc)} ({100*sum(8 <= w <= 25 for w in wc)/len(wc):.0f}%)")
print("categories: " + ", ".join(f"{c} {k}" for c, k in sorted(cats.items())))
for e in errors:
    print("ERROR", e, file=sys.stderr)
sys.exit(1 if errors else 0)
