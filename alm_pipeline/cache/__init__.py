"""On-disk formats, readers and writers: one sharded-dataset base with two kinds, the teacher cache and the
aligned set; atomic shards and manifests (:mod:`.store`); Arrow list columns (:mod:`.arrow`)."""

from alm_pipeline.cache.aligned import TRAINER_COLUMNS, AlignedSet, open_aligned_set
from alm_pipeline.cache.dataset import OutputRefusedError, ShardedDataset
from alm_pipeline.cache.store import CacheIntegrityError
from alm_pipeline.cache.teacher import CACHE_SCHEMA, FORMAT_VERSION, TeacherCache, open_cache

__all__ = [
    "CACHE_SCHEMA",
    "FORMAT_VERSION",
    "TRAINER_COLUMNS",
    "AlignedSet",
    "CacheIntegrityError",
    "OutputRefusedError",
    "ShardedDataset",
    "TeacherCache",
    "open_aligned_set",
    "open_cache",
]
