"""Hosts on one machine: Linux network namespaces joined by veth pairs to one bridge.

Each :class:`Host` is a network namespace with its own address (``10.<net>.0.<n>/24``) and
its own link — the veth pair between it and the bridge — which can be cut (``ip link set …
down``: nothing crosses, no connection is closed, exactly like a pulled cable) or limited in
bandwidth (``tc`` with a token-bucket filter; this kernel has no ``netem``, so no added delay or
loss). The machine itself (the root namespace) sits on the bridge as ``10.<net>.0.1``, so a
test process reaches every host, and processes started with :meth:`Host.popen` run "on" the
host. Used by the partition tests and benches (tests/integration/test_partitions.py).

Needs root (or ``CAP_NET_ADMIN``) and ``ip`` from iproute2; :func:`available` says whether
this machine allows it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchloom.errors import TorchloomError


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TorchloomError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """None when network namespaces can be made here, else why not (for a test's skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root (or CAP_NET_ADMIN)"
    probe = f"loomprobe{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "`ip` (iproute2) is not installed"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


NETNS_ETC = Path("/etc/netns")
"""``ip netns exec NS`` bind-mounts the files in ``/etc/netns/NS/`` over those of ``/etc``."""


def _name_service(hosts: list[Host], gateway: str) -> None:
    """Name lookups on the hosts answer at once: every host's name is its address (the
    machine's is the bridge's), and DNS asks a port nobody listens on (the machine's resolver
    is not reachable from a namespace; c10d's reverse lookup of every connection otherwise
    waits out its timeouts)."""
    names = "".join(f"{h.address} {h.ns}\n" for h in hosts)
    for h in hosts:
        etc = NETNS_ETC / h.ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        (etc / "hosts").write_text(
            f"127.0.0.1 localhost\n::1 localhost ip6-localhost\n{gateway} {socket.gethostname()}\n"
            + names
        )


class Host:
    """One namespace on the bridge. Made by :meth:`Network.add_host`.

    Attributes:
        name: the host's name (``n1``, ``rank-a``, …).
        ns: its network namespace.
        address: its IPv4 address on the bridge.
        link: the bridge-side end of its veth pair (what :meth:`cut` takes down).
        inner: the host-side end, the host's network interface (e.g. for ``GLOO_SOCKET_IFNAME``).
    """

    def __init__(self, name: str, ns: str, address: str, link: str, inner: str = "") -> None:
        self.name = name
        self.ns = ns
        self.address = address
        self.link = link
        self.inner = inner

    @property
    def wrap(self) -> list[str]:
        """The command prefix that runs a program on this host: in its network namespace, and
        in a UTS namespace of its own where the host name is :attr:`ns` (torchft and c10d
        advertise ``socket.gethostname()`` to their peers; every host's name resolves to its
        address on every host)."""
        return [
            *("ip", "netns", "exec", self.ns, "unshare", "--uts"),
            *("sh", "-c", 'hostname "$0" && exec "$@"', self.ns),
        ]

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` on this host (``subprocess.Popen``'s keyword arguments pass on)."""
        return subprocess.Popen([*self.wrap, *cmd], **kwargs)

    def cut(self) -> None:
        """Take the host's link down: nothing reaches it or leaves it; connections stay open
        on both ends (no FIN, no RST) until their own timeouts notice."""
        _ip("link", "set", self.link, "down")

    def heal(self) -> None:
        """Bring the link back up."""
        _ip("link", "set", self.link, "up")

    def limit(self, *, rate_mbit: float | None, both_ways: bool = False) -> None:
        """Limit what the bridge sends to this host to ``rate_mbit`` Mbit/s (a token-bucket
        filter on its link) and, with ``both_ways``, what the host sends too (the same filter
        on its own end of the link); None removes the limits."""
        ends = [[], [*self.wrap]] if both_ways or rate_mbit is None else [[]]
        for prefix, dev in zip(ends, (self.link, self.inner), strict=False):
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if rate_mbit is not None:
                subprocess.run(
                    [*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", f"{rate_mbit}mbit", "burst", "32kbit", "latency", "50ms"],
                    check=True, capture_output=True,
                )  # fmt: skip


class Network:
    """A bridge and the hosts on it; :meth:`close` removes them all (also on ``with`` exit).

    Args:
        net: the second octet of the subnet (``10.<net>.0.0/24``); pick one per test run.
        tag: a short prefix of the bridge's, namespaces' and links' names (≤ 4 characters:
            Linux limits interface names to 15).

    Raises:
        TorchloomError: the bridge could not be made (see :func:`available`).
    """

    def __init__(self, *, net: int = 77, tag: str = "lm") -> None:
        self.net = net
        self.tag = f"{tag}{net}"
        self.bridge = f"{self.tag}br"
        self.hosts: dict[str, Host] = {}
        _ip("link", "del", self.bridge, check=False)  # a leftover of a killed run
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        """This machine's address on the bridge (the root namespace's)."""
        return f"10.{self.net}.0.1"

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge, with the next free address."""
        n = len(self.hosts) + 2
        ns, link, inner = f"{self.tag}-{name}", f"{self.tag}h{n}", f"{self.tag}n{n}"
        _ip("netns", "del", ns, check=False)
        _ip("netns", "add", ns)
        _ip("link", "add", link, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", link, "master", self.bridge)
        _ip("link", "set", link, "up")
        address = f"10.{self.net}.0.{n}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", self.gateway)
        host = self.hosts[name] = Host(name, ns, address, link, inner)
        _name_service(list(self.hosts.values()), self.gateway)
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            _ip("link", "del", host.link, check=False)
            _ip("netns", "del", host.ns, check=False)
            shutil.rmtree(NETNS_ETC / host.ns, ignore_errors=True)
        self.hosts.clear()
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(TorchloomError):
            self.close()
