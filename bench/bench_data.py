"""The Python side of bench/data.sh: run_clm's data preparation with Hugging
Face `datasets` on a JSONL corpus, timed, in one process:

    load_dataset("json", data_files=CORPUS)
    .map(tokenize, batched=True, num_proc=N)      # + eos per document
    .map(group_texts, batched=True, num_proc=N)   # blocks of BLOCK tokens

into a fresh cache folder (so nothing is reused), with the same fast
tokenizer. Prints one JSON line: seconds, MB/s, peak RSS of this process
and of its largest worker, and the block count (to compare with ours).
"""
import argparse
import json
import os
import resource
import shutil
import tempfile
import time

p = argparse.ArgumentParser()
p.add_argument("--corpus", required=True)
p.add_argument("--tokenizer", default="data/pretrained/gpt2")
p.add_argument("--block-size", type=int, default=1024)
p.add_argument("--num-proc", type=int, default=os.cpu_count())
a = p.parse_args()

cache = tempfile.mkdtemp(prefix="bench-data-")
os.environ["HF_DATASETS_CACHE"] = cache
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers are processes
import datasets  # noqa: E402  (after HF_DATASETS_CACHE)
from transformers import AutoTokenizer  # noqa: E402

datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained(a.tokenizer)
eos = tok.eos_token_id
block = a.block_size


def tokenize(batch):
    # Empty documents are skipped, as the companion skips them.
    ids = tok([t for t in batch["text"] if t])["input_ids"]
    return {"input_ids": [x + [eos] for x in ids]}


def group_texts(batch):
    joined = [t for x in batch["input_ids"] for t in x]
    total = len(joined) // block * block
    return {"input_ids": [joined[i : i + block] for i in range(0, total, block)]}


t0 = time.perf_counter()
raw = datasets.load_dataset("json", data_files=a.corpus, split="train", cache_dir=cache)
tokenized = raw.map(tokenize, batched=True, num_proc=a.num_proc, remove_columns=raw.column_names)
text_tokens = None
grouped = tokenized.map(group_texts, batched=True, num_proc=a.num_proc)
secs = time.perf_counter() - t0
size = os.path.getsize(a.corpus)
print(json.dumps({
    "implementation": f"python datasets {datasets.__version__} (num_proc={a.num_proc})",
    "corpus": a.corpus,
    "corpus_bytes": size,
    "threads": a.num_proc,
    "seconds": secs,
    "mb_per_s": size / 1e6 / secs,
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN is the largest worker.
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "documents": raw.num_rows,
    "blocks": grouped.num_rows,
    "block_size": block,
}))
shutil.rmtree(cache, ignore_errors=True)
