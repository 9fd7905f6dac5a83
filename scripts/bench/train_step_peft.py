"""One LoRA training step in PyTorch + PEFT, timed: the reference side of scripts/bench/train-step.

usage: train_step_peft.py MODEL_DIR DTYPE BATCH SEQ_LEN STEPS   (prints one JSON line)

Same batch as the Rust side: token ids (i * 7919 + 13) % vocab, every position labelled; LoRA
r=8, alpha=16, dropout 0 on q,k,v,o (override with TRAIN_STEP_TARGETS/RANK/ALPHA); AdamW,
global-norm clipping at 1.0.
"""
import json, os, resource, statistics, sys, time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

model_dir, dtype, b, t, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
targets = os.environ.get("TRAIN_STEP_TARGETS", "q_proj,k_proj,v_proj,o_proj").split(",")
r = int(os.environ.get("TRAIN_STEP_RANK", "8"))
alpha = float(os.environ.get("TRAIN_STEP_ALPHA", "16"))

if os.environ.get("TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["TORCH_THREADS"]))
torch.manual_seed(0)
# QLoRA: TRAIN_STEP_QUANTIZE=nf4 (or nf4-dq) loads the base through bitsandbytes' 4-bit Linear.
quantize = os.environ.get("TRAIN_STEP_QUANTIZE", "none")
if quantize.startswith("nf4"):
    from transformers import BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=quantize.endswith("-dq"),
                             bnb_4bit_compute_dtype=dt)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt, quantization_config=bnb,
                                                 device_map="cpu")
elif quantize != "none":
    sys.exit(f"TRAIN_STEP_QUANTIZE={quantize}: the PyTorch side runs none, nf4 or nf4-dq")
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt)
model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                         target_modules=targets, task_type="CAUSAL_LM"))
model.train()
vocab = model.config.vocab_size
ids = torch.tensor([(i * 7919 + 13) % vocab for i in range(b * t)], dtype=torch.long).view(b, t)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
rows = []
for step in range(steps + 1):
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    print(f"step {step}: loss {loss.item():.4f} forward {t1-t0:.3f}s backward {t2-t1:.3f}s "
          f"optimizer {t3-t2:.3f}s", file=sys.stderr)
    if step > 0:
        rows.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
med = lambda k: statistics.median(r[k] for r in rows)
print(json.dumps({
    "impl": f"PyTorch {torch.__version__} + PEFT" + (" + bitsandbytes" if quantize != "none" else ""),
    "quantize": quantize,
    "dtype": dtype, "batch": b, "seq_len": t, "steps": steps,
    "median_step_s": med(0), "tokens_per_s": b * t / med(0),
    "median_forward_s": med(1), "median_backward_s": med(2), "median_optimizer_s": med(3),
    "trainable_params": sum(p.numel() for p in params),
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "threads": torch.get_num_threads(),
}))
