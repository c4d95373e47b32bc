# Sourced by the bench scripts: COMPANION, the binary measured (default: the
# release build if there is one, else the debug build, in CARGO_TARGET_DIR
# when set, as ./scripts/test sets it, else target/).
if [[ -z "${COMPANION:-}" ]]; then
    dir="${CARGO_TARGET_DIR:-target}"
    if [[ -x "$dir/release/companion" ]]; then
        COMPANION="$dir/release/companion"
    else
        COMPANION="$dir/debug/companion"
    fi
fi
if [[ ! -x "$COMPANION" ]]; then
    echo "no companion binary at $COMPANION (build it, or set COMPANION)" >&2
    exit 1
fi
