#!/usr/bin/env bash
# `companion zero-to-fp32` beside DeepSpeed's own zero_to_fp32.py on the same
# ZeRO checkpoint (written by `companion pretrain --deepspeed` on 2 CPU ranks),
# in one run: wall time and peak memory (max RSS) of each, and the checkpoint's
# size. Usage: bench/zero_to_fp32.sh [STAGE] [N_EMBD] [N_LAYER]
# Needs deepspeed (requirements-test.txt) and GNU time (/usr/bin/time).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/companion_bin.sh
stage=${1:-3}
n_embd=${2:-768}
n_layer=${3:-12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/ds.json" <<JSON
{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
 "train_batch_size": "auto", "zero_optimization": {"stage": $stage}}
JSON
"$COMPANION" pretrain --train-file data/corpus/validation.jsonl --no-validation \
    --tokenizer-vocab-size 8000 --n-layer "$n_layer" --n-embd "$n_embd" --n-head 12 \
    --n-positions 64 --block-size 64 --max-steps 1 --save-steps 1 \
    --per-device-train-batch-size 1 --logging-steps 1 --output-dir "$work/run" \
    --save-model-dir "$work/model" --max-new-tokens 1 \
    --deepspeed "$work/ds.json" --num-ranks 2 >/dev/null 2>"$work/pretrain.log" \
    || { cat "$work/pretrain.log"; exit 1; }
ckpt="$work/run/checkpoint-1"
echo "checkpoint: ZeRO-$stage, 2 ranks, $(du -sh "$ckpt/global_step1" | cut -f1) in global_step1/, model.safetensors $(du -h "$ckpt/model.safetensors" | cut -f1)"
measure() {
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/out.log" 2>&1 \
        || { cat "$work/out.log"; exit 1; }
    read -r secs kib <"$work/time"
    printf '%-32s %6.1f s   peak RSS %7.1f MiB\n' "$label" "$secs" "$(echo "$kib / 1024" | bc -l)"
}
measure "companion zero-to-fp32" "$COMPANION" zero-to-fp32 "$ckpt" "$work/ours" --json
python3 - "$work/out.log" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{s['elements'] / 1e6:.2f}M parameters in {s['tensors']} tensors ({s['elements'] * 4 / 1e6:.0f} MB of fp32)")
PY
measure "deepspeed zero_to_fp32.py" env DS_ACCELERATOR=cpu python3 -m deepspeed.utils.zero_to_fp32 "$ckpt" "$work/theirs"
python3 - "$work/ours/model.safetensors" "$work/theirs/pytorch_model.bin" <<'PY'
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), torch.load(sys.argv[2], weights_only=True)
print("same tensors:", all(torch.equal(a[k], b[k]) for k in a), f"({len(a)} tensors)")
PY
