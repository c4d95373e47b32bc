#!/usr/bin/env python3
"""Writes the notebooks of section 4.3 from their cells (notebooks/cells/,
the source of truth), without outputs. Run them afterwards to store real
outputs, in order (4.3.5 uses the model 4.3.4 saves):

    python3 notebooks/make_notebooks.py
    python3 notebooks/run_notebooks.py        # executes and stores outputs

Each Rust cell follows the chapter's listing, shown before it as a Python
reference block, and checks what it shows (see notebooks/README.md).
"""
import importlib
import sys
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cells"))

MODULES = ["n431", "n432", "n433", "n434", "n435"]


def write(name, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "rust", "display_name": "Rust", "language": "rust"}
    nb.metadata["language_info"] = {"name": "Rust", "file_extension": ".rs", "mimetype": "text/rust"}
    nb.cells = cells
    nbf.write(nb, HERE / name)


def main():
    names = []
    for m in MODULES:
        mod = importlib.import_module(m)
        write(mod.NAME, mod.CELLS)
        names.append(mod.NAME)
    print("wrote", ", ".join(names))


if __name__ == "__main__":
    main()
