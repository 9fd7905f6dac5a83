"""Read a folder's TensorBoard event files with TensorBoard's own reader (EventAccumulator) and
print what it holds as one JSON line: {"scalars": {tag: [[step, value], ...]},
"texts": {tag: [[step, text], ...]}}.

Usage: python read_tensorboard.py DIR [--no-purge] [--live]
  --no-purge  turn off the reader's purge of orphaned steps (shows every event written)
  --live      after the first line, wait for a line on stdin, then reload the same accumulator
              and print again, as a TensorBoard that keeps watching a run does
"""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util


def dump(acc):
    tags = acc.Tags()
    out = {"scalars": {}, "texts": {}}
    for tag in tags[ea.SCALARS]:
        out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
    for tag in tags[ea.TENSORS]:
        texts = []
        for e in acc.Tensors(tag):
            value = tensor_util.make_ndarray(e.tensor_proto).item()
            texts.append([e.step, value.decode("utf-8")])
        out["texts"][tag] = texts
    return out


def main():
    path = sys.argv[1]
    acc = ea.EventAccumulator(
        path,
        size_guidance={ea.SCALARS: 0, ea.TENSORS: 0},
        purge_orphaned_data="--no-purge" not in sys.argv,
    )
    acc.Reload()
    print(json.dumps(dump(acc)), flush=True)
    if "--live" in sys.argv:
        sys.stdin.readline()
        acc.Reload()
        print(json.dumps(dump(acc)), flush=True)


if __name__ == "__main__":
    main()
