#!/usr/bin/env bash
# Data preparation: the companion's streaming preparation (tokenize +
# group_texts + write token shards) against Python `datasets` (load_dataset
# + map(batched=True, num_proc=cores) twice, as run_clm does), on the
# shipped corpus repeated ×1, ×10, ×100, … (made in a temporary folder,
# never committed). Prints every JSON line, then a table: seconds, MB/s,
# peak RSS, blocks, and the ratios.
#
# Environment:
#   COMPANION   the binary (default target/release/companion if built, else
#               target/debug/companion)
#   PYTHON      the interpreter (default python3)
#   CORPUS      the corpus to repeat (default data/corpus/train.jsonl)
#   TOKENIZER   tokenizer folder (default data/pretrained/gpt2, GPT-2's)
#   BLOCK       block size (default 1024)
#   SIZES       repetitions measured for the companion (default "1 10 100")
#   PY_SIZES    repetitions measured for Python (default "1 10")
#   WORK        where the repeated corpora go (default a temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."

source bench/companion_bin.sh
PY=${PYTHON:-python3}
CORPUS=${CORPUS:-data/corpus/train.jsonl}
TOKENIZER=${TOKENIZER:-data/pretrained/gpt2}
BLOCK=${BLOCK:-1024}
SIZES=${SIZES:-1 10 100}
PY_SIZES=${PY_SIZES:-1 10}
WORK=${WORK:-$(mktemp -d)}
results=$(mktemp)
trap 'rm -f "$results"; [[ -z "${KEEP:-}" ]] && rm -rf "$WORK"/corpus-x*.jsonl' EXIT

corpus_x() { # corpus_x N: the corpus repeated N times
    local f="$WORK/corpus-x$1.jsonl" i
    if [[ ! -s "$f" ]]; then
        for ((i = 0; i < $1; i++)); do cat "$CORPUS"; done >"$f"
    fi
    echo "$f"
}

echo "binary: $COMPANION; corpus: $CORPUS; tokenizer: $TOKENIZER; block $BLOCK; cores: $(nproc)" >&2
for n in $SIZES; do
    f=$(corpus_x "$n")
    echo "== companion ×$n ($(du -hL "$f" | cut -f1))" >&2
    "$COMPANION" bench data --corpus "$f" --tokenizer "$TOKENIZER" --block-size "$BLOCK" --json |
        sed "s/^{/{\"times\": $n, /" | tee -a "$results"
done
for n in $PY_SIZES; do
    f=$(corpus_x "$n")
    echo "== python datasets ×$n" >&2
    "$PY" bench/bench_data.py --corpus "$f" --tokenizer "$TOKENIZER" --block-size "$BLOCK" |
        sed "s/^{/{\"times\": $n, /" | tee -a "$results"
done

"$PY" - "$results" <<'PYEOF'
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print(f"{'implementation':<40}{'×':>5}{'MB':>8}{'seconds':>9}{'MB/s':>8}{'peak RSS MiB':>14}{'blocks':>9}")
for r in rows:
    rss = f"{r['peak_rss_mib']:.0f}"
    if "worker_peak_rss_mib" in r:
        rss += f" + {r['worker_peak_rss_mib']:.0f}/worker"
    print(f"{r['implementation'][:39]:<40}{r['times']:>5}{r['corpus_bytes'] / 1e6:>8.1f}"
          f"{r['seconds']:>9.2f}{r['mb_per_s']:>8.2f}{rss:>14}{r['blocks']:>9}")
ours = {r["times"]: r for r in rows if r["implementation"].startswith("companion")}
theirs = {r["times"]: r for r in rows if not r["implementation"].startswith("companion")}
print()
for n in sorted(set(ours) & set(theirs)):
    o, t = ours[n], theirs[n]
    print(f"×{n}: companion is {t['seconds'] / o['seconds']:.2f}× as fast; peak RSS "
          f"{o['peak_rss_mib']:.0f} MiB vs {t['peak_rss_mib']:.0f} MiB (+ workers)")
if len(ours) > 1:
    rss = [ours[n]["peak_rss_mib"] for n in sorted(ours)]
    print(f"companion peak RSS from ×{min(ours)} to ×{max(ours)}: "
          + " → ".join(f"{x:.0f}" for x in rss)
          + f" MiB (largest / smallest = {max(rss) / min(rss):.2f})")
PYEOF
