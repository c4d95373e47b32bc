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
#                  over 3 s), so that other work does not skew timings
# Every row notes (other%) how much CPU other processes took while it ran.
set -euo pipefail
cd "$(dirname "$0")/.."

source bench/companion_bin.sh
PY=${PYTHON:-python3}
CORPUS=${CORPUS:-data/corpus/train.jsonl}
VOCAB=${VOCAB:-30000}
UNIGRAM_VOCAB=${UNIGRAM_VOCAB:-$VOCAB}


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
others=$(mktemp)
own=$(mktemp)
trap 'rm -f "$results" "$others" "$own"' EXIT

# The CPU that other processes used while one measurement ran, in percent of
# the machine: busy time (/proc/stat) less what our children used (`times`;
# run in this shell, a subshell would count its own children only).
stat_jiffies() { # prints "busy total" in clock ticks
    local a b c d e f g h
    read -r _ a b c d e f g h _ </proc/stat
    echo "$((a + b + c + f + g + h)) $((a + b + c + d + e + f + g + h))"
}
own_seconds() { # sets OWN: user + system seconds of the children reaped so far
    times >"$own"
    OWN=$(awk 'NR == 2 { s = 0; for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); s += p[1] * 60 + p[2] } print s }' "$own")
}
measure() { # measure NAME COMMAND...: run, append its JSON to $results
    local name=$1 before after s0 s1 hz
    shift
    wait_idle
    echo "== $name" >&2
    own_seconds
    s0=$OWN before=$(stat_jiffies)
    "$@" | tee -a "$results"
    after=$(stat_jiffies)
    own_seconds
    s1=$OWN
    hz=$(getconf CLK_TCK)
    awk -v b="$before" -v a="$after" -v s0="$s0" -v s1="$s1" -v hz="$hz" -v name="$name" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        busy = y[1] - x[1]; total = y[2] - x[2]; mine = (s1 - s0) * hz
        pct = total > 0 ? 100 * (busy - mine) / total : 0
        if (pct < 0) pct = 0
        printf "%.0f\n", pct
        if (pct >= 5) printf "warning: other processes used %.0f%% of the CPUs during %s\n", pct, name > "/dev/stderr"
    }' >>"$others"
}

echo "binary: $COMPANION; corpus: $CORPUS; cores: $(nproc)" >&2
for model in bpe unigram; do
    vocab=$VOCAB
    [[ $model == unigram ]] && vocab=$UNIGRAM_VOCAB
    measure "companion $model (vocab $vocab)" \
        "$COMPANION" bench tokenizer --corpus "$CORPUS" --model "$model" \
        --vocab-size "$vocab" --json
done
for run in bpe unigram sentencepiece; do
    vocab=$VOCAB
    [[ $run != bpe ]] && vocab=$UNIGRAM_VOCAB
    measure "python $run (vocab $vocab)" \
        "$PY" bench/bench_tokenizer.py --corpus "$CORPUS" --vocab-size "$vocab" --runs "$run"
done

"$PY" - "$results" "$others" <<'PYEOF'
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
others = [l.strip() for l in open(sys.argv[2]) if l.strip()]
print()
print(f"{'implementation':<22}{'model':<9}{'vocab':>7}{'MB':>7}{'thr':>5}"
      f"{'train s':>10}{'encode s':>10}{'enc MB/s':>10}{'tokens':>11}{'other%':>8}")
for r, o in zip(rows, others):
    print(f"{r['implementation']:<22}{r['model']:<9}{r['vocab_size']:>7}"
          f"{r['corpus_bytes'] / 1e6:>7.2f}{r['threads']:>5}{r['train_seconds']:>10.2f}"
          f"{r['encode_seconds']:>10.3f}{r['encode_mb_per_s']:>10.2f}{r['tokens']:>11}{o:>8}")
print("(other%: CPU that other processes took during the row's run, of the whole machine)")

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
