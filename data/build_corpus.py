#!/usr/bin/env python3
"""Build the small real training corpus in data/corpus/ from the Python docs.

Source: the Debian package ``python3.11-doc`` (Sphinx reST sources of the
CPython 3.11 documentation, shipped under
``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``).

What the script does:

1. ``apt-get download python3.11-doc=<VERSION>`` into a temporary directory
   (run ``apt-get update`` first if apt cannot find that version), or uses a
   ``.deb`` given with ``--deb``.
2. ``dpkg-deb -x`` the package into the same temporary directory.
3. Reads every ``*.rst.txt`` source in sorted order (excluding the sections
   listed in EXCLUDE_PREFIXES), converts each file into one plain-text
   document (reST markup stripped, code examples kept), and drops documents
   shorter than MIN_CHARS characters.
4. Splits the documents deterministically: a document goes to validation
   when ``int(sha1(relative_path).hexdigest(), 16) % 20 == 0`` (about 5%),
   otherwise to train.
5. Writes ``corpus/train.jsonl`` and ``corpus/validation.jsonl`` (one
   ``{"text": ...}`` object per line, UTF-8, ``\\n`` line endings) and
   ``corpus/LICENSE`` (the licence text shipped in the package), all next to
   this script.

Only the Python 3.11 standard library is used.  Running it twice gives
byte-identical files.

Usage:  python3 data/build_corpus.py [--deb FILE.deb] [--version VER]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
# Version the committed corpus was built from (Debian bookworm-security).
DEFAULT_VERSION = "3.11.2-6+deb12u9"
# sha256 of python3.11-doc_3.11.2-6+deb12u9_all.deb, for a provenance check.
EXPECTED_DEB_SHA256 = "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"

SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
COPYRIGHT_FILE = "usr/share/doc/python3.11-doc/copyright"

# Sections left out of the corpus (relative paths under _sources, prefix match):
#   whatsnew/    release notes and the auto-generated changelog (~1.7 MB of
#                change lists, not prose); leaving it out also keeps the corpus
#                under the 8 MB budget.
#   license      the licence text itself (it is copied to corpus/LICENSE).
#   includes/    fragments that are only pulled in by other files.
EXCLUDE_PREFIXES = ("whatsnew/", "license.rst.txt", "includes/")

MIN_CHARS = 200          # documents shorter than this (after cleaning) are dropped
MAX_TOTAL_BYTES = 8_000_000  # hard cap on the UTF-8 size of all kept texts
VALIDATION_MODULUS = 20  # 1 in 20 documents (~5%) go to validation

VERSION_SUBST = {"version": "3.11", "release": "3.11.2"}

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "corpus"


# ---------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_and_extract(tmp: Path, deb: Path | None, version: str) -> tuple[Path, str]:
    if deb is None:
        spec = f"{PACKAGE}={version}" if version else PACKAGE
        print(f"apt-get download {spec}", file=sys.stderr)
        try:
            subprocess.run(["apt-get", "download", spec], cwd=tmp, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            sys.exit(
                f"apt-get download {spec} failed ({e}).\n"
                "Run `apt-get update` first (the package is in Debian bookworm's "
                "main and security archives), or pass --version with a version "
                "listed by `apt-cache policy python3.11-doc`, or --deb FILE."
            )
        debs = sorted(tmp.glob(f"{PACKAGE}_*.deb"))
        if len(debs) != 1:
            sys.exit(f"expected exactly one downloaded .deb, found {debs}")
        deb = debs[0]
    digest = sha256_file(deb)
    print(f"{deb.name}: sha256 {digest}", file=sys.stderr)
    if digest != EXPECTED_DEB_SHA256:
        print(
            "WARNING: this is not the .deb the committed corpus was built from "
            f"({PACKAGE} {DEFAULT_VERSION}); the output may differ.",
            file=sys.stderr,
        )
    root = tmp / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    return root, version


# ---------------------------------------------------------------------------
# reST -> plain text
# ---------------------------------------------------------------------------

# Directives whose line and whole indented body are dropped.
DROP_DIRECTIVES = {
    "index", "sectionauthor", "moduleauthor", "module", "currentmodule",
    "highlight", "toctree", "testsetup", "testcleanup", "raw", "include",
    "literalinclude", "image", "figure", "tabularcolumns", "contents",
    "program", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "miscnews", "limited-api-list", "audit-event-table", "only",
    "default-role", "role", "spelling", "py:module", "py:currentmodule",
}
# Directives whose body is a literal (code) block, kept verbatim.
LITERAL_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput",
    "parsed-literal",
}
# Admonition-like directives: a heading word, then the body as prose.
ADMONITIONS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:",
    "impl-detail": "CPython implementation detail:", "important": "Important:",
    "tip": "Tip:", "caution": "Caution:", "attention": "Attention:",
    "danger": "Danger:", "hint": "Hint:", "error": "Error:",
}
# Object descriptions: the signature is kept as a line of text.
SIGNATURE_PREFIX = {
    "class": "class ", "exception": "exception ", "classmethod": "classmethod ",
    "staticmethod": "static ", "abstractmethod": "abstractmethod ",
    "coroutinefunction": "coroutine ", "coroutinemethod": "coroutine ",
    "awaitablefunction": "awaitable ", "awaitablemethod": "awaitable ",
    "decorator": "@", "decoratormethod": "@", "c:struct": "struct ",
    "c:union": "union ", "c:enum": "enum ",
}

DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:+-]*)::(?:\s+(.*))?$")
EXPLICIT_RE = re.compile(r"^(\s*)\.\.(?:\s|$)")
FOOTNOTE_RE = re.compile(r"^(\s*)\.\.\s+\[[^\]]+\]\s*(.*)$")
OPTION_RE = re.compile(r"^\s*:[\w-][^:`]*:(\s|$)")
BULLET_RE = re.compile(r"^(\s*)([-*+\u2022]|\d+\.|#\.|\(\d+\)|[a-zA-Z]\.)\s+\S")
ADORNMENT_RE = re.compile(r"^\s*([=\-~*^#\"'`+.:_<>])\1{2,}\s*$")
TABLE_BORDER_RE = re.compile(r"^\s*(\+[-=+]+\+|[=-]{2,}(\s+[=-]{2,})+)\s*$")
LABEL_RE = re.compile(r"^\.\.\s+_([^:]+):\s*$")


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def content_indent(line: str) -> int:
    """Indentation of a line's text, counting a leading list bullet."""
    m = BULLET_RE.match(line)
    if m:
        return m.end() - 1
    return indent_of(line)


