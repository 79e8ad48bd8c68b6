"""Connecting to Ray: a cluster when an address is given, else a local instance started for the run."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from alm_pipeline.configs import check_int, option

# what ray.init accepts as a cluster address
_ADDRESS = re.compile(r"^(auto|local|(ray://)?\[?[A-Za-z0-9_.:-]+\]?:\d+)$")
MIN_OBJECT_STORE = 75 * 1024 * 1024  # Ray refuses a smaller object store


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
        if self.address is not None and not _ADDRESS.match(self.address):
            raise ValueError(f"--address must be auto, HOST:PORT or ray://HOST:PORT, got {self.address!r}")
        check_int("--num-cpus", self.num_cpus, allow_none=True)
        check_int(
            "--object-store-memory", self.object_store_memory, minimum=MIN_OBJECT_STORE, allow_none=True
        )


def ensure_ray(config: RayConfig = RayConfig()) -> None:
    """Initialise Ray once per process; a no-op when it is already up.

    The local instance started when no address is given keeps Ray's token authentication (Ray's default for a new
    local cluster; a token is created in ``~/.ray/auth_token``): its processes listen on every network interface,
    and without a token anyone who can reach them could run code in them. ``RAY_AUTH_MODE=disabled`` opts out
    (tests do, on a machine without other users)."""
    import ray

    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    common = {"log_to_driver": config.log_to_driver, "logging_level": logging.WARNING}
    if storage_env():  # workers on other nodes do not inherit this process's environment
        common["runtime_env"] = {"env_vars": storage_env()}
    # Workers must find this package: it is installed in the environment (pip install -e .), so no
    # runtime_env is needed locally; on a cluster the image or runtime_env provides it.
    if address:
        try:
            ray.init(address=address, **common)
        except ConnectionError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RayConnectionError(
                f"--address {address}: cannot connect to a Ray cluster ({first})"
            ) from None
    else:
        # "local": always a new instance. Without it ray.init joins the cluster recorded in Ray's temp dir
        # (ray_current_cluster), which a head killed without cleanup leaves behind pointing at nothing
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            object_store_memory=config.object_store_memory,
            **common,
        )
    configure_ray_data()


def storage_env() -> dict[str, str]:
    """The storage variables of this process's environment (``AWS_*``: endpoint, credentials, region; Google's credential variables) that Ray
    workers need to reach the same ``s3://`` locations."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith("AWS_") or k in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")
    }


def worker_options() -> dict:
    """Ray remote options that give a task or actor this process's storage variables (needed when Ray was
    started before they were set, e.g. by ``--s3-endpoint`` or a test)."""
    env = storage_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


class RayConnectionError(ValueError):
    """The Ray cluster at the given address cannot be reached (or refuses this client)."""


def configure_ray_data(progress_bars: bool = False) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.print_on_execution_start = False
    # a step's own exception reaches the driver (Ray's UserCodeException wrapper drops it on the way): the
    # stages name the document, file or shard from it and decide whether a retry can help
    ctx.raise_original_map_exception = True
    # Ray Data ends an execution in which no block moved for 30 minutes; scoring one shard (64 MiB of text by
    # default) can take longer than that on a CPU or a slow teacher, with nothing else moving. The stages watch
    # what that guard stands in for themselves: a failed shard is retried, a worker no node can hold any more
    # ends the run after --placement-timeout (see stage.run_shards)
    ctx.execution_no_progress_timeout_s = -1
    if not progress_bars:
        # our own progress bar reports shards; keep Ray Data's per-dataset INFO lines and its notice that
        # its bars are off out of the console (they still go to Ray's log files)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def parse_resources(option_name: str, items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """``("accel=1", "memory_gb=8")`` → ``{"accel": 1.0, "memory_gb": 8.0}``: custom Ray resources a task, actor or
    training worker needs (e.g. a node-type label resource, so that it is placed on worker nodes). ``CPU``/``GPU``
    have their own options. Raises ``ValueError`` naming ``option_name`` and the bad item."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, amount = str(item).partition("=")
        name = name.strip()
        try:
            value = float(amount) if sep else float("nan")
        except ValueError:
            value = float("nan")
        if not name or not (value > 0 and value < float("inf")):
            raise ValueError(f"{option_name} must be NAME=AMOUNT with AMOUNT > 0, got {item!r}")
        if name in ("CPU", "GPU"):
            raise ValueError(f"{option_name} {item!r}: CPUs and GPUs have their own options")
        if name in out:
            raise ValueError(f"{option_name}: resource {name!r} given twice")
        out[name] = value
    return out


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is connected to (0 on a CPU-only cluster)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def describe_resources(need: dict[str, float]) -> str:
    """``{"CPU": 1.0, "accel": 1.0}`` → ``"CPU=1, accel=1"``."""
    return ", ".join(f"{name}={amount:g}" for name, amount in need.items())


def placeable(need: dict[str, float]) -> int:
    """How many actors (or tasks) needing ``need`` the live nodes of the Ray cluster can hold at once, counted
    from each node's total resources (what other work holds now is not subtracted: it ends)."""
    import ray

    count = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        count += int(
            min((have.get(name, 0.0) + 1e-9) // amount for name, amount in need.items() if amount > 0)
        )
    return count


@dataclass(frozen=True)
class PlacementWatch:
    """What :func:`~alm_pipeline.pipeline.stage.run_shards` keeps checking while a stage runs: that at least one
    ``what`` (e.g. "teacher replica") needing ``need`` can be placed on the live nodes. When none can for
    ``timeout`` seconds (its nodes were lost and none joined), the run stops naming the missing resources."""

    what: str
    need: dict
    timeout: float
    period: float = 1.0

    def message(self, waited: float) -> str:
        return (
            f"no node of the Ray cluster can hold a {self.what} (needs {describe_resources(self.need)}) and none "
            f"joined within {waited:.0f} s (--placement-timeout {self.timeout:g}); the shards written so far are "
            "kept and a re-run resumes"
        )
