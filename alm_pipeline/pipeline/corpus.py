"""Corpus listing, shard planning and reading: jsonl, Parquet, JSON lists, ``datasets.save_to_disk`` folders and
(with network) hub datasets, on a local disk or any :mod:`alm_pipeline.storage` location (``s3://``, ``gs://``).

Three steps, so that the driver of ``teacher-cache`` never reads the corpus:

1. :func:`list_corpus` (driver, file metadata only): the corpus files with their sizes and modification times;
   their digest is the corpus fingerprint a cache records.
2. :func:`plan_shards` (driver, work proportional to the number of shards): each shard is a slice of one file, a
   :class:`ShardEntry`. A jsonl file is cut into byte ranges of about ``shard_bytes`` (each cut moved to the start
   of the next line: one small read per cut); a Parquet file into row ranges of about ``shard_bytes``
   uncompressed bytes (from its footer); a gzip jsonl file, a JSON list and each Arrow file of a
   ``save_to_disk`` folder are one shard each (their rows cannot be addressed without reading them); a hub
   dataset is one shard read in streaming mode.
3. :func:`read_shard` (a Ray task): reads, validates and de-duplicates one shard's documents.

Validation rules (errors name the file and line, or ``file#row``): a missing or non-string text field, invalid
UTF-8, lone surrogates, invalid JSON and (with ``--id-field``) a missing or duplicate id are errors; empty and
whitespace-only texts are skipped and counted. Duplicate ids are checked within a shard (``teacher-cache
--check-duplicate-ids`` adds a global pass); without an id field a document's id is a hash of its text and an
identical text later in the same shard is skipped and counted. :func:`iter_documents` reads a whole corpus in
order with these checks applied across all of it (for evaluation data).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

from alm_pipeline.configs import check_int, option
from alm_pipeline.storage import Location, StorageError, is_uri, location

_BLOCK = 1 << 20  # bytes per read of a jsonl range
_SUFFIXES = ((".jsonl.gz", "jsonl.gz"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"))


class CorpusError(ValueError):
    """A document of the corpus cannot be used; the message names the file and line/row."""


@dataclass(frozen=True)
class CorpusConfig:
    path: str | None = option(
        None,
        "Corpus: .jsonl/.json/.parquet file or folder (local, file://, s3://, gs://), save_to_disk folder, or "
        "hub dataset (default: the bundled Shakespeare corpus)",
        cli="data",
    )
    text_field: str = option("text", "Field holding the document text")
    messages_field: str = option(
        "messages",
        "Field holding a conversation (a list of {role, content}), used where a row has no text field",
    )
    id_field: str | None = option(None, "Field holding a unique document id (default: hash of text)")
    split: str = option("train", "Split, for hub datasets and DatasetDict folders")
    limit: int | None = option(
        None,
        "Use only the first N usable documents (reads only the files/ranges they are in)",
        cli="max_docs",
    )

    def __post_init__(self) -> None:
        check_int("--max-docs", self.limit, allow_none=True)
        if self.path is None:
            from alm_pipeline.assets import bundled_corpus_path

            object.__setattr__(self, "path", bundled_corpus_path())
        if is_uri(str(self.path)):  # an unknown scheme is refused here, before anything runs
            try:
                location(str(self.path))
            except StorageError as err:
                raise ValueError(f"--data: {err}") from None

    def describe(self) -> dict:
        """The corpus as a cache's identity records it (a local path made absolute, so that ``data.jsonl`` and
        ``/abs/data.jsonl`` are the same corpus; a URI in its canonical form)."""
        text = str(self.path)
        if is_uri(text):
            path = location(text).uri
        else:
            path = os.path.realpath(text) if os.path.exists(text) else text
        described = {
            "path": path,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "split": self.split,
            "limit": self.limit,
        }
        if self.messages_field != "messages":  # recorded only when changed: older caches keep their identity
            described["messages_field"] = self.messages_field
        return described


@dataclass(frozen=True)
class Document:
    """A document: plain ``text``, or a conversation (``messages``; ``text`` is then their canonical JSON)."""

    doc_id: str
    text: str
    source: str  # file:line or file#row (a range that does not start its file: "file (byte N)")
    position: object = field(default=None, compare=False, repr=False)  # for exact_source
    messages: tuple | None = field(default=None, compare=False, repr=False)  # chat.Message, in order


def exact_source(entry: ShardEntry, doc: Document) -> str:
    """``file:line`` (or ``file#row``) of a document read from ``entry``, counting lines from the file's start
    when the shard starts mid-file (reads the file up to the document: for error messages)."""
    return _ShardReader(entry).exact(doc.position) if doc.position is not None else doc.source


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

    @classmethod
    def from_json(cls, data: dict) -> CorpusStats:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def add(self, other: CorpusStats) -> None:
        """Add another shard's counts to these."""
        for name in ("read", "used", "skipped_empty", "skipped_duplicate_text", "skipped_files"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped_examples = (self.skipped_examples + other.skipped_examples)[:20]
        self.skipped_file_examples = (self.skipped_file_examples + other.skipped_file_examples)[:20]

    def skip_file(self, name: str) -> None:
        self.skipped_files += 1
        if len(self.skipped_file_examples) < 20:
            self.skipped_file_examples.append(str(name))

    def skip(self, example: str, duplicate: bool = False) -> None:
        if duplicate:
            self.skipped_duplicate_text += 1
        else:
            self.skipped_empty += 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(example)


def text_hash_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


# ------------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus, as listed (no byte of it read): ``kind`` is the reader that handles it."""

    uri: str
    kind: str  # jsonl, jsonl.gz, json, parquet, arrow (a save_to_disk file), hub
    size: int
    mtime_ns: int


@dataclass
class CorpusListing:
    """The corpus's files from metadata only; :attr:`fingerprint` changes when any file is added, removed,
    resized or modified (its mtime changes)."""

    files: list[CorpusFile]
    skipped: list[str] = field(default_factory=list)  # files no reader handles

    @property
    def fingerprint(self) -> str:
        rows = [[f.uri, f.kind, f.size, f.mtime_ns] for f in self.files]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32]

    def to_json(self) -> dict:
        return {"files": [asdict(f) for f in self.files], "skipped": self.skipped}

    @classmethod
    def from_json(cls, data: dict) -> CorpusListing:
        return cls([CorpusFile(**f) for f in data["files"]], list(data.get("skipped", [])))

    def changes_since(self, earlier: CorpusListing) -> list[str]:
        """What differs from an earlier listing of the same corpus, one line per file."""
        old = {f.uri: f for f in earlier.files}
        new = {f.uri: f for f in self.files}
        lines = []
        for uri in sorted(old.keys() | new.keys()):
            a, b = old.get(uri), new.get(uri)
            if a is None:
                lines.append(f"{uri}: new file")
            elif b is None:
                lines.append(f"{uri}: removed")
            elif (a.size, a.mtime_ns) != (b.size, b.mtime_ns):
                lines.append(
                    f"{uri}: changed (size {a.size} -> {b.size} bytes, mtime_ns {a.mtime_ns} -> {b.mtime_ns})"
                )
        return lines


def _kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    return next((kind for suffix, kind in _SUFFIXES if lower.endswith(suffix)), None)


def _looks_like_hub(text: str) -> bool:
    return (
        "/" in text and not is_uri(text) and not text.startswith((".", "/", "~")) and not os.path.exists(text)
    )


def list_corpus(config: CorpusConfig) -> CorpusListing:
    """The corpus files (sorted), from metadata only. Raises :class:`CorpusError` for a missing path or a folder
    without corpus files, :class:`~alm_pipeline.storage.StorageError` (naming the URI) for storage failures."""
    text = str(config.path)
    if _looks_like_hub(text):
        return CorpusListing([CorpusFile(text, "hub", 0, 0)])
    root = location(text)
    info = root.info()
    if info.type.name == "NotFound":
        raise CorpusError(f"{root.uri}: no such file or directory")
    if info.type.name == "File":
        kind = _kind(root.name)
        if kind is None:
            raise CorpusError(
                f"{root.uri}: unsupported corpus file type (use .jsonl, .jsonl.gz, .json or .parquet)"
            )
        return CorpusListing([_corpus_file(root, info, kind)])
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        return _list_saved_dataset(root, config.split)
    found = [i for i in root.list(recursive=True) if i.type.name == "File"]
    files = [_corpus_file(root.child(i), i, _kind(i.base_name)) for i in found if _kind(i.base_name)]
    skipped = [root.child(i).uri for i in found if not _kind(i.base_name)]
    if not files:
        names = [s.rsplit("/", 1)[-1] for s in skipped]
        listed = f" (it holds {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})" if names else ""
        raise CorpusError(f"{root.uri}: no .jsonl/.json/.parquet files found in the directory{listed}")
    return CorpusListing(files, skipped)


def _corpus_file(loc: Location, info, kind: str) -> CorpusFile:
    return CorpusFile(loc.uri, kind, int(info.size or 0), int(info.mtime_ns or 0))


def _list_saved_dataset(root: Location, split: str) -> CorpusListing:
    """A ``datasets.save_to_disk`` folder: its Arrow files, from ``state.json`` (a DatasetDict: the split's)."""
    if (root / "dataset_dict.json").exists():
        splits = (root / "dataset_dict.json").read_json().get("splits", [])
        if split not in splits:
            raise CorpusError(f"{root.uri}: split {split!r} not found (have {sorted(splits)})")
        root = root / split
    try:
        names = [f["filename"] for f in (root / "state.json").read_json()["_data_files"]]
    except (FileNotFoundError, KeyError, TypeError, ValueError) as err:
        raise CorpusError(f"{root.uri}: not a readable save_to_disk folder ({err})") from None
    files = []
    for name in names:
        loc = root / name
        files.append(_corpus_file(loc, loc.info(), "arrow"))
    return CorpusListing(files)


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class ShardEntry:
    """One shard's slice of the corpus: ``[start, stop)`` in bytes (jsonl) or rows (parquet) of ``file``, the
    whole file when ``stop`` is None; ``limit`` caps the usable documents taken (the last shard under
    ``--max-docs``). ``size``/``mtime_ns`` are the file's as planned: a reader refuses a file that changed."""

    index: int
    file: str
    kind: str
    start: int = 0
    stop: int | None = None
    size: int = 0
    mtime_ns: int = 0
    limit: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ShardEntry:
        return cls(**data)

    def describe(self) -> str:
        if self.stop is None:
            return self.file
        unit = "bytes" if self.kind == "jsonl" else "rows"
        return f"{self.file} ({unit} {self.start}-{self.stop})"


def plan_shards(listing: CorpusListing, shard_bytes: int) -> Iterator[ShardEntry]:
    """The shards of the corpus in order (lazily: a caller that needs only a prefix reads only its cuts)."""
    check_int("--shard-size", shard_bytes)
    index = 0
    for f in listing.files:
        for start, stop in _slices(f, shard_bytes):
            yield ShardEntry(index, f.uri, f.kind, start, stop, f.size, f.mtime_ns)
            index += 1


def _slices(f: CorpusFile, budget: int) -> Iterator[tuple[int, int | None]]:
    if f.kind == "jsonl":
        if f.size == 0:
            return
        start = 0
        with location(f.uri).open_input_file() as stream:
            while start < f.size:
                stop = (
                    f.size if start + budget >= f.size else _line_start_from(stream, start + budget, f.size)
                )
                yield start, stop
                start = stop
    elif f.kind == "parquet":
        yield from _parquet_slices(f, budget)
    else:
        yield 0, None


def _line_start_from(stream, pos: int, size: int) -> int:
    """The first line start at or after ``pos`` (``size`` when none): reads from ``pos - 1`` to the next newline."""
    stream.seek(pos - 1)
    offset = pos - 1
    while offset < size:
        chunk = stream.read(64 * 1024)
        if not chunk:
            break
        i = chunk.find(b"\n")
        if i >= 0:
            return offset + i + 1
        offset += len(chunk)
    return size


def _parquet_slices(f: CorpusFile, budget: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``budget`` uncompressed bytes, from the footer's row-group sizes."""
    import pyarrow.parquet as pq

    with location(f.uri).open_input_file() as stream:
        meta = pq.ParquetFile(stream).metadata
    start = row = acc = 0
    for g in range(meta.num_row_groups):
        rows, size = meta.row_group(g).num_rows, max(meta.row_group(g).total_byte_size, 1)
        if rows == 0:
            continue
        if size > budget:  # a big row group: flush, then cut it into row ranges
            if row > start:
                yield start, row
            step = max(1, rows * budget // size)
            for lo in range(row, row + rows, step):
                yield lo, min(lo + step, row + rows)
            row += rows
            start, acc = row, 0
            continue
        if acc + size > budget and row > start:
            yield start, row
            start, acc = row, 0
        row += rows
        acc += size
    if row > start:
        yield start, row


def limit_plan(entries: Iterable[ShardEntry], config: CorpusConfig, limit: int) -> list[ShardEntry]:
    """The prefix of ``entries`` that holds the first ``limit`` usable documents, the last one capped: reads
    those shards (on the caller's side) and nothing after them, so the work is proportional to ``limit``."""
    kept: list[ShardEntry] = []
    remaining = limit
    for entry in entries:
        entry = replace(entry, limit=remaining)
        used = sum(1 for _ in read_shard(entry, config, CorpusStats()))
        if used == 0:
            continue
        kept.append(replace(entry, index=len(kept), limit=remaining if used >= remaining else None))
        remaining -= used
        if remaining == 0:
            break
    return kept


# ------------------------------------------------------------------------------------------ reading


def read_shard(
    entry: ShardEntry,
    config: CorpusConfig,
    stats: CorpusStats,
    seen: dict[str, str] | None = None,
    check_unchanged: bool = True,
) -> Iterator[Document]:
    """The validated documents of one shard (see the module docstring for the rules). ``seen`` maps ids already
    used to where (one dict per shard unless a caller shares it); ``check_unchanged`` refuses a file whose size
    or modification time is not the planned one."""
    reader = _ShardReader(entry)
    if check_unchanged and entry.kind != "hub":
        reader.check_unchanged()
    seen = {} if seen is None else seen
    used = 0
    for record, pos in reader.records(config):
        if entry.limit is not None and used >= entry.limit:
            return
        stats.read += 1
        doc = _validate(record, pos, reader, config)
        if doc is None:
            stats.skip(f"{reader.where(pos)}: empty or whitespace-only")
            continue
        if doc.doc_id in seen:
            if config.id_field:
                raise CorpusError(
                    f"{reader.exact(pos)}: duplicate document id {doc.doc_id!r} (first seen at "
                    f"{seen[doc.doc_id]}); ids must be unique"
                )
            # identical text: its cache row would be identical too, so keep the first and count this one
            stats.skip(f"{doc.source}: same text as {seen[doc.doc_id]}", duplicate=True)
            continue
        seen[doc.doc_id] = doc.source if not config.id_field else reader.exact(pos)
        stats.used += 1
        used += 1
        yield doc


def _validate(record, pos, reader: _ShardReader, config: CorpusConfig) -> Document | None:
    """The record as a Document; None for an empty text. Errors name the exact file and line/row."""
    if not isinstance(record, dict):
        raise CorpusError(f"{reader.exact(pos)}: expected an object with a {config.text_field!r} field")
    if record.get(config.text_field) is None and record.get(config.messages_field) is not None:
        return _conversation(record, pos, reader, config)
    if config.text_field not in record:
        raise CorpusError(
            f"{reader.exact(pos)}: missing text field {config.text_field!r} (or a conversation in "
            f"{config.messages_field!r})"
        )
    text = record[config.text_field]
    if not isinstance(text, str):
        raise CorpusError(
            f"{reader.exact(pos)}: text field {config.text_field!r} is {type(text).__name__}, expected a string"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CorpusError(
            f"{reader.exact(pos)}: text is not valid Unicode ({err.reason} at character {err.start})"
        ) from None
    if not text.strip():
        return None
    doc_id = _doc_id(record, pos, reader, config, text)
    return Document(doc_id=doc_id, text=text, source=reader.where(pos), position=pos)


def _doc_id(record: dict, pos, reader: _ShardReader, config: CorpusConfig, hashed: str) -> str:
    """The row's ``--id-field`` value, or (without one) a hash of ``hashed``: the text, or a conversation's
    canonical JSON."""
    if not config.id_field:
        return text_hash_id(hashed)
    if config.id_field not in record or record[config.id_field] is None:
        raise CorpusError(f"{reader.exact(pos)}: missing id field {config.id_field!r}")
    return str(record[config.id_field])


def _conversation(record: dict, pos, reader: _ShardReader, config: CorpusConfig) -> Document:
    from alm_pipeline.pipeline.chat import ChatError, messages_json, parse_messages

    value = record[config.messages_field]
    if isinstance(value, str):  # a conversation stored as a JSON string (a Parquet string column)
        try:
            value = json.loads(value)
        except ValueError:
            raise CorpusError(
                f"{reader.exact(pos)}: {config.messages_field!r} is a string but not JSON"
            ) from None
    try:
        messages = parse_messages(value, reader.exact(pos))
    except ChatError as err:
        raise CorpusError(str(err)) from None
    canonical = messages_json(messages)
    doc_id = _doc_id(record, pos, reader, config, canonical)
    return Document(doc_id=doc_id, text=canonical, source=reader.where(pos), position=pos, messages=messages)


class _ShardReader:
    """Raw records of one shard with their positions: ``(byte offset, line)`` in a jsonl file (the line counted
    from the range's start), a row number otherwise. :meth:`where` names a position cheaply; :meth:`exact`
    names it as ``file:line`` even in a range that starts mid-file (by counting the newlines before it: only
    on the way to an error)."""

    def __init__(self, entry: ShardEntry):
        self.entry = entry
        self.loc = None if entry.kind == "hub" else location(entry.file)

    def check_unchanged(self) -> None:
        info = self.loc.info()
        if info.type.name != "File":
            raise CorpusError(f"{self.entry.file}: corpus file disappeared since the run was planned")
        if (int(info.size or 0), int(info.mtime_ns or 0)) != (self.entry.size, self.entry.mtime_ns):
            raise CorpusError(
                f"{self.entry.file}: corpus file changed since the run was planned (size {self.entry.size} -> "
                f"{info.size} bytes); rerun with --overwrite to rebuild the cache from the new corpus"
            )

    def where(self, pos) -> str:
        if isinstance(pos, tuple):
            offset, line = pos
            return (
                f"{self.entry.file}:{line}" if self.entry.start == 0 else f"{self.entry.file} (byte {offset})"
            )
        return f"{self.entry.file}#{pos}"

    def exact(self, pos) -> str:
        if not isinstance(pos, tuple) or self.entry.start == 0:
            return self.where(pos)
        offset, _ = pos
        newlines = 0
        with self.loc.open_input_file() as stream:
            done = 0
            while done < offset:
                chunk = stream.read(min(_BLOCK, offset - done))
                if not chunk:
                    break
                newlines += chunk.count(b"\n")
                done += len(chunk)
        return f"{self.entry.file}:{newlines + 1}"

    def records(self, config: CorpusConfig) -> Iterator[tuple[object, object]]:
        kind = self.entry.kind
        if kind in ("jsonl", "jsonl.gz"):
            yield from self._jsonl()
        elif kind == "json":
            yield from self._json()
        elif kind == "parquet":
            yield from self._parquet(config)
        elif kind == "arrow":
            yield from self._arrow()
        elif kind == "hub":
            yield from self._hub(config)
        else:
            raise CorpusError(f"{self.entry.file}: no reader for corpus files of kind {kind!r}")

    def _jsonl(self) -> Iterator[tuple[dict, tuple[int, int]]]:
        for line_no, (offset, raw) in enumerate(self._lines(), start=1):
            pos = (offset, line_no)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{self.exact(pos)}: invalid UTF-8 (byte {err.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"{self.exact(pos)}: invalid JSON ({err.msg} at column {err.colno})"
                ) from None
            yield record, pos

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(offset, line without its newline) of every line that starts in ``[start, stop)``: a line belongs to
        the range holding its first byte, so a range that starts mid-line skips to the next line."""
        import pyarrow as pa

        start, stop = self.entry.start, self.entry.stop
        if self.entry.kind == "jsonl.gz":
            stream = pa.CompressedInputStream(
                self.loc.fs.open_input_stream(self.loc.path, compression=None), "gzip"
            )
        else:
            stream = self.loc.open_input_file()
        with stream:
            buf, base, p = b"", start, 0
            if start > 0:  # skip the rest of the line that started before this range
                stream.seek(start - 1)
                base = start - 1
                while True:
                    chunk = stream.read(_BLOCK)
                    if not chunk:
                        return
                    i = chunk.find(b"\n")
                    if i >= 0:
                        buf, base = chunk[i + 1 :], base + i + 1
                        break
                    base += len(chunk)
            while stop is None or base + p < stop:
                i = buf.find(b"\n", p)
                if i < 0:
                    chunk = stream.read(_BLOCK)
                    if not chunk:
                        if p < len(buf):
                            yield base + p, buf[p:]
                        return
                    buf, base, p = buf[p:] + chunk, base + p, 0
                    continue
                yield base + p, buf[p:i]
                p = i + 1

    def _json(self) -> Iterator[tuple[object, object]]:
        data = self.loc.read_bytes()
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise CorpusError(f"{self.entry.file}: invalid UTF-8 at byte {err.start}") from None
        except json.JSONDecodeError:
            yield from self._jsonl()  # many ".json" corpora are really JSON lines
            return
        if not isinstance(records, list):
            raise CorpusError(f"{self.entry.file}: expected a JSON list of objects or JSON lines")
        yield from ((record, i) for i, record in enumerate(records))

    def _parquet(self, config: CorpusConfig) -> Iterator[tuple[dict, int]]:
        import pyarrow.parquet as pq

        start = self.entry.start
        with self.loc.open_input_file() as stream:
            pf = pq.ParquetFile(stream)
            stop = pf.metadata.num_rows if self.entry.stop is None else self.entry.stop
            names = set(pf.schema_arrow.names)
            wanted = (config.text_field, config.messages_field, config.id_field)
            columns = [c for c in wanted if c and c in names] or None
            row = 0
            for g in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                lo, hi = max(start, row), min(stop, row + rows)
                if lo < hi:
                    table = pf.read_row_group(g, columns=columns).slice(lo - row, hi - lo)
                    yield from ((r, lo + i) for i, r in enumerate(table.to_pylist()))
                row += rows
                if row >= stop:
                    return

    def _arrow(self) -> Iterator[tuple[dict, int]]:
        import pyarrow as pa

        with self.loc.open_input_file() as stream:
            row = 0
            for batch in pa.ipc.open_stream(stream):
                for record in batch.to_pylist():
                    yield record, row
                    row += 1

    def _hub(self, config: CorpusConfig) -> Iterator[tuple[dict, int]]:
        import datasets

        try:
            ds = datasets.load_dataset(config.path, split=config.split, streaming=True)
        except Exception as err:  # network or name errors: say what was tried
            raise CorpusError(
                f"{config.path}: not a local file or directory, and loading it as a hub dataset failed ({err})"
            ) from None
        yield from ((record, i) for i, record in enumerate(ds))


def iter_documents(config: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[Document]:
    """Every validated document of the corpus in order, with ids unique (and identical texts skipped) across the
    whole corpus and ``config.limit`` applied: for evaluation data, read in one process."""
    stats = stats if stats is not None else CorpusStats()
    listing = list_corpus(config)
    for name in listing.skipped:
        stats.skip_file(name)
    seen: dict[str, str] = {}
    for f in listing.files:
        entry = ShardEntry(0, f.uri, f.kind, size=f.size, mtime_ns=f.mtime_ns)
        for doc in read_shard(entry, config, stats, seen=seen, check_unchanged=False):
            yield doc
            if config.limit is not None and stats.used >= config.limit:
                return


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
