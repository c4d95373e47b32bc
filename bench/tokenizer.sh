#!/usr/bin/env bash
# Tokenizer training and encoding: the companion against the Python libraries
# on the same corpus. Runs, in one go,
#   companion bench tokenizer --model bpe      (and --model unigram)
#   bench/bench_tokenizer.py  (tokenizers BPE, tokenizers unigram, sentencepiece)
# then prints every JSON line and a table with the ratios.
#
# Environment:
#   COMPANION      the binary (default target/release/companion if built, else
#                  target/debug/companion)
#   PYTHON         the interpreter (default python3)
#   CORPUS         the corpus (default data/corpus/train.jsonl)
#   VOCAB          vocabulary size (default 30000)
#   UNIGRAM_VOCAB  vocabulary size of the unigram rows (default $VOCAB)
#   WAIT_IDLE=1    before each measurement, wait (up to 15 min) until no
#                  `rustc` is running and the CPUs are idle (under 10% busy
#                  over 3 s), so that other work does not skew timings, and
#                  warn when a rustc ran during a measurement
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${COMPANION:-}" ]]; then
    if [[ -x target/release/companion ]]; then
        COMPANION=target/release/companion
    else
        COMPANION=target/debug/companion
    fi
fi
PY=${PYTHON:-python3}
CORPUS=${CORPUS:-data/corpus/train.jsonl}
VOCAB=${VOCAB:-30000}
UNIGRAM_VOCAB=${UNIGRAM_VOCAB:-$VOCAB}

if [[ ! -x "$COMPANION" ]]; then
    echo "no companion binary at $COMPANION (build it, or set COMPANION)" >&2
    exit 1
fi

# Percent of the CPUs busy over the next 3 seconds (from /proc/stat).
cpu_busy() {
    local a b c d e f g t1 i1 t2 i2
    read -r _ a b c d e f g _ </proc/stat
    t1=$((a + b + c + d + e + f + g)) i1=$((d + e))
    sleep 3
    read -r _ a b c d e f g _ </proc/stat
    t2=$((a + b + c + d + e + f + g)) i2=$((d + e))
    echo $((100 * ((t2 - t1) - (i2 - i1)) / (t2 - t1 > 0 ? t2 - t1 : 1)))
}

wait_idle() {
    [[ "${WAIT_IDLE:-0}" == 1 ]] || return 0
    local i
    for ((i = 0; i < 180; i++)); do
        if ! pgrep -x rustc >/dev/null && (($(cpu_busy) < 10)); then
            return 0
        fi
        sleep 2
    done
    echo "warning: no rustc-free, idle moment in 15 minutes; measuring anyway" >&2
}

results=$(mktemp)
busy=$(mktemp -u)
watcher=
cleanup() {
    [[ -n "$watcher" ]] && kill "$watcher" 2>/dev/null
    rm -f "$results" "$busy"
}
trap cleanup EXIT
if [[ "${WAIT_IDLE:-0}" == 1 ]]; then
    # Notes (in $busy) whenever a rustc runs, checked after each measurement.
    (while :; do pgrep -x rustc >/dev/null && touch "$busy"; sleep 1; done) &
    watcher=$!
fi
checked() {
    if [[ -e "$busy" ]]; then
        echo "warning: rustc ran during the measurement of $1" >&2
        rm -f "$busy"
    fi
}

echo "binary: $COMPANION; corpus: $CORPUS; cores: $(nproc)" >&2
for model in bpe unigram; do
    vocab=$VOCAB
    [[ $model == unigram ]] && vocab=$UNIGRAM_VOCAB
    wait_idle
    rm -f "$busy"
    echo "== companion $model (vocab $vocab)" >&2
    "$COMPANION" bench tokenizer --corpus "$CORPUS" --model "$model" \
        --vocab-size "$vocab" --json | tee -a "$results"
    checked "companion $model"
done
for run in bpe unigram sentencepiece; do
    vocab=$VOCAB
    [[ $run != bpe ]] && vocab=$UNIGRAM_VOCAB
    wait_idle
    rm -f "$busy"
    echo "== python $run (vocab $vocab)" >&2
    "$PY" bench/bench_tokenizer.py --corpus "$CORPUS" --vocab-size "$vocab" \
        --runs "$run" | tee -a "$results"
    checked "python $run"
done

"$PY" - "$results" <<'PYEOF'
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print(f"{'implementation':<22}{'model':<9}{'vocab':>7}{'MB':>7}{'thr':>5}"
      f"{'train s':>10}{'encode s':>10}{'enc MB/s':>10}{'tokens':>11}")
for r in rows:
    print(f"{r['implementation']:<22}{r['model']:<9}{r['vocab_size']:>7}"
          f"{r['corpus_bytes'] / 1e6:>7.2f}{r['threads']:>5}{r['train_seconds']:>10.2f}"
          f"{r['encode_seconds']:>10.3f}{r['encode_mb_per_s']:>10.2f}{r['tokens']:>11}")

ours = {r["model"]: r for r in rows if r["implementation"].startswith("companion")}
print()
print(f"{'ours / python':<36}{'train time':>11}{'enc MB/s':>10}{'tokens':>9}")
for r in rows:
    o = ours.get(r["model"])
    if o is None or r is o or r["implementation"].startswith("companion"):
        continue
    label = f"{r['model']}: vs {r['implementation']}"
    print(f"{label:<36}{o['train_seconds'] / r['train_seconds']:>11.2f}"
          f"{o['encode_mb_per_s'] / r['encode_mb_per_s']:>10.2f}"
          f"{o['tokens'] / r['tokens']:>9.3f}")
print("(train time < 1: ours trains faster; enc MB/s > 1: ours encodes faster)")
PYEOF
