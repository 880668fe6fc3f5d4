"""A real S3-compatible server for the storage tests: moto's standalone server (the one s3fs's own
test suite uses), started on a free port, reached over HTTP exactly like S3.

Credentials and endpoint reach Convoy only through the standard variables (``AWS_*``), as they
would on a cloud machine: :attr:`S3Server.env` is what a worker on another host would be given.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail, wait_until

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "convoy-test", "AWS_SECRET_ACCESS_KEY": "convoy-test-secret",
             "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return {**FAKE_KEYS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self, **keys):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=keys.get("key", FAKE_KEYS["AWS_ACCESS_KEY_ID"]),
                            aws_secret_access_key=keys.get("secret", FAKE_KEYS["AWS_SECRET_ACCESS_KEY"]))

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_tree(self, folder: Path, url: str) -> str:
        """Every file under ``folder`` to the prefix ``url`` (s3://bucket/prefix)."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = "/".join(filter(None, (prefix, path.relative_to(folder).as_posix())))
                client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return url

    def keys(self, url: str) -> list[str]:
        bucket, _, prefix = url[len("s3://"):].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_s3(log_dir: Path, host: str = "127.0.0.1", extra_env: dict | None = None) -> S3Server:
    """moto's server on a free port (on ``host``), or skip here / fail in CI when moto is absent."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        skip_or_fail("moto[server] is not installed: pip install -e '.[test]'")
    port = free_port()
    log = log_dir / f"moto-{port}.log"
    env = {**os.environ, **FAKE_KEYS, **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(proc, f"http://{host}:{port}", log)

    def up() -> bool:
        if proc.poll() is not None:
            skip_or_fail(f"moto's server exited at start: {log.read_text()[-500:]}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    try:
        wait_until(up, 30, "moto's S3 server to listen")
    except TimeoutError:
        server.stop()
        skip_or_fail(f"moto's server did not start: {log.read_text()[-500:]}")
    return server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One S3 server for a test module; tests make buckets of their own names."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
