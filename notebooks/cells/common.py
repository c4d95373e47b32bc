"""Cell builders shared by the notebooks of section 4.3."""
import nbformat as nbf

DEP = ':dep companion = { path = "../companion", default-features = false, features = ["fancy-regex"] }'
ERRATA = "../README.md#errata-for-the-chapters-listings"


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text, tags=None):
    c = nbf.v4.new_code_cell(text.strip())
    if tags:
        c.metadata["tags"] = tags
    return c


def listing(title, english, python, notes=""):
    """The chapter's listing under its title, as our own Python with every
    name and value the listing uses, made to run on transformers 5 (lines
    marked ⚠ differ from the printing); `notes` lists the printing's defects
    (each links the errata table)."""
    body = f"### {title}\n*{english}*\n\n書籍のリスト (Python, transformers 5 で動く形。⚠ は印刷と違う行):\n```python\n{python.strip()}\n```"
    if notes:
        body += f"\n\n{notes.strip()}\n\n→ [正誤表 / errata]({ERRATA})"
    return md(body)


def setup():
    """The notebooks' common second cell: where the kernel, the build and
    the checks are explained (once, in README.md)."""
    return md("""
Rust カーネル (evcxr) で動きます。最初のセルが `companion` クレートをビルドします (初回は数分)。
ビルドのしくみ、かかる時間、各セルの `check!` (表示した値を Python の `transformers` /
`tokenizers` が出した値や式と照合し、違えばセルをエラーにする) の書き方は
[README.md](README.md) にまとめてあります。「書籍のリスト」は章のコードと同じ名前と値の Python で、
transformers 5 で動くように直した行に ⚠ を付けています。
*Runs on the evcxr Rust kernel; the first cell builds `companion`. How the build works, how long it takes,
and how each cell checks what it shows (`check!`) are in [README.md](README.md). The "書籍のリスト" blocks are the
chapter's listings with its names and values, made to run on transformers 5 (⚠ marks each line that differs).*
""")
