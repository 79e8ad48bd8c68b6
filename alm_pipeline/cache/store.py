"""Atomic, verifiable Parquet shards, markers, shard indexes and JSON manifests on any storage backend.

A dataset (teacher cache or aligned set) is a folder, local or a URI (:mod:`alm_pipeline.storage`), holding
``manifest.json``, ``shards.parquet`` (the shard index: one row per finished shard with its rows, tokens,
bytes, SHA-256 and stats) and ``shards/``. Each shard is written atomically (a temporary file renamed into
place on a local disk, one PUT on an object store), then a small ``<shard>.done.json`` marker records its
rows, tokens, size and SHA-256; a shard whose marker is missing or whose size differs from the marker's does
not exist as far as readers and resumes are concerned. Checking markers and sizes costs one listing and one
small read per shard; reading every byte to check the SHA-256 is a separate, explicit step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alm_pipeline.storage import Location, StorageError, location

MANIFEST = "manifest.json"
SHARD_DIR = "shards"


class CacheIntegrityError(ValueError):
    """A shard or manifest on disk is missing, corrupted, or does not match what was expected."""


def temporary_sibling(path: Path) -> Path:
    """A fresh name next to ``path`` for a file or folder to be renamed onto it (hidden, unique per process and
    call). Unlike ``mkstemp``/``mkdtemp``, whose results are private (0600/0700), what is created under this name
    gets the user's umask, like every other output."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def current_umask() -> int:
    """This process's umask (read from ``/proc`` where possible: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would (0666/0777 minus the
    umask). For folders written by libraries that create files privately: safetensors writes 0600."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike[str] | Location, data: bytes) -> None:
    """Write a whole file atomically on any backend (see :meth:`alm_pipeline.storage.Location.write_bytes`)."""
    location(path).write_bytes(data)


def atomic_write_json(path: str | os.PathLike[str] | Location, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike[str] | Location) -> Any:
    loc = location(path)
    try:
        return json.loads(loc.read_bytes())
    except FileNotFoundError:
        raise
    except StorageError:
        raise
    except (OSError, ValueError) as err:
        raise CacheIntegrityError(f"{loc.uri}: unreadable JSON ({err})") from None


def read_manifest(
    root: str | os.PathLike[str] | Location,
    kind: str,
    version: int,
    what: str,
    rerun: str,
    require_complete: bool,
) -> dict:
    """The manifest of a ``kind`` dataset (a teacher cache, an aligned set), refused with a message that names
    the folder when it is missing, of another kind or format ``version``, or (``require_complete``) unfinished;
    ``what`` names the kind for people ("teacher cache"), ``rerun`` the command that makes or finishes one."""
    root = location(root)
    manifest_file = root / MANIFEST
    a_what = ("an " if what[0] in "aeiou" else "a ") + what
    try:
        manifest = read_json(manifest_file)
    except FileNotFoundError:
        raise CacheIntegrityError(f"{root}: not {a_what} (no {MANIFEST})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else None
        raise CacheIntegrityError(f"{manifest_file}: not {a_what} (kind={found!r})")
    if manifest.get("format_version") != version:
        raise CacheIntegrityError(
            f"{manifest_file}: {what} format version {manifest.get('format_version')!r}, this alm-pipeline reads "
            f"version {version}; re-run `{rerun}` with this version"
        )
    if require_complete and manifest.get("state") != "complete":
        raise CacheIntegrityError(
            f"{root}: the {what} is incomplete (state={manifest.get('state')!r}); re-run the same `{rerun}` "
            "command to finish it"
        )
    return manifest


def sha256_file(path: str | os.PathLike[str] | Location) -> str:
    """SHA-256 of a file on any backend, streamed in 4 MiB blocks."""
    loc = location(path)
    h = hashlib.sha256()
    try:
        with loc.fs.open_input_stream(loc.path, compression=None) as f:
            while block := f.read(1 << 22):
                h.update(block)
    except FileNotFoundError:
        raise FileNotFoundError(f"{loc.uri}: no such file") from None
    return h.hexdigest()


def remove_orphaned_temp_files(root: str | os.PathLike[str] | Location) -> int:
    """Remove the temporary files a killed writer left in a local dataset folder and its ``shards/`` (atomic
    writes go through ``.NAME.PID.RANDOM.tmp`` files; object stores have none: a PUT is all or nothing). Only
    for a caller holding the output lock. Returns how many were removed."""
    root = location(root)
    if not root.is_local:
        return 0
    removed = 0
    for folder in (root, root / SHARD_DIR):
        for info in folder.list():
            if info.is_file and info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                folder.child(info).remove()
                removed += 1
    return removed


def check_relative(name: object, what: str) -> str:
    """``name`` if it is a relative path that stays inside the dataset folder (no absolute path, no ``..``);
    a manifest or marker entry that points elsewhere is refused, so a crafted manifest cannot make a reader
    open files outside the dataset."""
    if not isinstance(name, str) or not name:
        raise CacheIntegrityError(f"{what} {name!r}: not a file name")
    if (
        name.startswith("/")
        or "\\" in name
        or "://" in name
        or ".." in name.split("/")
        or Path(name).is_absolute()
    ):
        raise CacheIntegrityError(f"{what} {name!r}: leaves the dataset folder (refused)")
    return name


@dataclass(frozen=True)
class ShardInfo:
    """What the ``.done.json`` marker (and the dataset's shard index) says about one finished shard."""

    index: int
    file: str  # relative to the dataset root
    rows: int
    tokens: int
    bytes: int
    sha256: str
    stats: dict

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ShardInfo:
        return cls(
            index=int(d["index"]),
            file=check_relative(d["file"], "shard entry"),
            rows=int(d["rows"]),
            tokens=int(d["tokens"]),
            bytes=int(d["bytes"]),
            sha256=d["sha256"],
            stats=dict(d.get("stats", {})),
        )


# ------------------------------------------------------------------------------------------ shard files

SHARD_DIGITS = 8  # names sort in shard order up to 10^8 shards


def shard_name(index: int) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}.parquet"


