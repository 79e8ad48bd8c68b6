"""Multi-node tests: one simulated cluster (a head and two worker nodes, see :mod:`tests.multinode.simcluster`)
for the whole folder. Marked ``multinode``; left out of the default run (pyproject addopts), run them with ``pytest -m multinode``.

The rest of the suite shares one local Ray (``ray_local``); the cluster replaces it while these tests run, and
the local instance is started again afterwards for the tests that follow."""

from __future__ import annotations

import pytest

from tests.multinode.simcluster import SimCluster


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/multinode/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.multinode)
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def sim_cluster():
    import ray

    from tests.conftest import local_ray_config

    was_local = ray.is_initialized()
    ray.shutdown()
    cluster = SimCluster(workers=2)
    ray.init(address=cluster.address)
    from alm_pipeline.pipeline.ray_utils import configure_ray_data

    configure_ray_data()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if was_local:  # the session's local Ray (ray_local) for the tests after this folder
        from alm_pipeline.pipeline.ray_utils import ensure_ray

        ensure_ray(local_ray_config())


@pytest.fixture
def cluster(sim_cluster, monkeypatch):
    """The simulated cluster with two live worker nodes (a test before may have removed one), named by
    ``RAY_ADDRESS`` as on a real cluster (the stages then wait for nodes to join rather than refuse)."""
    sim_cluster.ensure_workers(2)
    monkeypatch.setenv("RAY_ADDRESS", sim_cluster.address)
    return sim_cluster
