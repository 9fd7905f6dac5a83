#!/usr/bin/env python3
"""Validate gpt4all-shaped JSONL files and print counts per category.

Usage: python3 configs/data/validate.py [FILE.jsonl ...]   (default: configs/data/bundled.jsonl)

Checks that every line is a JSON object with non-empty string `prompt`,
`response` and `source` fields (source of the form `sft-bundled/<category>`),
and that no prompt appears twice across all the files given.
"""
import collections
import json
import os
import sys


def main(paths):
    seen = {}
    counts = collections.Counter()
    words = []
    errors = 0
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    print(f"{where}: not valid UTF-8 JSON: {e}")
                    errors += 1
                    continue
                if not isinstance(row, dict) or set(row) != {"prompt", "response", "source"}:
                    print(f"{where}: expected an object with exactly prompt, response, source")
                    errors += 1
                    continue
                bad = [k for k in ("prompt", "response", "source") if not isinstance(row[k], str) or not row[k].strip()]
                if bad:
                    print(f"{where}: empty or non-string field(s): {', '.join(bad)}")
                    errors += 1
                    continue
                if not row["source"].startswith("sft-bundled/"):
                    print(f"{where}: source must start with sft-bundled/, got {row['source']!r}")
                    errors += 1
                key = " ".join(row["prompt"].lower().split())
                if key in seen:
                    print(f"{where}: duplicate prompt (first at {seen[key]})")
                    errors += 1
                seen[key] = where
                counts[row["source"].split("/", 1)[1]] += 1
                words.append(len(row["response"].split()))
    total = sum(counts.values())
    for cat, n in sorted(counts.items()):
        print(f"{cat:16} {n}")
    if words:
        words.sort()
        print(f"total {total} rows, {len(counts)} categories; response words: "
              f"min {words[0]}, median {words[len(words) // 2]}, max {words[-1]}")
    for path in paths:
        print(f"{path}: {os.path.getsize(path)} bytes")
    return 1 if errors else 0


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(main(sys.argv[1:] or [os.path.join(here, "bundled.jsonl")]))
