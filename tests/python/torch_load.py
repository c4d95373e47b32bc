"""Load a file with torch.load(weights_only=True) and print it as JSON:
tensors as {"dtype", "shape", "values"}, tuples as {"tuple": [...]}, dict keys
as strings with their Python type prefixed (int:0, str:a)."""
import json
import sys

import torch


def plain(v):
    if isinstance(v, torch.Tensor):
        return {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.flatten().tolist(),
                "contiguous": v.is_contiguous()}
    if isinstance(v, tuple):
        return {"tuple": [plain(x) for x in v]}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {f"{type(k).__name__}:{k}": plain(x) for k, x in v.items()}
    return v


obj = torch.load(sys.argv[1], weights_only=True)
print(json.dumps(plain(obj)))
