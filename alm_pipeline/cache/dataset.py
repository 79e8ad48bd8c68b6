"""One sharded dataset on disk: the base of the teacher cache and the aligned set.

A dataset is a directory with ``manifest.json`` and ``shards/shard-K.parquet`` (see :mod:`.store` for the
atomic shard files and their ``.done.json`` markers). Its manifest names the dataset's ``kind`` and format
version, its ``identity`` (everything that determines its content: a later run with another identity must
not mix its shards in), its state (``in_progress`` until every shard is written) and the list of shards with
their sizes and checksums.

:class:`ShardedDataset` holds what both kinds share: opening (with refusals that name the folder), reading and
verifying shards, and the writer's side: refusing an output folder made with another identity (listing the
differences), finding the shards still to write, and assembling the manifest. A kind is a subclass that
sets the class attributes and adds its own summary and accessors.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alm_pipeline.cache import store


class OutputRefusedError(ValueError):
    """An output folder holds a dataset that a run must not resume or mix with (``differences`` lists why)."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]] | None = None):
        super().__init__(message)
        self.differences = differences or []


def check_schema(schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise a clear error if ``schema`` lacks a column of ``expected`` or has it with another type."""
    problems = []
    for field in expected:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing column {field.name!r}")
        elif not schema.field(idx).type.equals(field.type):
            problems.append(f"column {field.name!r} is {schema.field(idx).type}, expected {field.type}")
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


@dataclass
class ShardedDataset:
    """A dataset directory opened for reading; subclasses are the kinds (teacher cache, aligned set)."""

    kind: ClassVar[str]  # manifest "kind"
    format_version: ClassVar[int]
    what: ClassVar[str]  # the kind for people: "teacher cache"
    short: ClassVar[str]  # one word for it in refusals: "cache"
    rerun: ClassVar[str]  # the command that makes or finishes one
    schema: ClassVar[pa.Schema]  # row schema of the shards
    token_column: ClassVar[str]  # the list column whose entries are counted as the shard's tokens
    contents: ClassVar[tuple[str, ...]] = (store.SHARD_DIR, store.MANIFEST)  # what overwrite removes

    root: Path
    manifest: dict

    # ------------------------------------------------------------------------------------ reading

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, require_complete: bool = True):
        """Open a dataset directory, refusing (with a clear message) anything that does not check out."""
        root = Path(path).absolute()
        manifest = store.read_manifest(
            root, cls.kind, cls.format_version, cls.what, cls.rerun, require_complete
        )
        dataset = cls(root=root, manifest=manifest)
        if verify:
            dataset.verify()
        return dataset

    @property
    def shards(self) -> list[store.ShardInfo]:
        try:
            return [store.ShardInfo.from_json(s) for s in self.manifest["shards"]]
        except store.CacheIntegrityError as err:
            raise store.CacheIntegrityError(f"{self.root / store.MANIFEST}: {err}") from None

    def shard_files(self) -> list[Path]:
        return [self.root / s.file for s in self.shards]

    def read_shard(self, index: int, columns: list[str] | None = None) -> pa.Table:
        path = self.root / self.shards[index].file
        table = pq.read_table(path, columns=columns)
        if columns is None:
            check_schema(table.schema, self.schema, str(path))
        return table

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for k in range(len(self.shards)):
            yield self.read_shard(k, columns)

    def verify(self) -> None:
        """Check every shard's size and SHA-256 against the manifest, and its schema."""
        for info in self.shards:
            store.verify_shard_file(self.root, info)
            check_schema(pq.read_schema(self.root / info.file), self.schema, str(self.root / info.file))

    def summary(self) -> dict:
        """What ``alm-pipeline inspect`` prints."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ writing

    @classmethod
    def a_what(cls) -> str:
        return ("an " if cls.what[0] in "aeiou" else "a ") + cls.what

    @classmethod
    def prepare_output(cls, root: Path, identity: dict, overwrite: bool) -> dict | None:
        """Make ``root`` ready for a run with ``identity``: the existing manifest when the same dataset is
        already there (complete or to resume), else None. A dataset of another kind, or of the same kind with
        another identity, is refused with the differences listed, unless ``overwrite`` (then it is removed)."""
        manifest_file = root / store.MANIFEST
        if not manifest_file.exists():
            shards = root / store.SHARD_DIR
            if shards.exists() and any(shards.iterdir()):
                if not overwrite:
                    raise OutputRefusedError(
                        f"{root}: has shards but no manifest; pass overwrite to replace it"
                    )
                shutil.rmtree(shards)
            return None
        existing = store.read_json(manifest_file)
        if existing.get("kind") != cls.kind:
            raise OutputRefusedError(
                f"{root}: exists and is not {cls.a_what()} (kind={existing.get('kind')!r})"
            )
        differences = diff_identity(existing.get("identity", {}), identity)
        if not differences:
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
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return None

    @staticmethod
    def pending_shards(root: Path, num_shards: int) -> list[int]:
        """The shards of ``root`` without a verified marker (still to write)."""
        return [k for k in range(num_shards) if store.verified_shard(root, k) is None]

    @staticmethod
    def finished_shards(root: Path, num_shards: int) -> list[store.ShardInfo]:
        """Every shard's info; refuses if one is missing or does not verify."""
        infos = []
        for k in range(num_shards):
            info = store.verified_shard(root, k)
            if info is None:
                raise store.CacheIntegrityError(f"{store.shard_path(root, k)}: shard missing or unverified")
            infos.append(info)
        return infos

    @classmethod
    def write_shard(
        cls, root: Path, index: int, table: pa.Table, stats: dict, row_group_size: int | None = None
    ) -> store.ShardInfo:
        """Write shard ``index`` of a dataset of this kind (rows in :attr:`schema`) and its marker
        (``row_group_size``: rows per Parquet row group, default pyarrow's)."""
        table = table.select(cls.schema.names).cast(cls.schema)
        tokens = int(pc.sum(pc.list_value_length(table[cls.token_column])).as_py() or 0)
        return store.write_shard(
            root, index, table, tokens=tokens, stats=stats, row_group_size=row_group_size
        )

    @classmethod
    def new_manifest(
        cls, state: str, identity: dict, num_shards: int, shards: list[store.ShardInfo], **fields
    ) -> dict:
        """A manifest of this kind: header, the kind's own ``fields``, the shard list, provenance."""
        from alm_pipeline import __version__

        return {
            "kind": cls.kind,
            "format_version": cls.format_version,
            "state": state,
            "identity": identity,
            **fields,
            "num_shards": num_shards,
            "shards": [s.to_json() for s in shards],
            "created_with": f"alm-pipeline {__version__}",
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    @staticmethod
    def write_manifest(root: Path, manifest: dict) -> None:
        store.atomic_write_json(root / store.MANIFEST, manifest)