def skip_block(lines: list[str], i: int, base: int) -> int:
    """Return the index after the block of lines indented more than `base`
    (blank lines included), starting at index i."""
    n = len(lines)
    while i < n:
        if lines[i].strip() == "":
            # A blank line belongs to the block only if more block follows.
            j = i
            while j < n and lines[j].strip() == "":
                j += 1
            if j < n and indent_of(lines[j]) > base:
                i = j
                continue
            return i
        if indent_of(lines[i]) <= base:
            return i
        i += 1
    return i


def take_literal(lines: list[str], i: int, base: int, out: list) -> int:
    """Copy the block indented more than `base` starting at i as literal lines,
    dedented to the block's own minimal indentation."""
    end = skip_block(lines, i, base)
    block = lines[i:end]
    nonblank = [l for l in block if l.strip()]
    if nonblank:
        d = min(indent_of(l) for l in nonblank)
        out.append(("blank", ""))
        for l in block:
            out.append(("lit", l[d:] if l.strip() else ""))
        out.append(("blank", ""))
    return end


def skip_options(lines: list[str], i: int, base: int) -> int:
    while i < len(lines) and lines[i].strip() and indent_of(lines[i]) > base \
            and OPTION_RE.match(lines[i]):
        i += 1
    return i


CELL_DIRECTIVE_RE = re.compile(r"\.\.\s+[\w:-]+::\s*")
SIMPLE_BORDER_RE = re.compile(r"^\s*=+(\s+=+)+\s*$")
GRID_BORDER_RE = re.compile(r"^\s*\+([-=]+\+)+\s*$")


