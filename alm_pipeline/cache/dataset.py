"""One sharded dataset on storage: the base of the teacher cache and the aligned set.

A dataset is a folder (a local path or a ``file://``, ``s3://``, ``gs://`` URI) with ``manifest.json``,
``shards.parquet`` (the shard index) and ``shards/shard-K.parquet`` (see :mod:`.store` for the atomic shard
files and their ``.done.json`` markers). Its manifest names the dataset's ``kind`` and format version, its
``identity`` (everything that determines its content: a later run with another identity must not mix its
shards in), its state (``in_progress`` until every shard is written) and the shard index with its size and
checksum.

:class:`ShardedDataset` holds what both kinds share: opening (with refusals that name the folder), reading
shards (also from a shard entry alone, without the manifest: what a Ray task gets), the cheap presence check
(markers and sizes, one listing) and the explicit full checksum pass (parallel Ray tasks), and the writer's
side: refusing an output made with another identity (listing the differences), finding the shards still to
write, and writing the manifest with its index. A kind is a subclass that sets the class attributes and adds
its own summary and accessors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alm_pipeline.cache import store
from alm_pipeline.storage import Location, location, require_bucket

PathLike = str | os.PathLike[str] | Location


class OutputRefusedError(ValueError):
    """An output folder holds a dataset that a run must not resume or mix with (``differences`` lists why)."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]] | None = None):
        super().__init__(message)
        self.differences = differences or []


