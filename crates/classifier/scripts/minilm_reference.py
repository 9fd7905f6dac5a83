#!/usr/bin/env python3
"""Independent reference for the encoder test: all-MiniLM-L6-v2 sentence embeddings in plain numpy.

Reads the model's safetensors directly (no torch), runs BERT on given token ids, mean-pools over
the tokens and L2-normalises, as sentence-transformers does. Usage:
    minilm_reference.py MODEL_DIR IN.json OUT.json
IN.json: {"texts": [...], "ids": [[...], ...]} (ids from the Rust tokenizer); OUT.json adds
"embeddings". Used once to write crates/classifier/tests/data/minilm_reference.json.
"""
import json
import struct
import sys

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":  # e.g. the I64 `position_ids` buffer
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(info["shape"]).astype(np.float64)
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):  # the exact (erf) GELU of BERT's "gelu"
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def embed(w, cfg, ids):
    p = "" if "embeddings.word_embeddings.weight" in w else "bert."
    n = len(ids)
    h = w[p + "embeddings.word_embeddings.weight"][ids]
    h = h + w[p + "embeddings.position_embeddings.weight"][:n]
    h = h + w[p + "embeddings.token_type_embeddings.weight"][0]
    eps = cfg["layer_norm_eps"]
    h = layer_norm(h, w[p + "embeddings.LayerNorm.weight"], w[p + "embeddings.LayerNorm.bias"], eps)
    heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"] // heads
    for i in range(cfg["num_hidden_layers"]):
        q = f"{p}encoder.layer.{i}."
        lin = lambda x, name: x @ w[q + name + ".weight"].T + w[q + name + ".bias"]
        Q = lin(h, "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        K = lin(h, "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        V = lin(h, "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = Q @ K.transpose(0, 2, 1) / np.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx = (s @ V).transpose(1, 0, 2).reshape(n, heads * d)
        a = lin(ctx, "attention.output.dense")
        h = layer_norm(a + h, w[q + "attention.output.LayerNorm.weight"], w[q + "attention.output.LayerNorm.bias"], eps)
        m = gelu(lin(h, "intermediate.dense"))
        m = lin(m, "output.dense")
        h = layer_norm(m + h, w[q + "output.LayerNorm.weight"], w[q + "output.LayerNorm.bias"], eps)
    v = h.mean(0)
    return v / max(np.linalg.norm(v), 1e-12)


def main():
    model_dir, inp, outp = sys.argv[1:4]
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = load_safetensors(f"{model_dir}/model.safetensors")
    data = json.load(open(inp))
    data["embeddings"] = [[round(float(x), 7) for x in embed(w, cfg, ids)] for ids in data["ids"]]
    json.dump(data, open(outp, "w"))


if __name__ == "__main__":
    main()
