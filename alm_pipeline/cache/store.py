"""Atomic, verifiable Parquet shards and JSON manifests on disk.

A dataset directory (teacher cache or aligned set) holds ``manifest.json`` and ``shards/``. Each shard is
written to a temporary file and renamed into place, then a small ``<shard>.done.json`` marker records its
rows, tokens and SHA-256; a shard without a verified marker does not exist as far as readers and resumes
are concerned. Everything here is plain local-filesystem I/O (the directory may be a shared mount on a
cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 minus the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise CacheIntegrityError(f"{path}: unreadable JSON ({err})") from None


def read_manifest(root: Path, kind: str, version: int, what: str, rerun: str, require_complete: bool) -> dict:
    """The manifest of a ``kind`` directory (a teacher cache, an aligned set), refused with a message that names
    the folder when it is missing, of another kind or format ``version``, or (``require_complete``) unfinished;
    ``what`` names the kind for people ("teacher cache"), ``rerun`` the command that makes or finishes one."""
    manifest_file = root / MANIFEST
    a_what = ("an " if what[0] in "aeiou" else "a ") + what
    if not manifest_file.exists():
        raise CacheIntegrityError(f"{root}: not {a_what} (no {MANIFEST})")
    manifest = read_json(manifest_file)
    if manifest.get("kind") != kind:
        raise CacheIntegrityError(f"{manifest_file}: not {a_what} (kind={manifest.get('kind')!r})")
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_relative(name: object, what: str) -> str:
    """``name`` if it is a relative path that stays inside the dataset folder (no absolute path, no ``..``);
    a manifest or marker entry that points elsewhere is refused, so a crafted manifest cannot make a reader
    open files outside the dataset."""
    if not isinstance(name, str) or not name:
        raise CacheIntegrityError(f"{what} {name!r}: not a file name")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise CacheIntegrityError(f"{what} {name!r}: leaves the dataset folder (refused)")
    return name


@dataclass(frozen=True)
class ShardInfo:
    """What the ``.done.json`` marker says about one finished shard."""

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


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_path(root: Path, index: int) -> Path:
    return Path(root) / SHARD_DIR / shard_name(index)


def marker_path(root: Path, index: int) -> Path:
    return Path(root) / SHARD_DIR / f"shard-{index:05d}.done.json"


def write_shard(
    root: Path, index: int, table: pa.Table, tokens: int, stats: dict, row_group_size: int | None = None
) -> ShardInfo:
    """Write one shard atomically (zstd Parquet, ``row_group_size`` rows per row group, default pyarrow's),
    then its marker. Deterministic for the same table."""
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
    atomic_write_bytes(path, data)
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
    token, and splitting float bytes into streams lets zstd compress log-probs' exponents."""
    encodings = {}
    for field in schema:
        value_type = field.type.value_type if pa.types.is_list(field.type) else field.type
        if pa.types.is_floating(value_type):
            encodings[field.name] = "BYTE_STREAM_SPLIT"
        elif pa.types.is_integer(value_type) and field.name in ("offsets", "chunk_start", "chunk_end"):
            encodings[field.name] = "DELTA_BINARY_PACKED"
    return encodings


def verified_shard(root: Path, index: int, check_hash: bool = True) -> ShardInfo | None:
    """The shard's info if its marker and file agree; None if it is absent or incomplete."""
    marker = marker_path(root, index)
    path = shard_path(root, index)
    if not marker.exists() or not path.exists():
        return None
    try:
        info = ShardInfo.from_json(read_json(marker))
    except (CacheIntegrityError, KeyError, TypeError, ValueError):
        return None
    if path.stat().st_size != info.bytes:
        return None
    if check_hash and sha256_file(path) != info.sha256:
        return None
    return info


def verify_shard_file(root: Path, info: ShardInfo) -> None:
    path = Path(root) / info.file
    if not path.exists():
        raise CacheIntegrityError(f"{path}: shard listed in the manifest is missing")
    if path.stat().st_size != info.bytes or sha256_file(path) != info.sha256:
        raise CacheIntegrityError(
            f"{path}: checksum does not match the manifest (corrupted or replaced shard)"
        )
