#!/usr/bin/env python3
"""`companion pretrain`'s recipe in PyTorch `transformers`, for a side-by-side
comparison on the same corpus, tokenizer and machine.

The recipe (the defaults of `companion pretrain`):

  * documents: the `text` field of each line of data/corpus/train.jsonl
    (validation: data/corpus/validation.jsonl); empty documents dropped
  * each document tokenized (`tokenizer(texts)`), the eos id appended, then
    run_clm's `group_texts` per map batch of 1000 documents into blocks of
    128 tokens (the remainder of each map batch dropped)
  * GPT2LMHeadModel: n_layer 4, n_embd 128, n_head 2, n_positions 128,
    vocab_size = len(tokenizer), dropout 0 everywhere, HF init, seed 42
  * torch.optim.AdamW with HF Trainer's two parameter groups (no weight decay
    for biases and LayerNorm weights), lr 2e-3, weight_decay 0.1, betas
    0.9/0.999, eps 1e-8; clip_grad_norm_ 1.0; get_cosine_schedule_with_warmup
    with warmup_ratio 0.05 (ceil); batch 16; the data order a seeded shuffle
  * logging every 10 steps (stderr), evaluation every 100 steps (and before
    and after training) on the whole validation split (or its first
    --max-eval-samples blocks)

Each of these is a flag (`--n-embd`, `--block-size`, `--learning-rate`, ...);
bench/pretrain.sh passes the recipe `companion pretrain` reports in its JSON.

Held-out metrics: eval_loss = mean cross-entropy per predicted token over
those blocks, perplexity = exp(eval_loss), bits_per_byte = eval_loss / ln 2 /
(bytes per token), where bytes per token = UTF-8 bytes of all validation texts
/ their tokens including the appended eos ids, counted before group_texts
drops any remainder.

Modes:
  --max-steps N   train exactly N optimiser steps
  --seconds B     a wall-clock budget for training: ten probe steps (--probe-steps) on a
                  throwaway copy of the model time one step (their median, as
                  the first step carries one-time set-up costs), max_steps =
                  floor(B / step time) sets the schedule, less the steps that
                  the evaluations every eval_steps would cost (each timed as the
                  evaluation before training); then training runs from the
                  untouched initial model and stops at max_steps or when B
                  seconds of training have passed, whichever is first. (The
                  probe is not charged to B; its step times are reported.)

`train_seconds` is the training loop's wall time, including the evaluations
every eval_steps (as HF's train_runtime) but not the evaluations before and
after. Prints one JSON line on stdout; logs go to stderr.

Usage (from the repository root; paths are relative to the cwd):
  python3 bench/pretrain_pytorch.py [--tokenizer output/tokenizer]
      [--max-steps 100 | --seconds B] [--train-file ...] [--validation-file ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_docs(path: str, field: str) -> list[str]:
    """Documents as the Rust crate reads them: the `field` of each non-blank
    line of a .jsonl/.json file (else each non-empty line); empty ones dropped."""
    with open(path, "rb") as f:
        data = f.read()
    jsonl = path.endswith((".jsonl", ".json"))
    docs = []
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8")
        if line.endswith("\r"):
            line = line[:-1]
        if jsonl:
            if not line.strip():
                continue
            text = json.loads(line)[field]
            if text:
                docs.append(text)
        elif line:
            docs.append(line)
    return docs


def tokenize_and_group(tok, texts, eos_id, block_size, map_batch=1000):
    """tokenizer(texts) + eos, then group_texts per map batch of documents.
    Returns (blocks, utf8 bytes of the texts, tokens before the remainder drop)."""
    blocks, n_tokens = [], 0
    for i in range(0, len(texts), map_batch):
        enc = tok(texts[i : i + map_batch])["input_ids"]
        joined = []
        for ids in enc:
            joined.extend(ids)
            joined.append(eos_id)
        n_tokens += len(joined)
        total = (len(joined) // block_size) * block_size
        blocks.extend(joined[j : j + block_size] for j in range(0, total, block_size))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return blocks, n_bytes, n_tokens


def load_tokenizer(path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(path)
    else:
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        tok = PreTrainedTokenizerFast(
            tokenizer_file=file, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
        )
    tok.model_max_length = int(1e30)  # silence the "sequence too long" warning
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # as the chapter (and companion) does
    return tok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="output/tokenizer",
                   help="tokenizer folder (tokenizer.json [+ tokenizer_config.json]) or file")
    p.add_argument("--train-file", default="data/corpus/train.jsonl")
    p.add_argument("--validation-file", default="data/corpus/validation.jsonl")
    p.add_argument("--text-field", default="text")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--max-steps", type=int, default=None)
    mode.add_argument("--seconds", type=float, default=None,
                      help="wall-clock training budget in seconds")
    p.add_argument("--probe-steps", type=int, default=10, help="steps timed in --seconds mode")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--n-positions", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=100, help="0: only before and after")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    if a.max_steps is None and a.seconds is None:
        a.max_steps = 100
    if a.max_steps is not None and a.max_steps < 1:
        p.error("--max-steps must be at least 1")
    if a.seconds is not None and not a.seconds > 0:
        p.error("--seconds must be positive")
    if a.probe_steps < 1:
        p.error("--probe-steps must be at least 1")
    if not 1 <= a.block_size <= a.n_positions:
        p.error(f"--block-size must be between 1 and n_positions ({a.n_positions})")

    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, get_cosine_schedule_with_warmup

    torch.set_num_threads(a.threads)
    transformers.utils.logging.set_verbosity_error()

    tok = load_tokenizer(a.tokenizer)
    eos_id = tok.eos_token_id
    if eos_id is None:
        sys.exit(f"{a.tokenizer}: the tokenizer has no eos token")
    pad_id = tok.pad_token_id

    t0 = time.perf_counter()
    train_texts = read_docs(a.train_file, a.text_field)
    val_texts = read_docs(a.validation_file, a.text_field)
    train_blocks, _, _ = tokenize_and_group(tok, train_texts, eos_id, a.block_size)
    val_blocks, val_bytes, val_tokens = tokenize_and_group(tok, val_texts, eos_id, a.block_size)
    eval_blocks = val_blocks[: a.max_eval_samples] if a.max_eval_samples else val_blocks
    bytes_per_token = val_bytes / max(val_tokens, 1)
    log(f"tokenized in {time.perf_counter() - t0:.1f}s: {len(train_blocks)} training blocks, "
        f"{len(eval_blocks)} eval blocks of {a.block_size}; "
        f"validation {val_bytes} bytes / {val_tokens} tokens = {bytes_per_token:.4f} bytes/token")
    if not train_blocks or not eval_blocks:
        sys.exit("not enough text for one block")

    train_ids = torch.tensor(train_blocks, dtype=torch.long)
    eval_ids = torch.tensor(eval_blocks, dtype=torch.long)

    transformers.set_seed(a.seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=a.n_positions,
        n_embd=a.n_embd,
        n_layer=a.n_layer,
        n_head=a.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos_id,
    )
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, vocab "
        f"{cfg.vocab_size}, {n_params / 1e6:.2f}M parameters; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"attention {getattr(model.config, '_attn_implementation', '?')}")

    def labels_of(ids):
        lab = ids.clone()
        if pad_id is not None:
            lab[lab == pad_id] = -100  # DataCollatorForLanguageModeling(mlm=False)
        return lab

    @torch.no_grad()
    def evaluate(m):
        was = m.training
        m.eval()
        total, count = 0.0, 0
        for s in range(0, len(eval_ids), a.eval_batch_size):
            ids = eval_ids[s : s + a.eval_batch_size]
            lab = labels_of(ids)[:, 1:]
            logits = m(input_ids=ids).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), lab.reshape(-1),
                ignore_index=-100, reduction="sum").item()
            count += int((lab != -100).sum())
        m.train(was)
        loss = total / max(count, 1)
        return {"eval_loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": loss / math.log(2) / bytes_per_token}

    def make_optimizer(m):
        # HF Trainer's groups: no decay for biases and LayerNorm weights.
        ln = {id(q) for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)
              for q in mod.parameters(recurse=False)}
        decay, no_decay = [], []
        for name, q in m.named_parameters():
            if not q.requires_grad:
                continue
            (no_decay if name.endswith("bias") or id(q) in ln else decay).append(q)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": a.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)

    # A seeded shuffle (HF: RandomSampler with a seeded generator), a fresh
    # permutation each epoch; the last partial batch kept.
    gen = torch.Generator().manual_seed(a.seed)
    order, pos = torch.randperm(len(train_ids), generator=gen), 0

    def next_batch():
        nonlocal order, pos
        if pos >= len(order):
            order, pos = torch.randperm(len(train_ids), generator=gen), 0
        idx = order[pos : pos + a.batch_size]
        pos += a.batch_size
        return train_ids[idx]

    def train_step(m, opt, ids):
        lab = labels_of(ids)
        loss = m(input_ids=ids, labels=lab).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), a.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), float(norm), int(ids.numel())

    model.train()
    t = time.perf_counter()
    before = evaluate(model)
    eval_seconds = time.perf_counter() - t
    log(f"before training: loss {before['eval_loss']:.4f}, perplexity "
        f"{before['perplexity']:.1f}, bits/byte {before['bits_per_byte']:.3f}")

    probe_step_seconds, probe_times = None, None
    if a.seconds is not None:
        # Time a few steps on a throwaway copy (same data), then start over.
        pm = copy.deepcopy(model)
        popt = make_optimizer(pm)
        times = []
        for k in range(a.probe_steps):
            ids = train_ids[order[k * a.batch_size : (k + 1) * a.batch_size]]
            t = time.perf_counter()
            train_step(pm, popt, ids)
            times.append(time.perf_counter() - t)
        del pm, popt
        probe_times = times
        probe_step_seconds = sorted(times)[len(times) // 2]
        max_steps = max(1, math.floor(a.seconds / probe_step_seconds))
        # Leave room for the evaluations inside the loop (every eval_steps,
        # not at the last step), so that the schedule can run to its end.
        while a.eval_steps and max_steps > 1 and (
            max_steps * probe_step_seconds
            + ((max_steps - 1) // a.eval_steps) * eval_seconds > a.seconds
        ):
            max_steps -= 1
        log(f"probe: {a.probe_steps} steps, {', '.join(f'{x:.3f}' for x in times)} s "
            f"(median {probe_step_seconds:.3f} s), an evaluation {eval_seconds:.2f} s; "
            f"budget {a.seconds:.1f} s -> max_steps {max_steps}")
    else:
        max_steps = a.max_steps

    warmup = math.ceil(a.warmup_ratio * max_steps)
    opt = make_optimizer(model)
    sched = get_cosine_schedule_with_warmup(opt, warmup, max_steps)

    step, total_loss = 0, 0.0
    log_loss, log_n, log_tokens = 0.0, 0, 0
    tokens = 0
    start = log_t = time.perf_counter()
    deadline = start + a.seconds if a.seconds is not None else None
    while step < max_steps:
        if deadline is not None and time.perf_counter() >= deadline:
            log(f"time budget spent after {step} of {max_steps} steps")
            break
        lr = sched.get_last_lr()[0]
        loss, norm, n = train_step(model, opt, next_batch())
        sched.step()
        step += 1
        tokens += n
        total_loss += loss
        log_loss, log_n, log_tokens = log_loss + loss, log_n + 1, log_tokens + n
        if step % a.logging_steps == 0 or step == 1 or step == max_steps:
            secs = time.perf_counter() - log_t
            log(f"step {step}/{max_steps}: loss {log_loss / log_n:.4f}, lr {lr:.3e}, "
                f"grad_norm {norm:.3f}, {log_tokens / max(secs, 1e-9):.0f} tokens/s")
            log_loss, log_n, log_tokens, log_t = 0.0, 0, 0, time.perf_counter()
        if a.eval_steps and step % a.eval_steps == 0 and step != max_steps:
            m = evaluate(model)
            log(f"eval at step {step}: loss {m['eval_loss']:.4f}, perplexity "
                f"{m['perplexity']:.1f}, bits/byte {m['bits_per_byte']:.3f}")
    train_seconds = time.perf_counter() - start

    after = evaluate(model)
    log(f"after training:  loss {after['eval_loss']:.4f}, perplexity "
        f"{after['perplexity']:.1f}, bits/byte {after['bits_per_byte']:.3f}")
    out = {
        "implementation": "pytorch transformers",
        "steps": step,
        "max_steps": max_steps,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        "train_loss": total_loss / max(step, 1),
        "budget_seconds": a.seconds,
        "probe_step_seconds": probe_step_seconds,
        "probe_times": probe_times,
        "eval_seconds": eval_seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "before": before,
        "after": after,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
