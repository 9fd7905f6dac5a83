"""The PyTorch side of scripts/bench/gpu: the same measurements as
crates/model/examples/gpu_train.rs (random weights drawn on the GPU, bf16, one micro-batch of
random tokens, AdamW, clipping at 1.0, median step after the warm-up, the CUDA allocator's
peak), with transformers (sdpa attention) and PEFT.

  gpu_peft.py train SHAPE KIND CKPT BATCH SEQ STEPS WARMUP [VOCAB]
      SHAPE 7b|13b|small, KIND lora|qlora|full (full: AdamW on bf16 weights, bf16 states;
      qlora: the base linears replaced by bitsandbytes' Linear4bit, NF4 with bf16 compute, as
      BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") loads them; norms stay
      bf16: prepare_model_for_kbit_training's f32 upcast is not applied, as ours keeps bf16), CKPT 0|1
  gpu_peft.py generate SHAPE PROMPTS NEW_TOKENS
      greedy generate, bf16, one batch of PROMPTS random prompts of 16-48 tokens, left-padded

Prints one JSON line.
"""
import json
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
    "small": (576, 1536, 30, 9, 3, 49152),
}


def model(shape, vocab=None):
    h, i, l, nh, nkv, v = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=l,
                      num_attention_heads=nh, num_key_value_heads=nkv, vocab_size=vocab or v,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, use_cache=False, pad_token_id=0,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return m, cfg


def to_4bit(m):
    import bitsandbytes as bnb
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if name in names and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, quant_type="nf4",
                                      device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                             quant_type="nf4")
                setattr(parent, name, q.cuda())
                del child


def train(shape, kind, ckpt, b, t, steps, warmup, vocab=None):
    from peft import LoraConfig, get_peft_model
    m, cfg = model(shape, vocab)
    n_params = sum(p.numel() for p in m.parameters())
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    if kind == "qlora":
        to_4bit(m)
        torch.cuda.empty_cache()
    if kind in ("lora", "qlora"):
        m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]))
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    ids = (torch.arange(b * t, device="cuda").reshape(b, t) * 7919 + 13) % (cfg.vocab_size - 3) + 3
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for step in range(warmup + steps):
            torch.cuda.synchronize()
            s = time.perf_counter()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - s
            print(f"peft step {step}: loss {loss.item():.4f} {dt:.3f}s", file=sys.stderr, flush=True)
            if step >= warmup:
                times.append(dt)
    except torch.OutOfMemoryError:
        print(json.dumps({"impl": "PyTorch", "shape": shape, "kind": kind, "grad_ckpt": bool(ckpt),
                          "batch": b, "seq": t, "result": "out of memory"}), flush=True)
        return
    med = statistics.median(times)
    impl = f"PyTorch {torch.__version__} + PEFT" + (" + bitsandbytes NF4" if kind == "qlora" else "") if kind != "full" else f"PyTorch {torch.__version__} (bf16 AdamW states)"
    print(json.dumps({"impl": impl, "shape": shape, "kind": kind, "grad_ckpt": bool(ckpt),
                      "batch": b, "seq": t, "median_step_s": med, "tokens_per_s": b * t / med,
                      "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                      "params": n_params, "mfu": (6 if kind == "full" else 4) * n_params * b * t / med / 989e12}),
          flush=True)


def generate(shape, n_prompts, n_new):
    m, cfg = model(shape)
    m.config.use_cache = True
    m.eval()
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 49, (n_prompts,), generator=g).tolist()
    L = max(lens)
    rows = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    x = torch.tensor([[0] * (L - len(r)) + r for r in rows], device="cuda")
    a = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], device="cuda")
    best = None
    for _ in range(2):
        torch.cuda.synchronize()
        s = time.perf_counter()
        with torch.no_grad():
            m.generate(input_ids=x, attention_mask=a, max_new_tokens=n_new, min_new_tokens=n_new,
                       do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        d = time.perf_counter() - s
        best = d if best is None else min(best, d)
    print(json.dumps({"impl": f"transformers {torch.__version__} generate (bf16)", "shape": shape,
                      "prompts": n_prompts, "new_tokens": n_new, "seconds": best,
                      "tokens_per_s": n_prompts * n_new / best}), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        shape, kind, ckpt, b, t, steps, warmup = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:9])
        vocab = int(sys.argv[9]) if len(sys.argv) > 9 else None
        train(shape, kind, ckpt, b, t, steps, warmup, vocab)
    elif mode == "generate":
        generate(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(f"unknown mode {mode}")