def marker_name(index: int) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}.done.json"


def shard_path(root: str | os.PathLike[str] | Location, index: int) -> Location:
    """Where shard ``index`` of the dataset at ``root`` lives."""
    return location(root) / SHARD_DIR / shard_name(index)


def marker_path(root: str | os.PathLike[str] | Location, index: int) -> Location:
    return location(root) / SHARD_DIR / marker_name(index)


def write_shard(
    root: str | os.PathLike[str] | Location,
    index: int,
    table: pa.Table,
    tokens: int,
    stats: dict,
    row_group_size: int | None = None,
) -> ShardInfo:
    """Write one shard atomically (zstd Parquet, one PUT on object stores), then its marker. Deterministic
    for the same table. ``row_group_size``: rows per Parquet row group (default: pyarrow's)."""
    path = shard_path(root, index)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=row_group_size,
        compression="zstd",
        compression_level=3,
        use_dictionary=False,
        column_encoding=_column_encodings(table.schema),
    )
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    info = ShardInfo(
        index=index,
        file=f"{SHARD_DIR}/{path.name}",
        rows=table.num_rows,
        tokens=int(tokens),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        stats=stats,
    )
    atomic_write_json(marker_path(root, index), info.to_json())
    return info


def _column_encodings(schema: pa.Schema) -> dict[str, str]:
    """Encodings that make token-level columns small: increasing offsets delta-encode to about one byte per
    token, and splitting values into byte streams lets zstd compress the log-probs' exponents and the token
    ids' high bytes (16-bit values stored as uint16, bfloat16, are split the same way). Keys are Parquet
    column paths: a list column's values are ``NAME.list.element`` (a key naming the list itself is ignored)."""
    encodings = {}
    for field in schema:
        is_list = pa.types.is_list(field.type)
        value_type = field.type.value_type if is_list else field.type
        path = f"{field.name}.list.element" if is_list else field.name
        if field.name in ("offsets", "chunk_start", "chunk_end") and pa.types.is_integer(value_type):
            encodings[path] = "DELTA_BINARY_PACKED"
        else:
            split = (
                pa.types.is_float32(value_type)
                or pa.types.is_float64(value_type)
                or bool(field.metadata and b"alm.dtype" in field.metadata)  # bfloat16 bits as uint16
                or (is_list and pa.types.is_int32(value_type))
            )
            if split:
                encodings[path] = "BYTE_STREAM_SPLIT"
    return encodings