def table_row(cells: list[str]) -> str:
    """One table row as one line of text: cells joined by ' | '.  Cell text is
    kept as reST (inline markup is resolved later, per paragraph); `\\` at the
    end of a cell line joins it to the next line without a space."""
    out = []
    for c in cells:
        c = re.sub(r"\\\n\s*", "", c.strip())
        c = re.sub(r"\s+", " ", c).strip()
        c = CELL_DIRECTIVE_RE.sub("", c)
        out.append(c)
    while out and not out[-1]:
        out.pop()
    return " | ".join(out)


def grid_table(lines: list[str], i: int, out: list) -> int:
    """Convert a grid table starting at border line i; returns the next index."""
    top = lines[i]
    bounds = [k for k, ch in enumerate(top) if ch == "+"]
    cells: list[list[str]] = [[] for _ in bounds[:-1]]
    out.append(("blank", ""))

    def emit():
        if any(any(x.strip() for x in c) for c in cells):
            out.append(("prose", table_row(["\n".join(c) for c in cells])))
        for c in cells:
            c.clear()

    i += 1
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if not s or not (s.startswith("|") or s.startswith("+")):
            break
        if GRID_BORDER_RE.match(line):
            emit()
        else:
            # Split only at boundaries that are real cell walls on this line
            # (cells spanning columns have no wall there).
            walls = [b for b in bounds if b < len(line) and line[b] in "|+"]
            for a, b in zip(walls, walls[1:]):
                col = bounds.index(a)
                cells[col].append(line[a + 1:b])
        i += 1
    emit()
    out.append(("blank", ""))
    return i


def simple_table(lines: list[str], i: int, out: list) -> int:
    """Convert a simple (====  ====) table starting at border line i."""
    border = lines[i]
    starts = [m.start() for m in re.finditer(r"=+", border)]
    rows: list[list[str]] = []
    out.append(("blank", ""))
    i += 1
    while i < len(lines):
        line = lines[i]
        if SIMPLE_BORDER_RE.match(line):
            i += 1
            if i >= len(lines) or not lines[i].strip():
                break  # bottom border
            continue
        if not line.strip() or re.match(r"^\s*-+(\s+-+)*\s*$", line):
            i += 1
            continue
        parts = [line[a:b] for a, b in zip(starts, starts[1:] + [len(line)])]
        if rows and not parts[0].strip():
            for k, p in enumerate(parts):
                rows[-1][k] += "\n" + p
        else:
            rows.append(parts + [""] * (len(starts) - len(parts)))
        i += 1
    for r in rows:
        out.append(("prose", table_row(r)))
    out.append(("blank", ""))
    return i


def list_table(lines: list[str], i: int, base: int, out: list) -> int:
    """Convert the body of a list-table directive (after its options)."""
    end = skip_block(lines, i, base)
    rows: list[list[str]] = []
    for line in lines[i:end]:
        s = line.strip()
        if not s:
            continue
        if s.startswith("* -"):
            rows.append([s[3:]])
        elif s.startswith("- ") and rows:
            rows[-1].append(s[2:])
        elif s == "-" and rows:
            rows[-1].append("")
        elif rows:
            rows[-1][-1] += "\n" + s
    out.append(("blank", ""))
    for r in rows:
        out.append(("prose", table_row(r)))
    out.append(("blank", ""))
    return end


def production_list(lines: list[str], i: int, base: int, out: list) -> int:
    """Grammar rules `name: rhs` / `: rhs` -> `name ::= rhs` (token refs unquoted)."""
    end = skip_block(lines, i, base)
    out.append(("blank", ""))
    width = 0
    for line in lines[i:end]:
        s = line.strip()
        if not s:
            continue
        s = re.sub(r"`([^`]+)`", lambda m: m.group(1).lstrip("~!"), s)
        m = re.match(r"^([\w-]*)\s*:\s?(.*)$", s)
        if m and m.group(1):
            width = len(m.group(1))
            out.append(("lit", f"{m.group(1)} ::= {m.group(2)}"))
        elif m:
            out.append(("lit", " " * (width + 5) + m.group(2)))
        else:
            out.append(("lit", s))
    out.append(("blank", ""))
    return end


