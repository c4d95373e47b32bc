#!/usr/bin/env bash
# `companion pretrain` beside the same recipe in PyTorch transformers, with the
# same tokenizer and the same wall-clock training time:
#   1. target/release/companion pretrain --output-dir <tmp>/ours
#        --save-model-dir <tmp>/ours_model --json [extra flags]
#   2. bench/pretrain_pytorch.py --seconds <our train_runtime>
#        --tokenizer <tmp>/ours/tokenizer
# then prints both held-out results (loss, perplexity, bits per byte) side by
# side. Extra arguments go to `companion pretrain` (e.g. --max-steps 20).
#
# Runs from the repository root; the corpus is data/corpus/{train,validation}.jsonl.
#
# Environment:
#   COMPANION  the binary (default target/release/companion)
#   PYTHON     the interpreter (default python3)
#   KEEP=1     keep the temporary folder (its path is printed)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${COMPANION:-target/release/companion}
PY=${PYTHON:-python3}
if [[ ! -x "$BIN" ]]; then
    echo "no companion binary at $BIN (cargo build --release -p companion, or set COMPANION)" >&2
    exit 1
fi

tmp=$(mktemp -d)
if [[ "${KEEP:-0}" == 1 ]]; then
    echo "keeping $tmp" >&2
else
    trap 'rm -rf "$tmp"' EXIT
fi

echo "== companion pretrain ($(nproc) cores)" >&2
"$BIN" pretrain --output-dir "$tmp/ours" --save-model-dir "$tmp/ours_model" --json "$@" \
    | tee "$tmp/ours.json"
secs=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["train_runtime"])' "$tmp/ours.json")

echo "== pytorch transformers, --seconds $secs" >&2
"$PY" bench/pretrain_pytorch.py --seconds "$secs" --tokenizer "$tmp/ours/tokenizer" \
    | tee "$tmp/pytorch.json"

"$PY" - "$tmp/ours.json" "$tmp/pytorch.json" <<'PYEOF'
import json, sys

ours = json.load(open(sys.argv[1]))
pt = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
tokens = 8 * 256  # per step: batch 8 x block 256
rows = [
    ("companion", ours["global_step"], ours["train_runtime"],
     ours["global_step"] * tokens / ours["train_runtime"], ours["before"], ours["after"]),
    ("pytorch transformers", pt["steps"], pt["train_seconds"], pt["tokens_per_second"],
     pt["before"], pt["after"]),
]
print()
print(f"{'implementation':<22}{'steps':>6}{'train s':>9}{'tok/s':>8}"
      f"{'loss before':>12}{'loss after':>11}{'ppl after':>10}{'bpb before':>11}{'bpb after':>10}")
for name, steps, secs, tps, b, a in rows:
    print(f"{name:<22}{steps:>6}{secs:>9.1f}{tps:>8.0f}{b['eval_loss']:>12.4f}"
          f"{a['eval_loss']:>11.4f}{a['perplexity']:>10.1f}{b['bits_per_byte']:>11.3f}"
          f"{a['bits_per_byte']:>10.3f}")
print("(same tokenizer, same wall-clock training time; bpb = held-out bits per byte, "
      "lower is better)")
PYEOF