_MARKER_THREADS = 32  # markers are tiny: reading them is latency-bound, most of all on object stores


def scan_shards(root: str | os.PathLike[str] | Location, num_shards: int) -> dict[int, ShardInfo]:
    """The finished shards among ``0..num_shards-1`` of the dataset at ``root``: those whose marker reads and
    whose file has the size the marker records. Work proportional to the number of shards, never to their
    bytes: one listing of ``shards/`` and one small read per marker (in parallel threads); checksums are
    left to an explicit verification (:meth:`ShardedDataset.verify_checksums`)."""
    root = location(root)
    folder = root / SHARD_DIR
    sizes: dict[str, int] = {}
    for entry in folder.list():
        sizes[entry.base_name] = int(entry.size) if entry.is_file else -1
    candidates = [k for k in range(num_shards) if shard_name(k) in sizes and marker_name(k) in sizes]

    def read(k: int) -> ShardInfo | None:
        try:
            info = ShardInfo.from_json(read_json(folder / marker_name(k)))
        except (FileNotFoundError, CacheIntegrityError, KeyError, TypeError, ValueError):
            return None
        if (
            info.index != k
            or info.file != f"{SHARD_DIR}/{shard_name(k)}"
            or sizes[shard_name(k)] != info.bytes
        ):
            return None
        return info

    if len(candidates) <= 4:
        found = [read(k) for k in candidates]
    else:
        with ThreadPoolExecutor(min(_MARKER_THREADS, len(candidates))) as pool:
            found = list(pool.map(read, candidates))
    return {k: info for k, info in zip(candidates, found, strict=True) if info is not None}


def verified_shard(
    root: str | os.PathLike[str] | Location, index: int, check_hash: bool = False
) -> ShardInfo | None:
    """Shard ``index``'s info if its marker reads and its file has the recorded size (and, with
    ``check_hash``, the recorded SHA-256); None if it is absent or incomplete."""
    root = location(root)
    try:
        info = ShardInfo.from_json(read_json(marker_path(root, index)))
        size = shard_path(root, index).size()
    except (FileNotFoundError, StorageError, CacheIntegrityError, KeyError, TypeError, ValueError):
        return None
    if size != info.bytes:
        return None
    if check_hash and sha256_file(location(root) / info.file) != info.sha256:
        return None
    return info


def verify_shard_file(root: str | os.PathLike[str] | Location, info: ShardInfo) -> None:
    """Check one shard's size and SHA-256 against its entry (reads the whole shard)."""
    path = location(root) / info.file
    try:
        size = path.size()
    except (FileNotFoundError, StorageError):
        raise CacheIntegrityError(f"{path}: shard listed in the manifest is missing") from None
    if size != info.bytes or sha256_file(path) != info.sha256:
        raise CacheIntegrityError(
            f"{path}: checksum does not match the manifest (corrupted or replaced shard)"
        )


# ------------------------------------------------------------------------------------------ shard index

SHARD_INDEX = "shards.parquet"
_INDEX_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("stats", pa.string(), nullable=False),  # JSON, per shard
    ]
)


def shard_index_table(shards: list[ShardInfo]) -> pa.Table:
    """The shard index of ``shards`` as a table (``stats`` as JSON text)."""
    columns = {
        "index": [s.index for s in shards],
        "file": [s.file for s in shards],
        "rows": [s.rows for s in shards],
        "tokens": [s.tokens for s in shards],
        "bytes": [s.bytes for s in shards],
        "sha256": [s.sha256 for s in shards],
        "stats": [json.dumps(s.stats, separators=(",", ":")) for s in shards],
    }
    return pa.Table.from_pydict(columns, schema=_INDEX_SCHEMA)


