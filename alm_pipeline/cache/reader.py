"""Old import path of the teacher-cache reader, now :mod:`alm_pipeline.cache.teacher`.

Kept only until trainer/evaluate.py, quickstart.py, cli/main.py and their tests import ``open_cache`` from
``alm_pipeline.cache``; then delete this module.
"""

from alm_pipeline.cache.teacher import TeacherCache, open_cache

__all__ = ["TeacherCache", "open_cache"]
