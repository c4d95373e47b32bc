# Sourced by the bench scripts: COMPANION, the binary measured (default
# target/release/companion if built, else target/debug/companion).
if [[ -z "${COMPANION:-}" ]]; then
    if [[ -x target/release/companion ]]; then
        COMPANION=target/release/companion
    else
        COMPANION=target/debug/companion
    fi
fi
if [[ ! -x "$COMPANION" ]]; then
    echo "no companion binary at $COMPANION (build it, or set COMPANION)" >&2
    exit 1
fi