def structure(text: str) -> list[tuple[str, str]]:
    """Line-level pass: returns a list of ('prose'|'lit'|'blank', line)."""
    lines = [l.rstrip() for l in text.expandtabs(8).split("\n")]
    out: list[tuple[str, str]] = []
    n = len(lines)
    i = 0
    while i < n:
        line = lines[i]
        s = line.strip()
        if not s:
            out.append(("blank", ""))
            i += 1
            continue
        ind = indent_of(line)

        # Explicit markup: directives, comments, targets, footnotes.
        if EXPLICIT_RE.match(line):
            m = DIRECTIVE_RE.match(line)
            if m:
                name = m.group(2).lower()
                if name.startswith("py:"):
                    name = name[3:]
                arg = (m.group(3) or "").strip()
                i += 1
                if name in DROP_DIRECTIVES:
                    i = skip_block(lines, i, ind)
                    continue
                if name == "productionlist":
                    i = production_list(lines, i, ind, out)
                    continue
                if name == "list-table":
                    i = skip_options(lines, i, ind)
                    out.append(("blank", ""))
                    if arg:
                        out.append(("prose", arg))
                    i = list_table(lines, i, ind, out)
                    continue
                if name in LITERAL_DIRECTIVES:
                    i = skip_options(lines, i, ind)
                    i = take_literal(lines, i, ind, out)
                    continue
                i = skip_options(lines, i, ind)
                header = None
                if name in ADMONITIONS:
                    header = ADMONITIONS[name] + (" " + arg if arg else "")
                elif name == "versionadded":
                    v, _, rest = arg.partition(" ")
                    header = f"New in version {v}." + (" " + rest if rest else "")
                elif name == "versionchanged":
                    v, _, rest = arg.partition(" ")
                    header = f"Changed in version {v}:" + (" " + rest if rest else "")
                elif name == "deprecated":
                    v, _, rest = arg.partition(" ")
                    header = f"Deprecated since version {v}:" + (" " + rest if rest else "")
                elif name == "deprecated-removed":
                    parts = arg.split(None, 2)
                    v1 = parts[0] if parts else ""
                    v2 = parts[1] if len(parts) > 1 else ""
                    rest = parts[2] if len(parts) > 2 else ""
                    header = (f"Deprecated since version {v1}, will be removed "
                              f"in version {v2}:" + (" " + rest if rest else ""))
                elif name == "availability":
                    header = f"Availability: {arg}"
                elif name == "audit-event":
                    # .. audit-event:: name arg1,arg2 [target]
                    parts = arg.split()
                    ev = parts[0] if parts else ""
                    evargs = [a for a in (parts[1] if len(parts) > 1 else "").strip('"').split(",") if a]
                    header = f"Raises an auditing event {ev}" + (
                        f" with arguments {', '.join(evargs)}." if evargs else " with no arguments.")
                    # Its body (if any) is a list of references: drop it.
                    i = skip_block(lines, i, ind)
                    out.append(("blank", ""))
                    out.append(("prose", header))
                    out.append(("blank", ""))
                    continue
                elif name in ("rubric", "topic", "admonition", "describe",
                              "object", "glossary", "epigraph", "table",
                              "csv-table", "centered", "hlist", "sidebar"):
                    header = arg or None
                elif name.startswith("c:") or name in (
                        "function", "method", "attribute", "data", "envvar",
                        "cmdoption", "option", "opcode", "pdbcommand",
                        "2to3fixer", "property", "monitoring-event") \
                        or name in SIGNATURE_PREFIX:
                    header = SIGNATURE_PREFIX.get(name, "") + arg if arg else None
                else:
                    header = arg or None  # unknown directive: keep argument
                out.append(("blank", ""))
                if header:
                    out.append(("prose", header))
                # The body is processed like normal text (prose is dedented later).
                continue
            # `.. [#] footnote text`
            m = FOOTNOTE_RE.match(line)
            if m:
                i += 1
                out.append(("blank", ""))
                if m.group(2):
                    out.append(("prose", m.group(2)))
                continue
            # Targets `.. _label:`, substitution definitions, comments: drop.
            i = skip_block(lines, i + 1, ind)
            continue

        # File-wide Sphinx metadata (":tocdepth: 2", ":orphan:").
        if re.match(r"^:(tocdepth|orphan|nosearch|nocomments):", line):
            i += 1
            continue

        # Tables.
        if GRID_BORDER_RE.match(line) and i + 1 < n and lines[i + 1].strip().startswith("|"):
            i = grid_table(lines, i, out)
            continue
        if SIMPLE_BORDER_RE.match(line) and i + 1 < n and lines[i + 1].strip():
            i = simple_table(lines, i, out)
            continue

        # Heading adornments and transitions.
        if ADORNMENT_RE.match(line) or TABLE_BORDER_RE.match(line):
            i += 1
            continue

        # Doctest blocks: a paragraph starting with >>>.
        if s.startswith(">>>"):
            out.append(("blank", ""))
            while i < n and lines[i].strip():
                out.append(("lit", lines[i][ind:] if indent_of(lines[i]) >= ind
                            else lines[i].strip()))
                i += 1
            out.append(("blank", ""))
            continue

        # Ordinary text line.
        if s == "::":
            i += 1
            i = take_literal(lines, i, ind, out) if _next_indented(lines, i, ind) else i
            continue
        if s.endswith("::"):
            if re.search(r"\s::$", line):
                line = line[:-2].rstrip()
            else:
                line = line[:-1]  # "Example::" -> "Example:"
            out.append(("prose", line))
            base = content_indent(lines[i])
            # The marker may be on a continuation line of the paragraph; use the
            # indentation of this line's text.
            i += 1
            if _next_indented(lines, i, base):
                i = take_literal(lines, i, base, out)
            continue
        out.append(("prose", line))
        i += 1
    return out


