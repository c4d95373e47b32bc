#!/usr/bin/env python3
"""The Python side of `companion bench tokenizer`: train a tokenizer on the
same corpus with the Python libraries, then encode every document and time it.

Prints one JSON line per implementation, with the keys of
`companion bench tokenizer --json`:

  implementation, model, vocab_size, corpus_bytes, threads, train_seconds,
  encode_seconds, encode_mb_per_s, tokens

Runs (choose with --runs, comma-separated):

  bpe            tokenizers.ByteLevelBPETokenizer, min_frequency 2
  unigram        tokenizers.SentencePieceUnigramTokenizer (NFKC), unk "<unk>"
  sentencepiece  sentencepiece.SentencePieceTrainer (unigram), trained on a
                 temporary file with one non-empty line of the documents per
                 line, then `sp.encode(lines)` on those same lines

`corpus_bytes` is the UTF-8 size of what is encoded: the documents for the
`tokenizers` runs, the lines (without their newlines) for `sentencepiece`.
Documents are read as the Rust crate reads them: the `text` field of each
line of a .jsonl/.json file, or each line of any other file; empty documents
are dropped.

Usage:
  python3 bench/bench_tokenizer.py --corpus data/corpus/train.jsonl \
      --vocab-size 30000 [--runs bpe,unigram,sentencepiece]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

RUNS = ("bpe", "unigram", "sentencepiece")


def read_docs(paths: list[str], field: str) -> list[str]:
    docs: list[str] = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        jsonl = path.endswith((".jsonl", ".json"))
        for i, raw in enumerate(data.split(b"\n"), start=1):
            line = raw.decode("utf-8")
            if line.endswith("\r"):
                line = line[:-1]
            if jsonl:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if field not in obj or not isinstance(obj[field], str):
                    sys.exit(f"{path}:{i}: no string `{field}` field")
                text = obj[field]
                if text:
                    docs.append(text)
            elif line:
                docs.append(line)
    if all(not d.strip() for d in docs):
        sys.exit("no text in the corpus")
    return docs


def utf8_len(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def rayon_threads() -> int:
    """What the `tokenizers` thread pool uses: RAYON_RS_NUM_THREADS (or
    RAYON_NUM_THREADS) when set, else one thread per logical core."""
    for var in ("RAYON_RS_NUM_THREADS", "RAYON_NUM_THREADS"):
        v = os.environ.get(var)
        if v and v.isdigit() and int(v) > 0:
            return int(v)
    return os.cpu_count() or 1


def learned(msg: str) -> None:
    """The vocabulary actually learned, on stderr (the JSON keeps the keys of
    the Rust side, whose `vocab_size` is the size asked for)."""
    print(f"learned: {msg}", file=sys.stderr, flush=True)


def result(impl, model, vocab, nbytes, threads, train_s, encode_s, tokens):
    return {
        "implementation": impl,
        "model": model,
        "vocab_size": vocab,
        "corpus_bytes": nbytes,
        "threads": threads,
        "train_seconds": train_s,
        "encode_seconds": encode_s,
        "encode_mb_per_s": nbytes / 1e6 / encode_s,
        "tokens": tokens,
    }


def bench_hf(model: str, docs: list[str], vocab: int) -> dict:
    import tokenizers

    if model == "bpe":
        tok = tokenizers.ByteLevelBPETokenizer()
        t0 = time.perf_counter()
        tok.train_from_iterator(docs, vocab_size=vocab, min_frequency=2, show_progress=False)
        train_s = time.perf_counter() - t0
    else:
        tok = tokenizers.SentencePieceUnigramTokenizer()
        t0 = time.perf_counter()
        tok.train_from_iterator(docs, vocab_size=vocab, show_progress=False, unk_token="<unk>")
        train_s = time.perf_counter() - t0
    learned(f"tokenizers {model}: {tok.get_vocab_size()} pieces (asked for {vocab})")
    t1 = time.perf_counter()
    encodings = tok.encode_batch(docs)  # parallel (rayon) inside the library
    encode_s = time.perf_counter() - t1
    tokens = sum(len(e.ids) for e in encodings)
    return result(
        "python tokenizers", model, vocab, utf8_len(docs), rayon_threads(), train_s, encode_s, tokens
    )


def bench_sentencepiece(docs: list[str], vocab: int, verbose: bool) -> dict:
    import io

    import sentencepiece as spm

    lines = [ln for d in docs for ln in (x.removesuffix("\r") for x in d.split("\n")) if ln]
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for ln in lines:
                f.write(ln)
                f.write("\n")
        model = io.BytesIO()
        t0 = time.perf_counter()
        spm.SentencePieceTrainer.Train(
            input=path,
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab,
            num_threads=threads,
            # A soft limit, as the `tokenizers` trainers have: a small corpus
            # may not support `vocab` pieces, which is an error otherwise.
            hard_vocab_limit=False,
            minloglevel=0 if verbose else 2,
        )
        train_s = time.perf_counter() - t0
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    learned(f"sentencepiece unigram: {sp.get_piece_size()} pieces (asked for {vocab})")
    t1 = time.perf_counter()
    ids = sp.encode(lines, num_threads=threads)
    encode_s = time.perf_counter() - t1
    tokens = sum(len(x) for x in ids)
    return result(
        "python sentencepiece", "unigram", vocab, utf8_len(lines), threads, train_s, encode_s, tokens
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", nargs="+", required=True, metavar="FILE")
    ap.add_argument("--field", default="text", help="JSON field of the documents (default text)")
    ap.add_argument("--vocab-size", type=int, default=30000)
    ap.add_argument(
        "--runs",
        default=",".join(RUNS),
        help=f"comma-separated subset of {','.join(RUNS)} (default all)",
    )
    ap.add_argument("--verbose", action="store_true", help="keep SentencePiece's training log")
    a = ap.parse_args()
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    for r in runs:
        if r not in RUNS:
            ap.error(f"unknown run {r!r} (choose from {', '.join(RUNS)})")

    docs = read_docs(a.corpus, a.field)
    for r in runs:
        if r == "sentencepiece":
            out = bench_sentencepiece(docs, a.vocab_size, a.verbose)
        else:
            out = bench_hf(r, docs, a.vocab_size)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
