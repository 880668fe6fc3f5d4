"""The multi-host test again, with no folder shared between the hosts: DATA and OUT live on an
S3 server (moto's, on the bridge), each host has its own cache, state and temporary folders, and
a worker needs only the broker URL and the standard AWS variables."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import h5py
import pytest
import redis

from convoy.shared.jobstore import JobStore
from tests import netns
from tests.conftest import ROOT
from tests.imagegen import make_flat
from tests.s3server import start_s3
from tests.test_multihost import ENV, HOSTS, IMAGES, JOB_ARGS, Cluster, _wait_for_running_on

pytestmark = pytest.mark.slow


class StoreCluster(Cluster):
    """The hosts of test_multihost, each with folders of its own and the store's variables."""

    def __init__(self, net: netns.Network, log_dir, s3env: dict) -> None:
        super().__init__(net, log_dir)
        self.s3env = s3env

    def host_env(self, host: str) -> dict:
        own = self.log_dir / f"host-{host}"
        for sub in ("cache", "state", "tmp"):
            (own / sub).mkdir(parents=True, exist_ok=True)
        return {**os.environ, **ENV, **self.s3env, "CONVOY_BROKER_URL": self.url, "XDG_CACHE_HOME": str(own / "cache"),
                "CONVOY_STATE_DIR": str(own / "state"), "TMPDIR": str(own / "tmp")}

    def start(self, host: str, argv: list[str], log: str) -> subprocess.Popen:
        out = open(self.log_dir / log, "ab")
        proc = subprocess.Popen(self.net.hosts[host].exec_argv(argv), env=self.host_env(host), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[host] = proc
        return proc

    def submit(self, data: str, out: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "convoy.orchestrator", "run", data, "--out", out, *JOB_ARGS]
        return subprocess.Popen(self.net.hosts["orchestrator"].exec_argv(argv), env=self.host_env("orchestrator"),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def store_hosts(tmp_path_factory):
    with netns.network(HOSTS) as net:
        log_dir = tmp_path_factory.mktemp("multihost-store-logs")
        s3 = start_s3(log_dir, host=net.observer_ip)  # on the bridge: every host reaches it by IP
        try:
            with StoreCluster(net, log_dir, s3.env).running() as cluster:
                yield cluster, s3
        finally:
            s3.stop()


def _shard_hosts(s3, prefix: str) -> dict[str, str]:
    client, hosts = s3.client(), {}
    for key in s3.keys(prefix):
        if "/features/all/shard-" in key:
            body = client.get_object(Bucket="multi", Key=key)["Body"].read()
            with h5py.File(io.BytesIO(body), "r") as f:
                hosts[key.rsplit("/", 1)[1]] = str(f.attrs["host"])
    return hosts


def _merged_paths(s3, out: str) -> list[str]:
    key = out[len("s3://multi/"):] + "/features/all.h5"
    body = s3.client().get_object(Bucket="multi", Key=key)["Body"].read()
    with h5py.File(io.BytesIO(body), "r") as f:
        return f["paths"].asstr()[()].tolist()


def test_job_spreads_over_two_hosts_sharing_no_folder_and_survives_losing_one(store_hosts, tmp_path):
    hosts, s3 = store_hosts
    s3.bucket("multi")
    s3.upload_tree(make_flat(tmp_path / "data", IMAGES), "s3://multi/data")
    store = JobStore(redis.Redis.from_url(hosts.url, decode_responses=True))
    hosts.start_worker(1)
    hosts.start_worker(2)
    two = hosts.run("s3://multi/data", "s3://multi/two")
    assert two["features"]["all"] == "s3://multi/two/features/all.h5"
    assert set(_shard_hosts(s3, "s3://multi/two").values()) == {"w1@worker1", "w2@worker2"}
    assert len(_merged_paths(s3, "s3://multi/two")) == IMAGES

    old_jobs = set(store.job_ids())
    proc = hosts.submit("s3://multi/data", "s3://multi/cut")
    _wait_for_running_on(store, "w2@", old_jobs)
    t_cut = time.monotonic()
    hosts.cut("worker2")
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:] + hosts.logs()
    cut = json.loads(stdout.strip().splitlines()[-1])
    assert _merged_paths(s3, cut["out"]) == _merged_paths(s3, "s3://multi/two")
    assert not [k for k in s3.keys("s3://multi/cut") if ".tmp" in k]
    print(f"\nmulti-host over the store: two hosts {two['seconds']} s; cut to done "
          f"{time.monotonic() - t_cut:.1f} s")