def _next_indented(lines: list[str], i: int, base: int) -> bool:
    j = i
    while j < len(lines) and not lines[j].strip():
        j += 1
    return j < len(lines) and indent_of(lines[j]) > base


# Inline markup ---------------------------------------------------------------

ROLE_RE = re.compile(r":((?:[A-Za-z0-9_-]+:)*[A-Za-z0-9_+-]+):`((?:[^`\\]|\\.)+?)`(?!`)",
                     re.S)
LITERAL_RE = re.compile(r"``(.+?)``(?!`)", re.S)
HYPERLINK_RE = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?", re.S)
NAMED_REF_RE = re.compile(r"`([^`]+)`__?(?![\w])", re.S)
DEFAULT_ROLE_RE = re.compile(r"(?<![\w`])`([^`\n]+)`(?![\w`])")
STRONG_RE = re.compile(r"(?<![\w*\\])\*\*(\S(?:[^*]*?\S)?)\*\*(?![\w*])", re.S)
EMPH_RE = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])", re.S)
FOOTREF_RE = re.compile(r"\s?\[(?:#[\w-]*|\d+|[A-Za-z][\w-]*)\]_")
SUBST_RE = re.compile(r"\|([\w-]+)\|")
PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")

CALLABLE_ROLES = {"func", "meth", "c:func", "py:func", "py:meth"}


