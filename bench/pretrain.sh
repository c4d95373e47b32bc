#!/usr/bin/env bash
# `companion pretrain` beside the same recipe in PyTorch transformers, with the
# same tokenizer, the same recipe (ours reports it in its JSON) and the same
# wall-clock training time:
#   1. target/release/companion pretrain --output-dir <tmp>/ours
#        --save-model-dir <tmp>/ours_model --json [extra flags]
#   2. bench/pretrain_pytorch.py --seconds <our train_runtime>
#        --tokenizer <tmp>/ours/tokenizer <our recipe as flags>
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
start=$SECONDS
"$BIN" pretrain --output-dir "$tmp/ours" --save-model-dir "$tmp/ours_model" --json "$@" \
    | tee "$tmp/ours.json"
echo "companion pretrain took $((SECONDS - start)) s in all (tokenizer, data, training, evaluation, saving, generation)" >&2
secs=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["train_runtime"])' "$tmp/ours.json")

# The recipe ours ran with (its JSON "recipe"), as flags of the PyTorch script.
recipe=$("$PY" - "$tmp/ours.json" <<'PYEOF'
import json, sys

r = json.load(open(sys.argv[1]))["recipe"]
unsupported = []
if r["lr_scheduler_type"] != "cosine":
    unsupported.append(f"lr_scheduler_type {r['lr_scheduler_type']}")
if r["gradient_accumulation_steps"] != 1:
    unsupported.append(f"gradient_accumulation_steps {r['gradient_accumulation_steps']}")
if r["warmup_steps"]:
    unsupported.append(f"warmup_steps {r['warmup_steps']} (use warmup_ratio)")
if any(r["dropout"]):
    unsupported.append(f"dropout {r['dropout']}")
if r.get("deepspeed_scheduler"):
    unsupported.append("a ds_config scheduler")
if r["eval_strategy"] == "epoch":
    unsupported.append("eval_strategy epoch")
if unsupported:
    sys.exit("bench/pretrain_pytorch.py does not run: " + ", ".join(unsupported))
flags = {
    "n-layer": r["n_layer"], "n-embd": r["n_embd"], "n-head": r["n_head"],
    "n-positions": r["n_positions"], "block-size": r["block_size"],
    "batch-size": r["per_device_train_batch_size"],
    "learning-rate": r["learning_rate"], "weight-decay": r["weight_decay"],
    "adam-beta1": r["adam_beta1"], "adam-beta2": r["adam_beta2"],
    "adam-epsilon": r["adam_epsilon"],
    "max-grad-norm": r["max_grad_norm"], "warmup-ratio": r["warmup_ratio"],
    "eval-steps": r["eval_steps"], "seed": r["seed"],
}
if r["max_eval_samples"] is not None:
    flags["max-eval-samples"] = r["max_eval_samples"]
print(" ".join(f"--{k} {v}" for k, v in flags.items()))
PYEOF
)

echo "== pytorch transformers, --seconds $secs $recipe" >&2
# shellcheck disable=SC2086  # $recipe is a list of flags
"$PY" bench/pretrain_pytorch.py --seconds "$secs" --tokenizer "$tmp/ours/tokenizer" $recipe \
    | tee "$tmp/pytorch.json"

"$PY" - "$tmp/ours.json" "$tmp/pytorch.json" <<'PYEOF'
import json, sys

ours = json.load(open(sys.argv[1]))
pt = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
r = ours["recipe"]
tokens = r["per_device_train_batch_size"] * r["block_size"] * r["gradient_accumulation_steps"]
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
