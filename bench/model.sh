#!/usr/bin/env bash
# `companion bench train|generate` beside PyTorch transformers on the same
# shapes, in one run. Usage: bench/model.sh [small|gpt2 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${COMPANION:-target/release/companion}
[ -x "$BIN" ] || cargo build --release -p companion
for shape in "${@:-small gpt2}"; do
  for what in train generate; do
    "$BIN" bench "$what" --shape "$shape" --json
    python3 bench/model.py "$what" "$shape"
  done
done