def check_schema(schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise a clear error if ``schema`` lacks a column of ``expected`` or has it with another type."""
    problems = []
    for f in expected:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            problems.append(f"missing column {f.name!r}")
        elif not schema.field(idx).type.equals(f.type):
            problems.append(f"column {f.name!r} is {schema.field(idx).type}, expected {f.type}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def diff_identity(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """The leaves where two identities differ: (dotted key, old value, new value), sorted by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += diff_identity(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [(prefix, old, new)]


def check_output_storage(root: PathLike) -> Location:
    """``root`` as a location whose storage answers (see :func:`alm_pipeline.storage.require_bucket`); call
    before expensive work."""
    return require_bucket(root)


@dataclass
class ShardedDataset:
    """A dataset opened for reading; subclasses are the kinds (teacher cache, aligned set)."""

    kind: ClassVar[str]  # manifest "kind"
    format_version: ClassVar[int]
    what: ClassVar[str]  # the kind for people: "teacher cache"
    short: ClassVar[str]  # one word for it in refusals: "cache"
    rerun: ClassVar[str]  # the command that makes or finishes one
    schema: ClassVar[pa.Schema]  # row schema of the shards
    token_column: ClassVar[str]  # the list column whose entries are counted as the shard's tokens
    # what overwrite removes
    contents: ClassVar[tuple[str, ...]] = (store.SHARD_DIR, store.SHARD_INDEX, store.MANIFEST)

    root: Location
    manifest: dict
    _index: pa.Table | None = field(default=None, repr=False, compare=False)
    _shards: list[store.ShardInfo] | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------------------------ reading

    @classmethod
    def open(
        cls, path: PathLike, verify: bool = True, require_complete: bool = True, checksums: bool = False
    ):
        """Open a dataset, refusing (with a clear message naming it) anything that does not check out.

        ``verify``: every shard of the index is present with its recorded size (one listing of ``shards/``:
        work proportional to the number of shards). ``checksums``: also read every shard and check its SHA-256
        and schema, in parallel Ray tasks (:meth:`verify_checksums`)."""
        root = location(path)
        manifest = store.read_manifest(
            root, cls.kind, cls.format_version, cls.what, cls.rerun, require_complete
        )
        dataset = cls(root=root, manifest=manifest)
        dataset.shard_index  # noqa: B018 - read (and check) the index now: a bad one is refused at open
        if verify or checksums:
            dataset.verify()
        if checksums:
            dataset.verify_checksums()
        return dataset

    @property
    def num_shards(self) -> int:
        return self.shard_index.num_rows

    @property
    def shard_index(self) -> pa.Table:
        """The shard index (``shards.parquet``): one row per shard, columns as :class:`store.ShardInfo`
        (``stats`` as JSON text). Columnar, so that 10^5+ shards load in milliseconds."""
        if self._index is None:
            entry = self.manifest.get("shard_index")
            if entry is None:  # an unfinished dataset: no shard listed yet
                self._index = store.shard_index_table([])
            else:
                self._index = store.read_shard_index(self.root, entry)
        return self._index

    @property
    def shards(self) -> list[store.ShardInfo]:
        """Every shard's entry with its stats (built from the whole index on first use; seconds at 10^5
        shards: per-shard work should use :meth:`shard_info` or :attr:`shard_index`)."""
        if self._shards is None:
            entry = self.manifest.get("shard_index")
            full = store.read_shard_index(self.root, entry, columns=None) if entry else self.shard_index
            self._shards = store.shard_infos(full)
        return self._shards

    def shard_info(self, index: int) -> store.ShardInfo:
        """One shard's entry (its ``stats`` left empty: they are in :attr:`shards`), without building the
        whole list."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"{self.root}: no shard {index} (the {self.what} has {self.num_shards})")
        return store.shard_info_at(self.shard_index, index)

    def shard_location(self, index: int) -> Location:
        """Where shard ``index`` is stored."""
        return self.root / self.shard_info(index).file

    def shard_files(self) -> list[Location]:
        return [self.root / name for name in self.shard_index["file"].to_pylist()]

    def read_shard(self, index: int, columns: list[str] | None = None) -> pa.Table:
        return self.read_shard_entry(self.root, self.shard_info(index), columns)

    @classmethod
    def read_shard_entry(
        cls, root: PathLike, info: store.ShardInfo | dict, columns: list[str] | None = None
    ) -> pa.Table:
        """Read one shard from its entry alone (what a Ray task receives; the manifest is not read). A missing
        shard, or one whose size is not the entry's, is refused naming the file."""
        if isinstance(info, dict):
            info = store.ShardInfo.from_json(info)
        path = location(root) / store.check_relative(info.file, "shard entry")
        try:
            source = path.open_input_file()
        except FileNotFoundError:
            raise store.CacheIntegrityError(f"{path}: shard listed in the manifest is missing") from None
        with source:
            if source.size() != info.bytes:
                raise store.CacheIntegrityError(
                    f"{path}: {source.size()} bytes, the manifest says {info.bytes} (replaced or truncated shard)"
                )
            table = cls.read_stored(pq.ParquetFile(source), columns, path)
        if columns is None:
            check_schema(table.schema, cls.schema, str(path))
        return table

    @classmethod
    def read_stored(cls, parquet: pq.ParquetFile, columns: list[str] | None, path: Location) -> pa.Table:
        """``columns`` (all when None) of the open shard ``path`` (``ROOT/shards/NAME``), as readers get them."""
        return cls.decode(parquet.read(columns=columns))

    @classmethod
    def decode(cls, table: pa.Table) -> pa.Table:
        """The rows as readers get them from the rows as stored (kinds that store columns compactly
        override it)."""
        return table

    def stored_schema(self) -> pa.Schema:
        """The schema this dataset's shards are stored with."""
        return self.schema

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for k in range(self.num_shards):
            yield self.read_shard(k, columns)

    def verify(self) -> None:
        """Check that every shard of the index is present with its recorded size: one listing of ``shards/``
        (no shard is read). Raises :class:`store.CacheIntegrityError` naming the first shard that is not."""
        listed = {}
        for entry in (self.root / store.SHARD_DIR).list():
            listed[f"{store.SHARD_DIR}/{entry.base_name}"] = int(entry.size) if entry.is_file else -1
        files = self.shard_index["file"].to_pylist()
        sizes = self.shard_index["bytes"].to_pylist()
        for name, size in zip(files, sizes, strict=True):
            if name not in listed:
                raise store.CacheIntegrityError(
                    f"{self.root / name}: shard listed in the manifest is missing"
                )
            if listed[name] != size:
                raise store.CacheIntegrityError(
                    f"{self.root / name}: {listed[name]} bytes, the manifest says {size} (replaced or "
                    "truncated shard)"
                )

    def verify_checksums(self, ray_config=None, shards_per_task: int | None = None) -> None:
        """Read every shard and check its SHA-256 and schema, in parallel Ray tasks (groups of shards; each
        task gets its own entries, not the manifest). Raises :class:`store.CacheIntegrityError` naming the
        shards that do not check out."""
        import ray

        from alm_pipeline.pipeline.ray_utils import RayConfig, cluster_cpus, ensure_ray, worker_options

        ensure_ray(ray_config or RayConfig())
        entries = self.shard_index.select(["index", "file", "rows", "tokens", "bytes", "sha256"]).to_pylist()
        if not entries:
            return
        per_task = shards_per_task or max(1, len(entries) // max(1, int(4 * cluster_cpus())))
        groups = [entries[i : i + per_task] for i in range(0, len(entries), per_task)]
        task = ray.remote(_check_shards).options(num_cpus=1, **worker_options())
        schema = self.stored_schema()
        refs = [task.remote(self.root.uri, group, schema) for group in groups]
        problems = [p for group_problems in ray.get(refs) for p in group_problems]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise store.CacheIntegrityError("; ".join(problems[:5]) + more)

    def summary(self) -> dict:
        """What ``alm-pipeline inspect`` prints."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ writing

    @classmethod
    def a_what(cls) -> str:
        return ("an " if cls.what[0] in "aeiou" else "a ") + cls.what

    @classmethod
    def prepare_output(cls, root: PathLike, identity: dict, overwrite: bool) -> dict | None:
        """Make ``root`` ready for a run with ``identity``: the existing manifest when the same dataset is
        already there (complete or to resume), else None. A dataset of another kind, or of the same kind with
        another identity, is refused with the differences listed, unless ``overwrite`` (then it is removed, on
        any backend). A missing bucket or unreachable storage is refused first, naming the URI."""
        root = check_output_storage(root)
        manifest_file = root / store.MANIFEST
        try:
            existing = store.read_json(manifest_file)
        except FileNotFoundError:
            existing = None
        if existing is None:
            shards = root / store.SHARD_DIR
            if shards.list():
                if not overwrite:
                    raise OutputRefusedError(
                        f"{root}: has shards but no manifest; pass overwrite to replace it"
                    )
                shards.remove_tree()
            return None
        if not isinstance(existing, dict) or existing.get("kind") != cls.kind:
            found = existing.get("kind") if isinstance(existing, dict) else None
            raise OutputRefusedError(f"{root}: exists and is not {cls.a_what()} (kind={found!r})")
        differences = diff_identity(existing.get("identity", {}), identity)
        if not differences:
            store.remove_orphaned_temp_files(root)  # a killed writer's; we hold the output lock
            return existing
        if not overwrite:
            lines = "\n".join(f"  {k}: {cls.short} has {a!r}, this run has {b!r}" for k, a, b in differences)
            raise OutputRefusedError(
                f"{root}: {cls.a_what()} with different settings is already there:\n{lines}\n"
                "Use another --output, or --overwrite to replace it.",
                differences,
            )
        for name in cls.contents:
            path = root / name
            if path.is_dir():
                path.remove_tree()
            else:
                path.remove()
        return None

    @staticmethod
    def pending_shards(root: PathLike, num_shards: int) -> list[int]:
        """The shards of ``root`` still to write: no marker, or a file whose size is not the marker's (one
        listing and one small read per marker; no shard is read)."""
        done = store.scan_shards(root, num_shards)
        return [k for k in range(num_shards) if k not in done]

    @staticmethod
    def finished_shards(root: PathLike, num_shards: int) -> list[store.ShardInfo]:
        """Every shard's info from its marker, checked against the file's size; refuses naming the first shard
        that is missing or incomplete."""
        done = store.scan_shards(root, num_shards)
        for k in range(num_shards):
            if k not in done:
                raise store.CacheIntegrityError(f"{store.shard_path(root, k)}: shard missing or unverified")
        return [done[k] for k in range(num_shards)]

    @classmethod
    def write_shard(
        cls, root: PathLike, index: int, table: pa.Table, stats: dict, row_group_size: int | None = None
    ) -> store.ShardInfo:
        """Write shard ``index`` of a dataset of this kind (rows in :attr:`schema`) and its marker."""
        table = table.select(cls.schema.names).cast(cls.schema)
        tokens = int(pc.sum(pc.list_value_length(table[cls.token_column])).as_py() or 0)
        return store.write_shard(
            root, index, table, tokens=tokens, stats=stats, row_group_size=row_group_size
        )

    @classmethod
    def new_manifest(
        cls, state: str, identity: dict, num_shards: int, shards: list[store.ShardInfo], **fields
    ) -> dict:
        """A manifest of this kind: header, the kind's own ``fields``, the shards, provenance. The shards are
        kept as :class:`store.ShardInfo` under ``"shards"``; :meth:`write_manifest` stores them as the shard
        index."""
        from alm_pipeline import __version__

        return {
            "kind": cls.kind,
            "format_version": cls.format_version,
            "state": state,
            "identity": identity,
            **fields,
            "num_shards": num_shards,
            "shards": list(shards),
            "created_with": f"alm-pipeline {__version__}",
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    @staticmethod
    def write_manifest(root: PathLike, manifest: dict) -> None:
        """Write ``shards.parquet`` from ``manifest["shards"]`` (when there are shards), then ``manifest.json``
        naming it with its size and checksum."""
        manifest = dict(manifest)
        shards = [
            s if isinstance(s, store.ShardInfo) else store.ShardInfo.from_json(s)
            for s in manifest.pop("shards", [])
        ]
        if shards:
            manifest["shard_index"] = store.write_shard_index(root, shards)
        else:
            manifest.pop("shard_index", None)
        store.atomic_write_json(location(root) / store.MANIFEST, manifest)


def _check_shards(root_uri: str, entries: list[dict], schema: pa.Schema) -> list[str]:
    """Ray task: the problems (one line each) of the shards ``entries`` of the dataset at ``root_uri``."""
    root = location(root_uri)

    def check(entry: dict) -> str | None:
        info = store.ShardInfo.from_json(entry)
        try:
            store.verify_shard_file(root, info)
            with (root / info.file).open_input_file() as f:
                check_schema(pq.ParquetFile(f).schema_arrow, schema, str(root / info.file))
        except (store.CacheIntegrityError, ValueError, OSError) as err:
            return str(err)
        return None

    with ThreadPoolExecutor(
        4
    ) as pool:  # hashing releases the GIL; reads from object stores wait on the network
        return [p for p in pool.map(check, entries) if p]
