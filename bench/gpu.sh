#!/usr/bin/env bash
# The GPU run in one command: environment, parity with the CPU, speed
# against PyTorch on the same GPU. Every step runs under its own `timeout`
# and the whole stays under 8 minutes on one H200; results are written as
# they come into $OUT (gpu.log, env.json, gpu.json), and a run that used a
# GPU also into bench/results/gpu.json.
#
#   bench/gpu.sh                    the binary from dist/cuda/companion.xz
#   COMPANION=path bench/gpu.sh     another binary
#   GPU_SH_REHEARSE=1 bench/gpu.sh  every step on the CPU instead (ranks on
#                                   the CPU, a small shape): rehearses the
#                                   script's logic on a machine without a GPU
#
# Build the binary first, here: ./scripts/build-cuda (carry dist/cuda/).
# The CUDA libraries are taken from the Python environment's nvidia/*/lib
# folders (where torch's cu13 wheels put them); the hub is never asked
# (HF_HUB_OFFLINE=1, the model configs are presets).
#
# gpu.json: device, driver, parity (name: true, false, or null when the
# step could not run here, with the reason in `skipped`), and `companion`
# and `pytorch` with train_tokens_per_second, train_mfu, peak_memory_gib
# and generate_tokens_per_second (GPT-2 124M, bf16, T=1024, the largest
# micro-batch of 16, 8, 4, 2, 1 that fits both). Exits 1 when a parity check
# fails or the GPU cannot be used (say which, in gpu.log), never hangs.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT" bench/results
LOG="$OUT/gpu.log"
: >"$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
DEADLINE=${GPU_SH_DEADLINE:-450}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS="$WORK/steps.jsonl"
: >"$STEPS"

say() { echo "== $*" | tee -a "$LOG"; }

# run NAME SECONDS CMD...: CMD's stdout into $WORK/NAME.out, both streams
# into the log; records the exit status and the time taken.
run() {
    local name="$1" secs="$2"; shift 2
    local left=$(( DEADLINE - ($(date +%s) - T0) ))
    if [ "$left" -lt 10 ]; then
        say "$name: skipped, the script's $DEADLINE s are spent"
        echo "{\"step\": \"$name\", \"rc\": null, \"why\": \"out of time\"}" >>"$STEPS"
        return 125
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    say "$name (at most $secs s): $*"
    local t=$(date +%s) rc=0
    timeout --kill-after=5 "$secs" "$@" >"$WORK/$name.out" 2> >(tee -a "$LOG" >&2) || rc=$?
    cat "$WORK/$name.out" >>"$LOG"
    local took=$(( $(date +%s) - t ))
    [ "$rc" = 124 ] && say "$name: TIMED OUT after $secs s"
    say "$name: exit $rc in $took s"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $took}" >>"$STEPS"
    return "$rc"
}

# --- the binary and its libraries ---
BIN=${COMPANION:-}
if [ -z "$BIN" ]; then
    BIN="$WORK/companion"
    if [ ! -f dist/cuda/companion.xz ]; then
        say "no dist/cuda/companion.xz: build it with ./scripts/build-cuda and carry dist/cuda/"
        exit 1
    fi
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        dist/cuda/companion.xz "$BIN"
    chmod +x "$BIN"
fi
LIBS=$("$PY" - <<'PYEOF' 2>/dev/null
import glob, os
try:
    import nvidia
    print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})))
except ImportError:
    print("")
PYEOF
)
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ldd "$BIN" 2>&1 | grep -q "not found"; then
    ldd "$BIN" | grep "not found" | tee -a "$LOG"
    say "libraries above are missing: install torch's CUDA wheels (nvidia-*-cu13) or set LD_LIBRARY_PATH"
fi

# --- environment ---
run nvidia_smi 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
run env 180 "$BIN" env --json --expect cuda
cp "$WORK/env.out" "$OUT/env.json" 2>/dev/null
# From env.json's first device: whether its tiny step agreed with the CPU
# (the GPU is usable), and whether every fused kernel agreed with its twin.
read -r GPU KERNELS_OK < <("$PY" - "$WORK/env.out" <<'PYEOF' 2>/dev/null || echo "0 1"
import json, sys
try:
    dev = (json.load(open(sys.argv[1])).get("devices") or [{}])[0]
except (OSError, ValueError):
    dev = {}
ok = bool((dev.get("check") or {}).get("passed"))
kernels = all(k.get("passed") for k in dev.get("kernels") or [])
print(int(ok), int(kernels))
PYEOF
)
if [ "$GPU" = 0 ]; then
    say "the GPU cannot be used by this binary (companion env's problems are above): every GPU step is skipped"
fi
# A fused kernel that differs from its CPU twin (or fails) is reported
# (parity below), and the other steps run on candle's composite ops instead.
if [ "$KERNELS_OK" = 0 ]; then
    say "a fused CUDA kernel differs from its CPU twin (env.json): the steps below use COMPANION_FUSED_CUDA=0"
    export COMPANION_FUSED_CUDA=0