class Inline:
    def __init__(self, labels: dict[str, str], doc_titles: dict[str, str]):
        self.labels = labels
        self.doc_titles = doc_titles

    def role(self, name: str, content: str) -> str:
        name = name.lower()
        content = re.sub(r"\\\s+", "", content)
        content = re.sub(r"\s*\n\s*", " ", content)
        content = re.sub(r"\\(.)", r"\1", content)
        m = re.match(r"^(.*?)\s*<([^<>]*)>$", content, re.S)
        title, target = (m.group(1), m.group(2)) if m and m.group(1) else (None, content)
        if name in ("ref", "std:ref"):
            if title:
                return title
            return self.labels.get(target.lower(), target.replace("-", " ").replace("_", " "))
        if name == "doc":
            if title:
                return title
            return self.doc_titles.get(target.lstrip("/"), target)
        if name == "pep":
            return title or "PEP " + target.split("#")[0]
        if name == "rfc":
            return title or "RFC " + target.split("#")[0]
        if name == "issue":
            return "bpo-" + content
        if name == "gh":
            return "gh-" + content
        if name == "samp":
            return re.sub(r"(?<!\\)[{}]", "", content)
        if name in ("abbr",):
            return content
        if title:
            return title
        text = target
        short = text.startswith("~")
        text = text.lstrip("~!")
        if short:
            text = text.rsplit(".", 1)[-1]
        if name in CALLABLE_ROLES and not text.endswith(")"):
            text += "()"
        return text

    def __call__(self, para: str) -> str:
        holds: list[str] = []

        def hold(s: str) -> str:
            holds.append(s)
            return f"\ue000{len(holds) - 1}\ue001"

        t = LITERAL_RE.sub(lambda m: hold(re.sub(r"\s*\n\s*", " ", m.group(1))), para)
        t = ROLE_RE.sub(lambda m: hold(self.role(m.group(1), m.group(2))), t)
        t = HYPERLINK_RE.sub(lambda m: m.group(1), t)
        t = NAMED_REF_RE.sub(lambda m: m.group(1), t)
        t = DEFAULT_ROLE_RE.sub(lambda m: m.group(1), t)
        t = FOOTREF_RE.sub("", t)
        t = STRONG_RE.sub(lambda m: m.group(1), t)
        t = EMPH_RE.sub(lambda m: m.group(1), t)
        t = SUBST_RE.sub(lambda m: VERSION_SUBST.get(m.group(1), m.group(0)), t)
        t = re.sub(r"\\[ \n]", "", t)      # escaped whitespace (reST "\ ")
        t = re.sub(r"\\([^A-Za-z0-9\s])", r"\1", t)
        # Field lists ":param x: ..." -> "param x: ..."
        t = re.sub(r"(?m)^:([\w][^:`\n]*):(?=\s|$)", r"\1:", t)
        for _ in range(3):  # placeholders may nest via role titles
            t = PLACEHOLDER_RE.sub(lambda m: holds[int(m.group(1))], t)
        return t


