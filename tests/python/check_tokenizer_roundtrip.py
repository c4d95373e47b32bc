#!/usr/bin/env python3
"""Print how transformers.AutoTokenizer encodes some texts, as JSON on stdout.

Usage: python3 tests/python/check_tokenizer_roundtrip.py TOKENIZER_DIR TEXTS_JSON_FILE

  TOKENIZER_DIR    a folder AutoTokenizer.from_pretrained can load
  TEXTS_JSON_FILE  a file holding a JSON list of strings

Prints, and nothing else on stdout:
  {"cases": [{"text": ..., "ids": tok(text)["input_ids"],
              "tokens": tok.convert_ids_to_tokens(ids)}, ...],
   "len": len(tok),
   "bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ..., "unk_token_id": ...}
(ids include whatever special tokens the tokenizer adds by default; the
*_token_id fields are null where the tokenizer has no such token).
Warnings and errors go to stderr; exits non-zero on any failure.
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


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        texts = json.load(f)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("TEXTS_JSON_FILE must hold a JSON list of strings")
    return texts


def run(tokenizer_dir: str, texts_file: str) -> dict:
    texts = read_texts(texts_file)
    # Anything a library prints while importing or loading goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        import transformers
        from transformers import AutoTokenizer

        transformers.logging.set_verbosity_error()
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        cases = []
        for text in texts:
            ids = list(tok(text)["input_ids"])
            tokens = tok.convert_ids_to_tokens(ids)
            cases.append({"text": text, "ids": ids, "tokens": tokens})
        return {
            "cases": cases,
            "len": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok.unk_token_id,
        }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} TOKENIZER_DIR TEXTS_JSON_FILE", file=sys.stderr)
        return 2
    try:
        result = run(argv[1], argv[2])
        text = json.dumps(result, ensure_ascii=False, allow_nan=False)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
