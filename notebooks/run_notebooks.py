#!/usr/bin/env python3
"""Executes the notebooks in order under the evcxr kernel and stores their
outputs, with consecutive stream outputs of a cell merged into one block
(evcxr sends a streamed generation piece by piece).

    python3 notebooks/run_notebooks.py [4.3.4_training.ipynb ...]

A cell whose `check!` fails raises here, and the notebook is not written.
"""
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert.preprocessors import CoalesceStreamsPreprocessor

HERE = Path(__file__).resolve().parent


def run(path):
    nb = nbformat.read(path, as_version=4)
    start = time.time()
    client = NotebookClient(nb, timeout=3000, kernel_name="rust", resources={"metadata": {"path": str(HERE)}})
    try:
        client.execute()
    except CellExecutionError:
        # evcxr's error reply carries no traceback: show what the cell printed.
        failed = [c for c in nb.cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
        for c in failed[:1]:
            print(f"{path.name}: this cell failed:\n{c.source}\n--- its output:", file=sys.stderr)
            for o in c.outputs:
                print(o.get("text") or o.get("evalue") or o.get("data"), file=sys.stderr)
        raise SystemExit(1)
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    nbformat.write(nb, path)
    print(f"{path.name}: {time.time() - start:.0f} s", flush=True)


def main():
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("4.3.*.ipynb"))
    for n in names:
        run(HERE / n)


if __name__ == "__main__":
    main()