fi

# What stands for the GPU: itself, or the CPU in a rehearsal.
GPU_RANK=(--num-gpus 1); DEV=cuda:0; PYDEV=cuda; SHAPE=(--shape gpt2 --seq 1024); PYSHAPE=(gpt2 10 --seq 1024)
if [ "${GPU_SH_REHEARSE:-0}" = 1 ]; then
    say "rehearsal: every GPU step runs on the CPU (ranks on the CPU, the small shape)"
    GPU=1; GPU_RANK=(--num-ranks 1); DEV=cpu; PYDEV=cpu; SHAPE=(--shape small --seq 256); PYSHAPE=(small 2 --seq 256)
fi

# --- parity: the same tiny runs on the CPU and on the GPU ---
TINY=(--n-layer 2 --n-embd 64 --n-head 4 --block-size 64 --dropout 0 --per-device-train-batch-size 8
      --learning-rate 1e-3 --logging-steps 1 --save-strategy no --eval-strategy no --no-validation
      --seed 7 --report-to none --prompt Hello)
pretrain() {  # pretrain NAME SECONDS FLAGS...
    local name="$1" secs="$2"; shift 2
    run "$name" "$secs" "$BIN" pretrain --output-dir "$WORK/$name" --save-model-dir "$WORK/$name/model" \
        "${TINY[@]}" ${TOKENIZER:+--tokenizer "$TOKENIZER"} "$@"
}
pretrain cpu_f32 120 --max-steps 50
TOKENIZER="$WORK/cpu_f32/tokenizer"
[ -d "$TOKENIZER" ] || TOKENIZER=""
if [ "$GPU" = 1 ]; then
    pretrain cuda_f32 60 --max-steps 50 "${GPU_RANK[@]}"
    pretrain cuda_bf16 60 --max-steps 50 "${GPU_RANK[@]}" --bf16
    pretrain cuda_plain20 45 --max-steps 20 "${GPU_RANK[@]}"
    for s in 0 1 2 3; do
        pretrain "cuda_zero$s" 45 --max-steps 20 "${GPU_RANK[@]}" --deepspeed "data/ds_config/zero$s.json"
    done
    pretrain cuda_ckpt 45 --max-steps 20 "${GPU_RANK[@]}" --save-strategy steps --save-steps 10
    # The checkpoint the GPU wrote at step 10, resumed on the CPU to step 20.
    if [ -d "$WORK/cuda_ckpt/checkpoint-10" ]; then
        mkdir -p "$WORK/cpu_resume"
        cp -r "$WORK/cuda_ckpt/checkpoint-10" "$WORK/cpu_resume/"
        run cpu_resume 60 "$BIN" pretrain --output-dir "$WORK/cpu_resume" \
            --save-model-dir "$WORK/cpu_resume/model" "${TINY[@]}" ${TOKENIZER:+--tokenizer "$TOKENIZER"} \
            --max-steps 20 --resume-from-checkpoint "$WORK/cpu_resume/checkpoint-10"
    fi

    # --- speed: GPT-2 124M, bf16, T=1024 ---
    for b in 16 8 4 2 1; do
        if run "companion_train_b$b" 120 "$BIN" bench train --device "$DEV" --dtype bf16 "${SHAPE[@]}" \
            --batch "$b" --steps "${PYSHAPE[1]}" --json; then
            run "pytorch_train_b$b" 120 "$PY" bench/model.py train "${PYSHAPE[@]}" --device "$PYDEV" --dtype bf16 \
                --batch "$b"
            # The same without the fused kernels: what they are worth.
            run "composite_train_b$b" 90 env COMPANION_FUSED_CUDA=0 "$BIN" bench train --device "$DEV" \
                --dtype bf16 "${SHAPE[@]}" --batch "$b" --steps "${PYSHAPE[1]}" --json
            break
        fi
    done
    run companion_trainer 90 "$BIN" bench trainer --device "$DEV" "${SHAPE[@]:0:2}" --steps 5 --json
    run companion_generate 60 "$BIN" bench generate --device "$DEV" --dtype bf16 "${SHAPE[@]:0:2}" --json
    run pytorch_generate 60 "$PY" bench/model.py generate "${PYSHAPE[0]}" --device "$PYDEV" --dtype bf16
fi

# --- gpu.json ---
"$PY" - "$WORK" "$OUT/gpu.json" "$GPU" "${GPU_SH_REHEARSE:-0}" <<'PYEOF'
import json, os, sys
work, out, gpu, rehearsal = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
steps = [json.loads(l) for l in open(os.path.join(work, "steps.jsonl"))]

def text(name):
    try:
        return open(os.path.join(work, name + ".out")).read()
    except OSError:
        return ""

