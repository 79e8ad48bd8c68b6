"""On-disk formats: teacher-cache schema, atomic shards, manifests, and the reader."""

from alm_pipeline.cache.reader import TeacherCache, open_cache
from alm_pipeline.cache.schema import CACHE_SCHEMA, FORMAT_VERSION

__all__ = ["CACHE_SCHEMA", "FORMAT_VERSION", "TeacherCache", "open_cache"]
