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