def last_json(name):
    for line in reversed(text(name).splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            pass
    return None

def losses(name):
    """Training losses by step, from the run's trainer_state.json."""
    try:
        s = json.load(open(os.path.join(work, name, "trainer_state.json")))
    except (OSError, ValueError):
        return None
    return {e["step"]: e["loss"] for e in s["log_history"] if "loss" in e}

def close(a, b, rel):
    if not a or not b or a.keys() != b.keys():
        return False
    return all(abs(a[k] - b[k]) <= rel * abs(b[k]) for k in a)

parity, skipped = {}, {}
env = last_json("env") or {}
dev = (env.get("devices") or [{}])[0]
parity["tiny_forward_backward_vs_cpu"] = (dev.get("check") or {}).get("passed", False) if gpu else None
if rehearsal:
    parity["tiny_forward_backward_vs_cpu"] = None
    skipped["tiny_forward_backward_vs_cpu"] = "rehearsal on the CPU"
cpu = losses("cpu_f32")
if gpu:
    parity["train_50_steps_f32_vs_cpu"] = close(losses("cuda_f32"), cpu, 1e-4)
    bf = losses("cuda_bf16")
    parity["train_50_steps_bf16_vs_f32_cpu"] = bool(bf and cpu and abs(bf[max(bf)] - cpu[max(cpu)]) <= 1e-2 * cpu[max(cpu)])
    plain = losses("cuda_plain20")
    for s in range(4):
        parity[f"zero{s}_vs_no_zero"] = close(losses(f"cuda_zero{s}"), plain, 1e-5)
    gpu_run, resumed = losses("cuda_ckpt"), losses("cpu_resume")
    later = lambda d: {k: v for k, v in (d or {}).items() if k > 10}
    parity["gpu_checkpoint_resumed_on_cpu"] = bool(later(resumed)) and close(later(resumed), later(gpu_run), 1e-4)
else:
    for k in ["train_50_steps_f32_vs_cpu", "train_50_steps_bf16_vs_f32_cpu", "zero0_vs_no_zero",
              "zero1_vs_no_zero", "zero2_vs_no_zero", "zero3_vs_no_zero", "gpu_checkpoint_resumed_on_cpu"]:
        parity[k] = None
        skipped[k] = "no usable GPU (see env)"
parity["two_thread_ranks_on_one_gpu"] = None
skipped["two_thread_ranks_on_one_gpu"] = "--num-gpus puts rank r on cuda:r; one GPU holds one rank"
# Each fused kernel against its CPU twin, as companion env compared them.
kernels = dev.get("kernels") or []
for k in kernels:
    parity[f"fused_{k['op']}_{k['dtype']}_vs_cpu"] = k["passed"] if gpu and not rehearsal else None
if not kernels or not gpu or rehearsal:
    parity["fused_cuda_kernels_vs_cpu"] = None
    skipped["fused_cuda_kernels_vs_cpu"] = "rehearsal on the CPU" if rehearsal else "no usable GPU (see env)"

def speed(prefix):
    train = next((last_json(f"{prefix}_train_b{b}") for b in (16, 8, 4, 2, 1)
                  if last_json(f"{prefix}_train_b{b}")), None) or {}
    gen = last_json(f"{prefix}_generate") or {}
    return {
        "train_tokens_per_second": train.get("tokens_per_second"),
        "train_mfu": train.get("mfu"),
        "train_batch": train.get("batch"),
        "peak_memory_gib": train.get("peak_device_memory_gib"),
        "generate_tokens_per_second": gen.get("tokens_per_second"),
        "train": train or None,
        "generate": gen or None,
        "composite_train": next((last_json(f"composite_train_b{b}") for b in (16, 8, 4, 2, 1)
                                 if last_json(f"composite_train_b{b}")), None) if prefix == "companion" else None,
        "trainer": last_json(f"{prefix}_trainer"),
    }

smi = text("nvidia_smi").strip().split(", ")
report = {
    "rehearsal_on_cpu": rehearsal,
    "device": smi[0] if len(smi) > 1 else dev.get("name"),
    "driver": smi[1] if len(smi) > 1 else env.get("cuda_driver"),
    "parity": parity,
    "skipped": skipped,
    "companion": speed("companion"),
    "pytorch": speed("pytorch"),
    "steps": steps,
    "problems": env.get("problems"),
}
open(out, "w").write(json.dumps(report, indent=1) + "\n")
failed = [k for k, v in parity.items() if v is False]
print("parity failed: " + ", ".join(failed) if failed else "parity: every check that ran passed")
sys.exit(1 if failed or not gpu else 0)
PYEOF
rc=$?
# Only a run that used a GPU is a result worth keeping in the repository.
[ "$GPU" = 1 ] && [ "${GPU_SH_REHEARSE:-0}" != 1 ] && cp "$OUT/gpu.json" bench/results/gpu.json
say "gpu.json written to $OUT; exit $rc after $(( $(date +%s) - T0 )) s"
exit $rc
