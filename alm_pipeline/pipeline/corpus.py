"""Corpus readers: jsonl, Parquet, ``datasets.save_to_disk`` directories and (with network) hub datasets.

Each reader yields :class:`Document` objects in a deterministic order with a ``source`` reference
(``file:line`` or ``file#row``) that every error message names. Documents are validated here, once, before
any model sees them: a missing or non-string text field, invalid UTF-8 or lone surrogates are errors naming
the file and line; empty and whitespace-only texts are skipped and counted; duplicate ids are an error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alm_pipeline.configs import check_int, option


class CorpusError(ValueError):
    """A document of the corpus cannot be used; the message names the file and line/row."""


@dataclass(frozen=True)
class CorpusConfig:
    path: str | None = option(
        None,
        "Corpus: .jsonl/.json/.parquet file or folder, save_to_disk folder, or hub dataset "
        "(default: the bundled Shakespeare corpus)",
        cli="data",
    )
    text_field: str = option("text", "Field holding the document text")
    id_field: str | None = option(None, "Field holding a unique document id (default: hash of text)")
    split: str = option("train", "Split, for hub datasets and DatasetDict folders")
    limit: int | None = option(None, "Use only the first N usable documents", cli="max_docs")

    def __post_init__(self) -> None:
        check_int("--max-docs", self.limit, allow_none=True)
        if self.path is None:
            from alm_pipeline.assets import bundled_corpus_path

            object.__setattr__(self, "path", bundled_corpus_path())

    def describe(self) -> dict:
        """The corpus as a cache's identity records it (a local path made absolute, so that ``data.jsonl`` and
        ``/abs/data.jsonl`` are the same corpus)."""
        path = Path(self.path)
        return {
            "path": str(path.resolve()) if path.exists() else str(self.path),
            "text_field": self.text_field,
            "id_field": self.id_field,
            "split": self.split,
            "limit": self.limit,
        }


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str


@dataclass
class CorpusStats:
    read: int = 0
    used: int = 0
    skipped_empty: int = 0
    skipped_duplicate_text: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    skipped_files: int = 0  # files of a corpus folder that no reader handles (.csv, .txt, ...)
    skipped_file_examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self), "skipped_examples": self.skipped_examples[:20]}

    def skip_file(self, path: Path) -> None:
        self.skipped_files += 1
        if len(self.skipped_file_examples) < 20:
            self.skipped_file_examples.append(str(path))


def text_hash_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def iter_records(config: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[tuple[dict, str]]:
    """Raw records with a source reference, in a deterministic order. Files of a corpus folder that no reader
    handles are counted in ``stats.skipped_files``."""
    path = Path(config.path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        yield from _iter_saved_dataset(path, config)
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in found if _reader_for(p) is not None]
        skipped = [p for p in found if _reader_for(p) is None]
        if not files:
            listed = (
                f" (it holds {', '.join(p.name for p in skipped[:5])}{' ...' if len(skipped) > 5 else ''})"
            )
            raise CorpusError(
                f"{path}: no .jsonl/.json/.parquet files found in the directory" + (listed if skipped else "")
            )
        if stats is not None:
            for p in skipped:
                stats.skip_file(p)
        for f in files:
            yield from _reader_for(f)(f)
    elif path.is_file():
        reader = _reader_for(path)
        if reader is None:
            raise CorpusError(
                f"{path}: unsupported corpus file type (use .jsonl, .jsonl.gz, .json or .parquet)"
            )
        yield from reader(path)
    elif "/" in str(config.path) and not str(config.path).startswith((".", "/")):
        yield from _iter_hub(config)
    else:
        raise CorpusError(f"{config.path}: no such file or directory")


def iter_documents(config: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[Document]:
    """Validated, de-duplicated documents (see module docstring for the rules)."""
    stats = stats if stats is not None else CorpusStats()
    seen_ids: dict[str, str] = {}
    for record, source in iter_records(config, stats):
        stats.read += 1
        if not isinstance(record, dict):
            raise CorpusError(f"{source}: expected an object with a {config.text_field!r} field")
        if config.text_field not in record:
            raise CorpusError(f"{source}: missing text field {config.text_field!r}")
        text = record[config.text_field]
        if not isinstance(text, str):
            raise CorpusError(
                f"{source}: text field {config.text_field!r} is {type(text).__name__}, expected a string"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise CorpusError(
                f"{source}: text is not valid Unicode ({err.reason} at character {err.start})"
            ) from None
        if not text.strip():
            stats.skipped_empty += 1
            if len(stats.skipped_examples) < 20:
                stats.skipped_examples.append(f"{source}: empty or whitespace-only")
            continue
        if config.id_field:
            if config.id_field not in record or record[config.id_field] is None:
                raise CorpusError(f"{source}: missing id field {config.id_field!r}")
            doc_id = str(record[config.id_field])
            if doc_id in seen_ids:
                raise CorpusError(
                    f"{source}: duplicate document id {doc_id!r} (first seen at {seen_ids[doc_id]}); ids must be "
                    "unique"
                )
        else:
            doc_id = text_hash_id(text)
            if doc_id in seen_ids:
                # identical text: its cache row would be identical too, so keep the first and count this one
                stats.skipped_duplicate_text += 1
                if len(stats.skipped_examples) < 20:
                    stats.skipped_examples.append(f"{source}: same text as {seen_ids[doc_id]}")
                continue
        seen_ids[doc_id] = source
        stats.used += 1
        yield Document(doc_id=doc_id, text=text, source=source)
        if config.limit is not None and stats.used >= config.limit:
            return


def _reader_for(path: Path):
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return _iter_jsonl
    if name.endswith(".json"):
        return _iter_json
    if name.endswith(".parquet"):
        return _iter_parquet
    return None


def _iter_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(f"{source}: invalid UTF-8 (byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{source}: invalid JSON ({err.msg} at column {err.colno})") from None
            yield record, source


def _iter_json(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: invalid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError:
        yield from _iter_jsonl(path)  # many ".json" corpora are really JSON lines
        return
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON list of objects or JSON lines")
    for i, record in enumerate(data):
        yield record, f"{path}#{i}"


def _iter_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield record, f"{path}#{row}"
            row += 1


def _iter_saved_dataset(path: Path, config: CorpusConfig) -> Iterator[tuple[dict, str]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if config.split not in ds:
            raise CorpusError(f"{path}: split {config.split!r} not found (have {sorted(ds)})")
        ds = ds[config.split]
    for i, record in enumerate(ds):
        yield record, f"{path}#{i}"


def _iter_hub(config: CorpusConfig) -> Iterator[tuple[dict, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(config.path, split=config.split, streaming=True)
    except Exception as err:  # network or name errors: say what was tried
        raise CorpusError(
            f"{config.path}: not a local file or directory, and loading it as a hub dataset failed ({err})"
        ) from None
    for i, record in enumerate(ds):
        yield record, f"{config.path}[{config.split}]#{i}"


def split_at_lines(text: str, max_bytes: int, min_bytes: int = 1) -> list[str]:
    """``text`` as consecutive pieces of whole lines, each at most ``max_bytes`` UTF-8 bytes (newlines between
    the lines of a piece kept, the newline ending a piece dropped); a single longer line is cut at a character
    boundary. Pieces with fewer than ``min_bytes`` non-blank bytes are left out. For making short documents of
    equal byte budgets (evaluation sets, experiments), so that no tokenizer has to truncate them."""
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be >= 4 (one UTF-8 character), got {max_bytes}")
    pieces: list[str] = []
    current: list[str] = []
    size = -1  # bytes of "\n".join(current)
    for line in text.split("\n"):
        data = line.encode("utf-8")
        while len(data) > max_bytes:  # one very long line: cut it at a character boundary
            if current:
                pieces.append("\n".join(current))
                current, size = [], -1
            head = data[:max_bytes].decode("utf-8", errors="ignore")
            pieces.append(head)
            data = data[len(head.encode("utf-8")) :]
        line = data.decode("utf-8")
        if current and size + 1 + len(data) > max_bytes:
            pieces.append("\n".join(current))
            current, size = [], -1
        current.append(line)
        size += 1 + len(data)
    if current:
        pieces.append("\n".join(current))
    return [p for p in pieces if len(p.strip().encode("utf-8")) >= min_bytes]
