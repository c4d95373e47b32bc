#!/usr/bin/env bash
# Remakes fixtures/pretrained_model/, the committed run of 4.3.4 that the test
# command's quick mode checks its first steps against and shows, and that
# 4.3.5 then reads: runs every notebook in full mode (4.3.4 trains all 2000
# steps and saves pretrained_model/; 4.3.5 generates with it; every notebook
# stores its outputs), then keeps 4.3.4's saved model, trainer_state.json and
# samples.json (its generations during training) as the reference. Run it
# after any change to what training computes (the
# quick mode's check says when); about 17 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")"
ref=fixtures/pretrained_model
aside=$(mktemp -d fixtures/.pretrained_model.old.XXXXXX)
# The old reference is moved aside (the full run is compared with nothing)
# and put back if anything fails.
if [ -d "$ref" ]; then mv "$ref" "$aside/"; fi
restore() {
    if [ ! -d "$ref" ] && [ -d "$aside/pretrained_model" ]; then mv "$aside/pretrained_model" "$ref"; fi
    rm -rf "$aside"
}
trap restore EXIT
COMPANION_NOTEBOOKS=full "${PYTHON:-python3}" run_notebooks.py
new=$(mktemp -d fixtures/.pretrained_model.new.XXXXXX)
cp pretrained_model/* "$new/"
cp output/trainer_state.json output/samples.json "$new/"
chmod 755 "$new"
mv "$new" "$ref"
ls -l "$ref"
