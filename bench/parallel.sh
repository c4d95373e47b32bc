#!/usr/bin/env bash
# 3D parallelism through the Trainer on CPU ranks (threads), in one run:
# one rank, then tensor, pipeline and data parallel layouts of the same
# global batch. Per layout: tokens/s, each rank's bytes (weights, Adam,
# activations in flight), the share of the step a rank waited on its
# pipeline neighbours beside PipeDream-Flush's bubble (pp-1)/(m+pp-1), and
# the bytes each rank sent through its tensor, pipeline and data groups
# beside the count from the Megatron-LM and ZeRO papers' terms; each rank's
# parameter bytes are checked against Megatron's split.
# Usage: bench/parallel.sh [SHAPE] [STEPS] [MICRO_BATCHES]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/companion_bin.sh
shape=${1:-small}
steps=${2:-3}
m=${3:-4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# (ranks, tp, pp, ds_config): data parallelism takes ZeRO-1, as Megatron's distributed optimizer.
layouts=("1 1 1 -" "2 2 1 -" "2 1 2 -" "4 2 2 -" "4 2 1 data/ds_config/zero1.json")
for l in "${layouts[@]}"; do
    read -r ranks tp pp ds <<<"$l"
    extra=()
    if [[ "$ds" != "-" ]]; then extra=(--deepspeed "$ds"); fi
    # The global batch stays the same: each data-parallel replica takes its share.
    dp=$((ranks / (tp * pp)))
    "$COMPANION" bench trainer --shape "$shape" --steps "$steps" --num-ranks "$ranks" \
        --tensor-model-parallel-size "$tp" --pipeline-model-parallel-size "$pp" \
        --gradient-accumulation-steps $((m / dp)) "${extra[@]}" --json \
        >"$work/tp${tp}_pp${pp}_r${ranks}.json"
done
python3 - "$work" <<'PY'
import glob, json, os, sys
rows = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")),
        key=lambda f: (os.path.getmtime(f)))]
one = rows[0]
print(f"shape {one['shape']}, {one['batch_per_rank']} rows × {one['seq']} tokens per micro-batch, "
      f"{one['threads']} threads")
print(f"{'layout':<16}{'tokens/s':>10}{'vs 1 rank':>10}{'MiB/rank (max)':>16}{'bubble':>16}{'sent MB/step (rank 0)':>36}")
for r in rows:
    lay = f"tp{r['tensor_model_parallel_size']} pp{r['pipeline_model_parallel_size']} dp{r['data_parallel_size']}"
    mem = max(m["params"] + m["grads"] + m["optimizer_states"] + (m["activations_held"] or 0)
              for m in r["model_state_bytes_per_rank"]) / 2**20
    bubble, sent = "-", "-"
    if "per_rank" in r:
        worst = max(p["bubble_measured"] for p in r["per_rank"])
        bubble = f"{worst:.2f} / {r['bubble_formula']:.2f}"
        p = r["per_rank"][0]
        got, want = p["sent_bytes_measured"], p["sent_bytes_formula"]
        sent = " ".join(f"{k[0]} {got[k] / 1e6:.1f}/{want[k] / 1e6:.1f}" for k in ("tensor", "pipeline", "data"))
        assert got == want, f"{lay}: sent {got}, the papers' count {want}"
        for q in r["per_rank"]:
            assert q["params_bytes_measured"] == q["params_bytes_formula"], \
                f"{lay} rank {q['rank']}: holds {q['params_bytes_measured']} B, Megatron's split {q['params_bytes_formula']} B"
    print(f"{lay:<16}{r['tokens_per_second']:>10.0f}{r['tokens_per_second'] / one['tokens_per_second']:>10.2f}"
          f"{mem:>16.1f}{bubble:>16}{sent:>36}")
print("bubble: the most any rank waited (measured) / (pp-1)/(m+pp-1); sent: measured/formula, t p d = tensor, pipeline, data group")
PY