def write_shard_index(root: str | os.PathLike[str] | Location, shards: list[ShardInfo]) -> dict:
    """Write the list of finished shards as ``shards.parquet`` (one row per shard: columnar, so that a
    manifest of 10^5+ shards opens in milliseconds); returns the manifest's entry for it (file, count, bytes,
    SHA-256)."""
    table = shard_index_table(shards)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=False)
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(location(root) / SHARD_INDEX, data)
    return {
        "file": SHARD_INDEX,
        "count": len(shards),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


ENTRY_COLUMNS = ("index", "file", "rows", "tokens", "bytes", "sha256")  # the index without the stats


def read_shard_index(
    root: str | os.PathLike[str] | Location, entry: dict, columns: tuple[str, ...] | None = ENTRY_COLUMNS
) -> pa.Table:
    """The shard index a manifest's ``shard_index`` entry names (``columns``: by default all but the per-shard
    stats, the bulk of it, which only summaries need), refused if it is missing, altered or does not list the
    shards ``0..count-1`` in order, or if an entry leaves the dataset folder."""
    root = location(root)
    path = root / check_relative(entry.get("file"), "shard_index entry")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheIntegrityError(f"{path}: the shard index named in {MANIFEST} is missing") from None
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CacheIntegrityError(f"{path}: does not match {MANIFEST} (altered or replaced shard index)")
    try:
        source = pq.ParquetFile(pa.BufferReader(data))
        if not source.schema_arrow.equals(_INDEX_SCHEMA, check_metadata=False):
            raise CacheIntegrityError(f"{path}: not a shard index (schema {source.schema_arrow.names})")
        table = source.read(columns=list(columns) if columns else None)
    except (OSError, pa.ArrowException) as err:
        raise CacheIntegrityError(f"{path}: unreadable shard index ({err})") from None
    count = int(entry.get("count", -1))
    index = table["index"].to_numpy()
    if table.num_rows != count or not np.array_equal(index, np.arange(count)):
        raise CacheIntegrityError(f"{path}: does not list shards 0..{count - 1} in order")
    # shard files are always written as shards/shard-K.parquet: checking the pattern (vectorised) refuses any
    # entry that would leave the dataset folder without a Python loop over 10^5+ names
    names = table["file"]
    ok = pc.match_substring_regex(names, r"^shards/shard-[0-9]+\.parquet$")
    if not pc.all(ok).as_py():
        bad = names.filter(pc.invert(ok))[0].as_py()
        check_relative(bad, "shard entry")  # names the entry when it leaves the folder
        raise CacheIntegrityError(f"{path}: shard entry {bad!r} is not a shard file name (refused)")
    return table


def shard_info_at(index_table: pa.Table, k: int) -> ShardInfo:
    """Row ``k`` of a shard index as a :class:`ShardInfo`."""
    row = {name: index_table[name][k].as_py() for name in index_table.column_names}
    return ShardInfo(
        index=row["index"],
        file=row["file"],
        rows=row["rows"],
        tokens=row["tokens"],
        bytes=row["bytes"],
        sha256=row["sha256"],
        stats=json.loads(row["stats"]) if "stats" in row else {},
    )


def shard_infos(index_table: pa.Table) -> list[ShardInfo]:
    """Every row of a shard index as :class:`ShardInfo`."""
    cols = {name: index_table[name].to_pylist() for name in index_table.column_names}
    return [
        ShardInfo(i, f, r, t, b, h, json.loads(st))
        for i, f, r, t, b, h, st in zip(
            cols["index"],
            cols["file"],
            cols["rows"],
            cols["tokens"],
            cols["bytes"],
            cols["sha256"],
            cols["stats"],
            strict=True,
        )
    ]
