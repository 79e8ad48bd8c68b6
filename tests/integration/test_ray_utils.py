"""The embedded local Ray (alm_pipeline.pipeline.ray_utils.ensure_ray) keeps Ray's token authentication: its
processes listen on every network interface, so a client without the token must be refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

_START = """
import sys
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray

ensure_ray(RayConfig(num_cpus=1))
print(get_authentication_mode() == AuthenticationMode.TOKEN, flush=True)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test is done
"""

_CONNECT = "import ray, sys; ray.init(address=sys.argv[1]); print('connected', flush=True)"


def test_the_embedded_ray_refuses_a_client_without_its_token(tmp_path):
    """Started with RAY_AUTH_MODE unset (a user's plain shell): token authentication is on, a client that has the
    token connects and one without it is refused. Before: the code turned authentication off."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    home = tmp_path / "home"
    home.mkdir()
    head = subprocess.Popen(
        [sys.executable, "-c", _START],
        env={**base, "HOME": str(home)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        token_mode, gcs = head.stdout.readline().strip(), head.stdout.readline().strip()
        assert token_mode == "True" and (home / ".ray" / "auth_token").is_file(), (token_mode, gcs)
        with_token = subprocess.run(
            [sys.executable, "-c", _CONNECT, gcs],
            env={**base, "HOME": str(home), "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert with_token.returncode == 0 and "connected" in with_token.stdout, with_token.stderr[-2000:]
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        without = subprocess.run(
            [sys.executable, "-c", _CONNECT, gcs],
            env={**base, "HOME": str(stranger), "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert without.returncode != 0 and "connected" not in without.stdout
        assert "token-auth" in without.stderr, without.stderr[-2000:]
    finally:
        head.stdin.close()
        head.wait(timeout=120)


_LOCAL = """
import ray
from alm_pipeline.pipeline.ray_utils import RayConfig, ensure_ray

ensure_ray(RayConfig(num_cpus=1))
print(ray.get_runtime_context().gcs_address, flush=True)
"""


def test_a_local_run_starts_its_own_ray_even_when_a_dead_cluster_is_recorded():
    """A head node killed without cleanup leaves its address in Ray's temp dir (``ray_current_cluster``); plain
    ``ray.init()`` then tries to join it and fails ("Failed to connect to Ray cluster at ..."). A run without
    --address/RAY_ADDRESS must start its own instance instead. Before: every later local run on the machine failed."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(temp, "ray"))
        dead = "192.0.2.2:1"  # TEST-NET-1: nothing answers there
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write(dead)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run(
            [sys.executable, "-c", _LOCAL],
            env={**env, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() and dead not in done.stdout, done.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)
