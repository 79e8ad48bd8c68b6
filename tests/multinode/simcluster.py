"""A multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``) for node-loss tests.

A head node (the driver's; it runs the light Ray Data tasks and the metrics queue) and worker nodes with one CPU
each and a custom resource ``accel`` standing in for a GPU, so that scoring actors and training workers (which ask
for ``accel``) are placed on worker nodes only. :meth:`SimCluster.run_losing_a_node` runs a stage in a thread and removes a
worker node once a condition holds (e.g. the first shard is written), as a preempted machine would vanish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ACCEL = "accel"  # the custom resource standing in for a GPU
SYSTEM_CONFIG = {
    # a lost node is declared dead within ~2 s
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    # results above 1 KiB go through the producing node's object store, as real shards (megabytes) do; Ray's
    # default (100 KiB) would return the tests' small shards inline to the driver, where a lost node cannot
    # take them along
    "max_direct_call_object_size": 1024,
}


@dataclass
class NodeLoss:
    """What :meth:`SimCluster.run_losing_a_node` saw: when the node went (``time.monotonic()``), the run's progress
    right after, and when the run ended."""

    removed_at: float | None = None
    progress: int | None = None
    ended_at: float | None = None

    @property
    def recovery_seconds(self) -> float:
        """From the node loss to the end of the run."""
        assert self.removed_at is not None and self.ended_at is not None
        return self.ended_at - self.removed_at


class SimCluster:
    def __init__(self, workers: int = 2, head_cpus: int = 1):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": head_cpus, "_system_config": SYSTEM_CONFIG}
        )
        self.workers = [self.add_worker() for _ in range(workers)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=1, resources={ACCEL: 1})
        return node

    def ensure_workers(self, n: int = 2) -> None:
        """Bring the cluster back to ``n`` live worker nodes (after a test removed one)."""
        while len(self.workers) < n:
            self.workers.append(self.add_worker())
        self.cluster.wait_for_nodes()

    def remove_worker(self, index: int = 0) -> None:
        node = self.workers.pop(index)
        self.cluster.remove_node(node, allow_graceful=False)

    def worker_index(self, node_id: str) -> int:
        """The index in :attr:`workers` of the worker node with this Ray node id."""
        ids = [node.node_id for node in self.workers]
        assert node_id in ids, f"{node_id} is not a live worker node ({ids})"
        return ids.index(node_id)

    def run_losing_a_node(
        self,
        run: Callable[[], Any],
        condition: Callable[[], bool],
        *,
        progress: Callable[[], int] | None = None,
        replace_after: float | None = None,
        nodes: int = 1,
        which: Callable[[], str] | None = None,
        after_loss: Callable[[], None] | None = None,
        timeout: float = 600,
    ) -> tuple[Any, NodeLoss]:
        """Call ``run()`` in a thread; once ``condition()`` holds, remove ``nodes`` worker nodes without a graceful
        shutdown (preempted machines): the first ones, or the one whose Ray node id ``which()`` returns; with
        ``replace_after``, add a fresh worker node that many seconds later (an autoscaler replacing it); then
        call ``after_loss()``. Node changes happen in this thread: Ray's ``Cluster`` sets signal handlers,
        which only the main thread may. Returns ``run()``'s result (or raises its exception) and the loss."""
        loss = NodeLoss()
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = run()
            except BaseException as err:  # noqa: BLE001 - re-raised below
                outcome["error"] = err
            loss.ended_at = time.monotonic()

        thread = threading.Thread(target=target, name="run-losing-a-node", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not condition() and thread.is_alive():
            assert time.monotonic() < deadline, "the node-loss condition never held"
            time.sleep(0.05)
        if thread.is_alive():
            for _ in range(nodes):
                self.remove_worker(self.worker_index(which()) if which is not None else 0)
            loss.removed_at = time.monotonic()
            loss.progress = progress() if progress is not None else None
            if replace_after is not None:
                time.sleep(replace_after)
                self.workers.append(self.add_worker())
            if after_loss is not None:
                after_loss()
        thread.join(max(1.0, deadline - time.monotonic()))
        assert not thread.is_alive(), f"the run did not finish within {timeout:g} s"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"], loss

    def shutdown(self) -> None:
        self.cluster.shutdown()
