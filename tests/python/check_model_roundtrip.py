#!/usr/bin/env python3
"""Print Hugging Face GPT-2 logits for given token ids, as JSON on stdout.

Usage: python3 tests/python/check_model_roundtrip.py MODEL_DIR IDS_JSON

  MODEL_DIR  a folder GPT2LMHeadModel.from_pretrained can load
             (config.json + model.safetensors)
  IDS_JSON   a JSON string (not a file): a list of lists of token ids, all rows
             the same length, e.g. '[[1, 5, 9]]'

Prints {"logits": [[[...vocab...] per position] per row]} (float32 values as
Python floats) and nothing else on stdout; warnings and errors go to stderr.
The model runs on CPU, in float32, in eval mode, with eager attention.
Exits non-zero on any failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def parse_ids(text: str) -> list[list[int]]:
    ids = json.loads(text)
    if not isinstance(ids, list) or not ids or not all(isinstance(r, list) and r for r in ids):
        raise ValueError("IDS_JSON must be a non-empty list of non-empty lists of ints")
    if len({len(r) for r in ids}) != 1:
        raise ValueError("all rows of IDS_JSON must have the same length")
    for r in ids:
        for t in r:
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"token id {t!r} is not an int")
    return ids


def run(model_dir: str, ids_json: str) -> dict:
    ids = parse_ids(ids_json)
    # Anything a library prints while importing or loading goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        import torch
        import transformers
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(1)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        model = GPT2LMHeadModel.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).to("cpu").eval()
        with torch.no_grad():
            logits = model(torch.tensor(ids, dtype=torch.long)).logits
        logits = logits.to(torch.float32).tolist()
    return {"logits": logits}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} MODEL_DIR IDS_JSON", file=sys.stderr)
        return 2
    try:
        result = run(argv[1], argv[2])
        text = json.dumps(result, allow_nan=False)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