def render(items: list[tuple[str, str]], inline: Inline) -> str:
    out_lines: list[str] = []
    para: list[str] = []

    def flush():
        if para:
            out_lines.extend(inline("\n".join(para)).split("\n"))
            para.clear()

    for kind, line in items:
        if kind == "prose":
            para.append(line.strip())
        elif kind == "lit":
            flush()
            out_lines.append(line)
        else:
            flush()
            out_lines.append("")
    flush()
    text = "\n".join(l.rstrip() for l in out_lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def first_title(text: str) -> str | None:
    lines = text.split("\n")
    for k in range(len(lines) - 1):
        a, b = lines[k].strip(), lines[k + 1]
        if a and not ADORNMENT_RE.match(lines[k]) and ADORNMENT_RE.match(b) \
                and len(b.strip()) >= len(a) - 2 and not a.startswith(".."):
            return a
    return None


def collect_labels(texts: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Map `.. _label:` targets that precede a section title to the title's
    raw text, and document paths (for :doc:) to their first title."""
    labels: dict[str, str] = {}
    doc_titles: dict[str, str] = {}
    for rel, text in texts.items():
        lines = text.split("\n")
        t = first_title(text)
        if t:
            doc_titles[rel[: -len(".rst.txt")]] = t
        for k, line in enumerate(lines):
            m = LABEL_RE.match(line.strip())
            if not m or indent_of(line) != 0:
                continue
            j = k + 1
            while j < len(lines) and (not lines[j].strip() or LABEL_RE.match(lines[j].strip())):
                j += 1
            if j + 1 < len(lines):
                if ADORNMENT_RE.match(lines[j]) and j + 2 < len(lines):
                    j += 1  # overline
                title, under = lines[j].strip(), lines[j + 1] if j + 1 < len(lines) else ""
                if title and ADORNMENT_RE.match(under) and not title.startswith(".."):
                    labels[m.group(1).strip().lower()] = title
    # Titles can contain markup themselves; render them once (no label lookups).
    plain = Inline({}, {})
    labels = {k: plain(v) for k, v in labels.items()}
    doc_titles = {k: plain(v) for k, v in doc_titles.items()}
    return labels, doc_titles


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def is_validation(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest(), 16) % VALIDATION_MODULUS == 0


def write_jsonl(path: Path, docs: list[str]) -> None:
    with path.open("wb") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False).encode("utf-8"))
            f.write(b"\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deb", type=Path, help="use this python3.11-doc .deb instead of apt-get download")
    ap.add_argument("--version", default=DEFAULT_VERSION,
                    help=f"package version to download (default {DEFAULT_VERSION}; '' = apt's candidate)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="corpus-build-") as tmpname:
        tmp = Path(tmpname)
        deb = args.deb.resolve() if args.deb else None
        root, deb_version = fetch_and_extract(tmp, deb, args.version)
        src = root / SOURCES_DIR
        if not src.is_dir():
            sys.exit(f"no reST sources in the package ({SOURCES_DIR} missing)")

        texts: dict[str, str] = {}
        for p in sorted(src.rglob("*.rst.txt"), key=lambda q: q.relative_to(src).as_posix()):
            rel = p.relative_to(src).as_posix()
            if rel.startswith(EXCLUDE_PREFIXES):
                continue
            raw = p.read_bytes().decode("utf-8")  # strict: fail on invalid UTF-8
            raw = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
            texts[rel] = raw

        labels, doc_titles = collect_labels(texts)
        inline = Inline(labels, doc_titles)

        train: list[str] = []
        valid: list[str] = []
        total = 0
        skipped_short = 0
        skipped_budget = 0
        for rel in sorted(texts):
            doc = render(structure(texts[rel]), inline)
            if len(doc.strip()) < MIN_CHARS:
                skipped_short += 1
                continue
            size = len(doc.encode("utf-8"))
            if total + size > MAX_TOTAL_BYTES:
                skipped_budget += 1
                continue
            total += size
            (valid if is_validation(rel) else train).append(doc)

        OUT_DIR.mkdir(parents=True, exist_ok=True)
        write_jsonl(OUT_DIR / "train.jsonl", train)
        write_jsonl(OUT_DIR / "validation.jsonl", valid)
        lic = (root / COPYRIGHT_FILE).read_bytes().decode("utf-8")
        (OUT_DIR / "LICENSE").write_bytes(
            build_license(lic, texts_license(src), deb_version).encode("utf-8"))

    print(
        f"sources read: {len(texts)}, kept: {len(train) + len(valid)} "
        f"(train {len(train)}, validation {len(valid)}), "
        f"dropped short: {skipped_short}, dropped by size cap: {skipped_budget}, "
        f"text bytes: {total}",
        file=sys.stderr,
    )


def texts_license(src: Path) -> str:
    return (src / "license.rst.txt").read_bytes().decode("utf-8")


def build_license(copyright_file: str, license_rst: str, version: str) -> str:
    header = (
        "Licence of the text in this corpus\n"
        "==================================\n\n"
        f"The documents in train.jsonl and validation.jsonl are derived from the\n"
        f"Python 3.11 documentation as shipped in the Debian package {PACKAGE}\n"
        f"(version {version}). Two licence texts from that package follow,\n"
        "verbatim:\n\n"
        "1. The documentation's own licence page, usr/share/doc/python3.11/html/\n"
        "   _sources/license.rst.txt (\"History and License\"). It states that\n"
        "   \"Python software and documentation are licensed under the PSF License\n"
        "   Agreement\" and that, starting with Python 3.8.6, examples, recipes\n"
        "   and other code in the documentation are dual licensed under the PSF\n"
        "   License Agreement and the Zero-Clause BSD license.\n"
        "2. The Debian copyright file, usr/share/doc/python3.11-doc/copyright.\n"
        "   (Its GPL \"Documentation:\" paragraph belongs to the libffi section\n"
        "   and concerns libffi's own manual, which is not part of this corpus.)\n\n"
        "Copyright (c) 2001-2023 Python Software Foundation. All rights reserved.\n"
        "Copyright (c) 2000 BeOpen.com. All rights reserved.\n"
        "Copyright (c) 1995-2000 Corporation for National Research Initiatives.\n"
        "All rights reserved.\n"
        "Copyright (c) 1991-1995 Stichting Mathematisch Centrum. All rights reserved.\n\n"
        "The text was converted from reST to plain text (markup removed); this is\n"
        "a modified (derivative) version of the documentation.\n\n"
    )
    sep = "\n" + "#" * 72 + "\n"
    return (header + sep + "# 1. license.rst.txt (Python documentation)" + sep + "\n"
            + license_rst.rstrip("\n") + "\n" + sep
            + "# 2. usr/share/doc/python3.11-doc/copyright (Debian)" + sep + "\n"
            + copyright_file.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
