#!/usr/bin/env python3
"""Check the crate's layering: no import cycle between source files, and
each top-level module imports only from modules before it in the data flow
(README, "Layout"); and no import cycle between the files of the
`companion` binary (src/bin/companion). Exits non-zero, naming the files,
when either fails.

    python3 scripts/check_layers.py

An import is any `crate::a::b` path or `super::x` path in a file (uses,
types, calls), resolved to the file that defines that module. `#[cfg(test)]`
modules are skipped: tests may reach across layers.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "companion" / "src"
BIN = SRC / "bin" / "companion"
# The data flow, first to last; a module may import only from earlier ones
# (and from itself). `generate` comes before the training modules because
# `save_model` writes the model's `generation_config.json`.
ORDER = ["atomic_write", "hub", "hf_json", "torch_file", "rng", "sysmem", "tokenizer", "data", "config", "params", "cpu",
         "model", "generate", "optim", "zero", "parallel", "train", "notebook", "kernel_twins", "collect_env"]


def module_of(path: Path, root: Path) -> tuple:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_tests(text: str) -> str:
    """Drop `#[cfg(test)] mod … { … }` blocks and comments."""
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def imports(root: Path, paths) -> tuple:
    """Each module's file, and the modules each imports."""
    files = {module_of(p, root): p for p in paths}
    mods = set(files)

    def resolve(path: tuple):
        # The longest prefix that is a module file.
        for n in range(len(path), 0, -1):
            if path[:n] in mods:
                return path[:n]
        return None

    edges = {m: set() for m in mods}
    for m, p in files.items():
        text = strip_tests(p.read_text())
        for ref in re.findall(r"\bcrate((?:::\w+)+)", text):
            t = resolve(tuple(ref.split("::")[1:]))
            if t and t != m:
                edges[m].add(t)
        # super:: relative to this module (a mod.rs is its folder's module)
        parent = m[:-1]
        refs = re.findall(r"\bsuper((?:::\w+)+)", text)
        refs += ["" for _ in re.findall(r"\bsuper::\{", text)]  # super::{a, b}: the parent
        for ref in refs:
            t = resolve(parent + tuple(ref.split("::")[1:]))
            if t and t != m:
                edges[m].add(t)
        # A folder module's own children, named without a prefix
        # (`pub use child::Item;`, `child::f()`), and `self::child`.
        if p.name in ("mod.rs", "lib.rs", "main.rs"):
            for child in re.findall(r"(?<![:\w])(\w+)::", text):
                t = m + (child,)
                if t in mods:
                    edges[m].add(t)
    return files, edges


def cycles(files: dict, edges: dict, root: Path) -> bool:
    """Print every import cycle (Tarjan's strongly connected components)."""
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    for comp in sccs:
        print("import cycle between:", ", ".join(str(files[c].relative_to(root)) for c in sorted(comp)))
        for c in sorted(comp):
            inside = sorted(str(files[t].relative_to(root)) for t in edges[c] if t in comp)
            print(f"  {files[c].relative_to(root)} → {', '.join(inside)}")
    return bool(sccs)


def main() -> int:
    files, edges = imports(SRC, [p for p in SRC.rglob("*.rs") if "bin" not in p.relative_to(SRC).parts])
    mods = set(files)
    bad = cycles(files, edges, SRC)
    rank = {name: i for i, name in enumerate(ORDER)}
    for m, targets in sorted(edges.items()):
        if not m or m[0] not in rank:
            continue
        for t in sorted(targets):
            if t and t[0] in rank and rank[t[0]] > rank[m[0]]:
                bad = True
                print(f"{files[m].relative_to(SRC)} imports {files[t].relative_to(SRC)}, which comes later "
                      f"({m[0]} before {t[0]})")
    unknown = sorted({m[0] for m in mods if m and m[0] not in rank})
    if unknown:
        bad = True
        print("modules missing from ORDER:", ", ".join(unknown))
    n_edges = sum(len(v) for v in edges.values())
    print(f"{len(mods)} modules, {n_edges} imports between them: "
          + ("layering violated" if bad else "no cycle, every import points back along the data flow"))
    # The binary: its own modules (`crate::` there is the binary) must not
    # import each other in a circle either.
    bfiles, bedges = imports(BIN, list(BIN.rglob("*.rs")))
    bin_bad = cycles(bfiles, bedges, BIN)
    print(f"binary: {len(bfiles)} modules, {sum(len(v) for v in bedges.values())} imports between them: "
          + ("import cycle" if bin_bad else "no cycle"))
    return 1 if bad or bin_bad else 0


if __name__ == "__main__":
    sys.exit(main())
