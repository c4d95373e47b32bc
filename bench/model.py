#!/usr/bin/env python3
"""The `companion bench train|generate` shapes in PyTorch `transformers`, so
both are measured in one session on one machine.

Usage: python3 bench/model.py train|generate small|gpt2 [steps]
Prints one JSON object with the same keys as `companion bench ... --json`.
"""
import json
import resource
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {
    "small": (dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256), 8, 256),
    "gpt2": (dict(), 1, 512),
}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gemm_gflops(n=1024):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 2 * n**3 * 5 / (time.perf_counter() - t) / 1e9


def train(name, steps):
    kw, batch, seq = SHAPES[name]
    cfg = GPT2Config(**kw)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    n = sum(p.numel() for p in model.parameters())
    fpt = 6 * n + 12 * cfg.n_layer * seq * cfg.n_embd
    achieved = fpt * batch * seq / step_s / 1e9
    peak = gemm_gflops()
    return dict(implementation="pytorch transformers", bench="train", shape=name, batch=batch, seq=seq,
                parameters=n, threads=torch.get_num_threads(), step_seconds=step_s,
                tokens_per_second=batch * seq / step_s, model_gflops=achieved, gemm_peak_gflops=peak,
                mfu=achieved / peak, peak_rss_mib=peak_rss_mib(), torch_version=torch.__version__)


def generate(name, new_tokens):
    kw, _, _ = SHAPES[name]
    cfg = GPT2Config(**kw)
    cfg.n_positions = max(cfg.n_positions, 8 + new_tokens)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    stamps = []

    class Stamp:
        def put(self, value):
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
    return dict(implementation="pytorch transformers", bench="generate", shape=name, prompt_tokens=8,
                new_tokens=new_tokens, threads=torch.get_num_threads(), seconds=total, tokens_per_second=tps,
                ms_per_token_first=med(gaps[:k]) * 1e3, ms_per_token_last=med(gaps[-k:]) * 1e3,
                weights_gb_per_second=n * 4 * tps / 1e9, peak_rss_mib=peak_rss_mib(),
                torch_version=torch.__version__)


if __name__ == "__main__":
    what, name = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else (5 if what == "train" else 128)
    print(json.dumps(train(name, steps) if what == "train" else generate(name, steps)))
