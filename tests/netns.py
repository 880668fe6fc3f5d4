"""Several "hosts" on one Linux machine: a network namespace each, joined by veth links to one
bridge, talking only by IP. Each host also gets its own host name (a UTS namespace per process).
Needs root and iproute2; :func:`unavailable` says why not when they are missing, and
:func:`network` skips the test then (fails it in CI)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.conftest import skip_or_fail

SUBNET = "10.231.{tag}"
_NETWORKS = itertools.count()


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why namespaces can't be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "iproute2 (`ip`) and util-linux (`unshare`) are needed: apt-get install -y iproute2"
    probe = f"cvprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    link: str  # the bridge-side end of its veth: down means this host is cut off

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host: its network namespace, and its own host name."""
        script = f'hostname {self.name} && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", script, "sh", *argv]

    def cut(self) -> None:
        _ip("link", "set", self.link, "down")


@dataclass
class Network:
    """A bridge plus one namespace per host; the bridge's own address is the test's observer."""

    # A tag of its own per network, also within one test session (two modules each build one, and
    # the second must not meet what is left of the first: names, addresses, neighbour caches).
    tag: int = field(default_factory=lambda: (os.getpid() + 37 * next(_NETWORKS)) % 200 + 20)
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"cvbr{self.tag}"

    @property
    def observer_ip(self) -> str:
        return f"{SUBNET.format(tag=self.tag)}.254"

    def up(self, names: list[str]) -> Network:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.observer_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(names, start=1):
            self.hosts[name] = self._host(i, name)
        return self

    def _host(self, i: int, name: str) -> Host:
        ns, outside, inside = f"cv{self.tag}-{name}", f"cv{self.tag}h{i}", f"cv{self.tag}n{i}"
        ip = f"{SUBNET.format(tag=self.tag)}.{i}"
        _ip("netns", "add", ns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("addr", "add", f"{ip}/24", "dev", inside, ns=ns)
        _ip("link", "set", inside, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        return Host(name, ns, ip, outside)

    def down(self) -> None:
        """Remove everything. Links are deleted first: a namespace lingers (with its veth) while
        sockets of a cut-off host still wait on the dead link."""
        for host in self.hosts.values():
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@contextmanager
def network(names: list[str]) -> Iterator[Network]:
    """A :class:`Network` of hosts ``names``, removed on the way out, however the test ends.
    Where namespaces can't be made the test is skipped; in CI (``CI`` set) it fails instead."""
    reason = unavailable()
    if reason:
        skip_or_fail(f"multi-host test needs Linux network namespaces: {reason}")
    net = Network()
    try:
        yield net.up(names)
    finally:
        net.down()
