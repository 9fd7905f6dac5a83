#!/usr/bin/env python3
"""Checks questions.jsonl and judge.jsonl: valid JSON per line, required fields
non-empty, no duplicates, exactly 100 questions, judge labels 0/1 and splits
train/test, no question shared between the judge's train split and its test
split, no train line on one of the 100 ObjecQA questions, files under 1 MiB.
Prints the counts that README.md quotes. Exit status 1 on any problem."""
import collections, json, os, re, sys

HERE = os.path.dirname(os.path.abspath(__file__))
errors = []


def load(name, fields):
    path = os.path.join(HERE, name)
    size = os.path.getsize(path)
    if size >= 1 << 20:
        errors.append(f"{name}: {size} bytes, expected under 1 MiB")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{name}:{n}: invalid JSON ({e})")
                continue
            if set(obj) != set(fields):
                errors.append(f"{name}:{n}: fields {sorted(obj)}, expected {sorted(fields)}")
            for key, kind in fields.items():
                v = obj.get(key)
                if kind is str and (not isinstance(v, str) or not v.strip()):
                    errors.append(f"{name}:{n}: field {key!r} missing or empty")
            rows.append((n, obj))
    return rows, size


def norm(s):
    return " ".join(str(s).lower().split())


questions, qsize = load("questions.jsonl", {"id": str, "topic": str, "question": str})
if len(questions) != 100:
    errors.append(f"questions.jsonl: {len(questions)} lines, expected exactly 100")
for key in ("id", "question"):
    c = collections.Counter(norm(o.get(key)) for _, o in questions)
    for n, o in questions:
        if c[norm(o.get(key))] > 1:
            errors.append(f"questions.jsonl:{n}: duplicate {key}")
for i, (n, o) in enumerate(questions, 1):
    if o.get("id") != f"oq-{i:03d}":
        errors.append(f"questions.jsonl:{n}: id {o.get('id')!r}, expected oq-{i:03d}")
oq_texts = {norm(o.get("question")) for _, o in questions}

judge, jsize = load("judge.jsonl", {"question": str, "answer": str, "label": int, "split": str})
pairs = collections.Counter((norm(o.get("question")), norm(o.get("answer"))) for _, o in judge)
answers = collections.Counter(norm(o.get("answer")) for _, o in judge)
for n, o in judge:
    if o.get("label") not in (0, 1) or isinstance(o.get("label"), bool):
        errors.append(f"judge.jsonl:{n}: label {o.get('label')!r}, expected 0 or 1")
    if o.get("split") not in ("train", "test"):
        errors.append(f"judge.jsonl:{n}: split {o.get('split')!r}, expected train or test")
    if pairs[(norm(o.get("question")), norm(o.get("answer")))] > 1:
        errors.append(f"judge.jsonl:{n}: duplicate question/answer pair")
    elif answers[norm(o.get("answer"))] > 1:
        errors.append(f"judge.jsonl:{n}: answer text repeated elsewhere: {o.get('answer')!r}")
    if o.get("split") == "train" and norm(o.get("question")) in oq_texts:
        errors.append(f"judge.jsonl:{n}: a train line on one of the 100 ObjecQA questions")
by_split = collections.defaultdict(set)
for _, o in judge:
    by_split[o.get("split")].add(norm(o.get("question")))
for q in by_split["train"] & by_split["test"]:
    errors.append(f"judge.jsonl: question in both splits: {q!r}")

print(f"questions.jsonl: {len(questions)} questions, {len({o['topic'] for _, o in questions})} topics, {qsize} bytes")
print("  topics: " + ", ".join(f"{t} {k}" for t, k in sorted(collections.Counter(o["topic"] for _, o in questions).items())))
print(f"judge.jsonl: {len(judge)} lines, {jsize} bytes")
for split in ("train", "test", None):
    sel = [o for _, o in judge if split is None or o.get("split") == split]
    lab = collections.Counter(o.get("label") for o in sel)
    qn = len({norm(o.get("question")) for o in sel})
    print(f"  {split or 'all'}: {len(sel)} lines on {qn} questions; objective (1) {lab[1]}, subjective (0) {lab[0]}")
oq_lines = [o for _, o in judge if norm(o.get("question")) in oq_texts]
print(f"  test lines on the 100 ObjecQA questions: {len(oq_lines)} "
      f"(on {len({norm(o['question']) for o in oq_lines})} of them)")
wc = [len(o["answer"].split()) for _, o in judge]
print(f"  answer words: min {min(wc)} max {max(wc)} mean {sum(wc)/len(wc):.1f}")
for e in errors:
    print("ERROR", e, file=sys.stderr)
sys.exit(1 if errors else 0)
