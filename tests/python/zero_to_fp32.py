"""Run DeepSpeed's zero_to_fp32 (the command its users run) on a checkpoint-N
folder and compare what it rebuilds with the folder's model.safetensors.

    python3 zero_to_fp32.py CHECKPOINT

Prints {"stage", "world_size", "missing", "extra", "max_abs_diff"}: the names
model.safetensors has and DeepSpeed did not rebuild, the names DeepSpeed
added, and the largest difference over the common tensors.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

ckpt = sys.argv[1]
out = tempfile.mkdtemp()
env = {**os.environ, "DS_ACCELERATOR": "cpu"}
run = subprocess.run([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", ckpt, out],
                     env=env, capture_output=True, text=True)
if run.returncode != 0:
    sys.exit(run.stdout + run.stderr)
found = re.search(r"zero stage (\d+), world_size: (\d+)", run.stdout + run.stderr)
ds = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
ours = load_file(os.path.join(ckpt, "model.safetensors"))
common = [k for k in ours if k in ds]
print(json.dumps({
    "stage": int(found.group(1)), "world_size": int(found.group(2)),
    "missing": sorted(set(ours) - set(ds)), "extra": sorted(set(ds) - set(ours)),
    "max_abs_diff": max((ds[k] - ours[k]).abs().max().item() for k in common),
}))
