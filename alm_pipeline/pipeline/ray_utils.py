"""Connecting to Ray: a cluster when an address is given, else a local instance started for the run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from alm_pipeline.configs import check_int, option


@dataclass(frozen=True)
class RayConfig:
    address: str | None = option(
        None,
        "Ray cluster address, e.g. auto or ray://host:10001 (default: $RAY_ADDRESS, else a local Ray "
        "started for the run)",
    )
    num_cpus: int | None = option(None, "CPUs of the local Ray instance (default: all cores)")
    object_store_memory: int | None = option(
        None, "Object store bytes of the local Ray instance (default: Ray's)"
    )
    log_to_driver: bool = option(False, "Show Ray worker logs", cli="verbose")

    def __post_init__(self) -> None:
        check_int("--num-cpus", self.num_cpus, allow_none=True)
        check_int("--object-store-memory", self.object_store_memory, allow_none=True)  # Ray's floor


def ensure_ray(config: RayConfig = RayConfig()) -> None:
    """Initialise Ray once per process; a no-op when it is already up."""
    import ray

    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    common = {"log_to_driver": config.log_to_driver, "logging_level": logging.WARNING}
    # Workers must find this package: it is installed in the environment (pip install -e .), so no
    # runtime_env is needed locally; on a cluster the image or runtime_env provides it.
    if address:
        ray.init(address=address, **common)
    else:
        # A private local instance started for this run: token auth protects shared clusters, not this.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=config.num_cpus, object_store_memory=config.object_store_memory, **common)
    configure_ray_data()


def configure_ray_data(progress_bars: bool = False) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.print_on_execution_start = False
    if not progress_bars:
        # our own progress bar reports shards; keep Ray Data's per-dataset INFO lines and its notice that
        # its bars are off out of the console (they still go to Ray's log files)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
