#!/usr/bin/env python3
"""The `companion bench train|generate` shapes in PyTorch `transformers`, so
both are measured in one session on one machine.

Usage: python3 bench/model.py train|generate small|gpt2 [steps]
           [--device cpu|cuda] [--dtype f32|bf16] [--batch B] [--seq T] [--compile]
Prints one JSON object with the same keys as `companion bench ... --json`.
On a GPU it runs as a PyTorch user would tune it: bf16 autocast, sdpa
attention, fused AdamW (and `torch.compile` with --compile), and MFU is
against the GEMM rate measured on that GPU in that dtype.
"""
import argparse
import json
import resource
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {
    "small": (dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256), 8, 256),
    "gpt2": (dict(), 1, 512),
}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(device, dtype):
    """The matrix-multiply rate MFU is measured against: 1024³ fp32 on a
    CPU, 8192³ in the run's dtype on a GPU (random values, five products
    after a warm-up), as `companion bench` measures it."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    sync(device)
    return 2 * n**3 * 5 / (time.perf_counter() - t) / 1e9


def peak_device_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build(name, o, new_positions=0):
    kw, batch, seq = SHAPES[name]
    cfg = GPT2Config(**kw)
    cfg.n_positions = max(cfg.n_positions, new_positions, o.seq or 0)
    torch.manual_seed(0)
    extra = {"attn_implementation": "sdpa"} if o.device != "cpu" else {}
    device = torch.device(o.device)
    model = GPT2LMHeadModel(cfg, **extra).to(device)
    return cfg, model, device, o.batch or batch, o.seq or seq


def train(name, steps, o):
    cfg, model, device, batch, seq = build(name, o)
    model.train()
    dtype = torch.bfloat16 if o.dtype == "bf16" else torch.float32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    step_fn = torch.compile(model) if o.compile else model
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    times = []
    for step in range(steps + 1):
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = step_fn(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step > 0:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    n = sum(p.numel() for p in model.parameters())
    fpt = 6 * n + 12 * cfg.n_layer * seq * cfg.n_embd
    achieved = fpt * batch * seq / step_s / 1e9
    peak = gemm_gflops(device, dtype)
    return dict(implementation="pytorch transformers" + (" + torch.compile" if o.compile else ""),
                bench="train", device=o.device, dtype=o.dtype, shape=name, batch=batch, seq=seq,
                parameters=n, threads=torch.get_num_threads(), step_seconds=step_s,
                tokens_per_second=batch * seq / step_s, model_gflops=achieved, gemm_peak_gflops=peak,
                mfu=achieved / peak, peak_rss_mib=peak_rss_mib(), peak_device_memory_gib=peak_device_gib(device),
                torch_version=torch.__version__)


def generate(name, new_tokens, o):
    cfg, model, device, _, _ = build(name, o, 8 + new_tokens)
    model = model.eval().to(torch.bfloat16 if o.dtype == "bf16" else torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), device=device)
    stamps = []

    class Stamp:
        def put(self, value):
            sync(device)
            stamps.append(time.perf_counter())

        def end(self):
            pass

    with torch.no_grad():
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, repetition_penalty=1.1, pad_token_id=0, streamer=Stamp())
        total = time.perf_counter() - t
    # The streamer's first put is the prompt.
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    k = max(len(gaps) // 8, 1)
    med = lambda v: sorted(v)[len(v) // 2]
    n = sum(p.numel() for p in model.parameters())
    tps = new_tokens / total
    return dict(implementation="pytorch transformers", bench="generate", device=o.device, dtype=o.dtype,
                shape=name, prompt_tokens=8,
                new_tokens=new_tokens, threads=torch.get_num_threads(), seconds=total, tokens_per_second=tps,
                ms_per_token_first=med(gaps[:k]) * 1e3, ms_per_token_last=med(gaps[-k:]) * 1e3,
                weights_gb_per_second=n * (2 if o.dtype == "bf16" else 4) * tps / 1e9, peak_rss_mib=peak_rss_mib(),
                torch_version=torch.__version__)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["train", "generate"])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("steps", type=int, nargs="?")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--compile", action="store_true")
    o = ap.parse_args()
    steps = o.steps or (5 if o.what == "train" else 128)
    print(json.dumps(train(o.shape, steps, o) if o.what == "train" else generate(o.shape, steps, o)))
