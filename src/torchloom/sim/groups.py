"""Replica groups of the MNIST job on hosts of their own, for the network tests and bench.

A :class:`Site` puts the control plane on the machine — ``torchloom up`` (NATS, the Weaver)
and a torchft lighthouse, both listening on the bridge address of a
:class:`~torchloom.sim.hosts.Network` — and starts each replica group of the MNIST job under
torchft in a host namespace, advertising the host's address to its peers (torchft's store and
Manager advertise the host's name, which resolves to its address; gloo on its interface). Every byte between the groups, and between a group and
the control plane, then crosses the groups' links, which :meth:`Host.limit` shapes::

    with Network(net=71) as net, Site(net, state_dir=tmp) as site:
        hosts = [net.add_host(f"g{i}") for i in range(2)]
        groups = [site.start_group(h, replica_id=str(i), groups=2, job="net", args=[...])
                  for i, h in enumerate(hosts)]
        hosts[1].limit(rate_mbit=20, both_ways=True)

Needs what :mod:`torchloom.sim.hosts` needs (root, iproute2, tc) and the ``torchft`` extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from torchloom._proc import free_port
from torchloom.errors import TorchloomError
from torchloom.lighthouse import Lighthouse
from torchloom.paths import read_endpoint
from torchloom.sim.hosts import Host, Network


class Site:
    """The control plane on the machine's bridge address, and the replica groups it started.

    Args:
        network: the bridge the hosts are on.
        state_dir: ``torchloom up``'s state directory (and the logs: ``up.log``,
            ``lighthouse.log``, ``group-<id>.log``).
        heartbeat_timeout_ms: the lighthouse's (torchft's default 5 s: a limited link delays
            heartbeats too).

    Raises:
        TorchloomError: ``torchloom up`` did not come up within 60 s.
    """

    def __init__(
        self, network: Network, *, state_dir: Path, heartbeat_timeout_ms: int = 5000
    ) -> None:
        self.network = network
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.lighthouse = Lighthouse(
            log_file=state_dir / "lighthouse.log",
            host=network.gateway,
            heartbeat_timeout_ms=heartbeat_timeout_ms,
        )
        self.lighthouse_url = self.lighthouse.start()
        self._logs: list[IO[bytes]] = []
        self.groups: list[subprocess.Popen[bytes]] = []
        log = self._log("up.log")
        self.up = subprocess.Popen(
            [
                *(str(Path(sys.executable).with_name("torchloom")), "up"),
                *("--state-dir", str(state_dir), "--nats-host", network.gateway),
                *("--no-secure", "--no-ui", "--lighthouse", "none"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60.0
        while True:
            ep = read_endpoint(state_dir)
            if ep and ep.get("pid") == self.up.pid:
                self.nats_url: str = ep["nats_url"]
                break
            if self.up.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise TorchloomError(f"torchloom up did not start; see {state_dir / 'up.log'}")
            time.sleep(0.1)

    def _log(self, name: str) -> IO[bytes]:
        f = open(self.state_dir / name, "ab")  # noqa: SIM115 (closed by close())
        self._logs.append(f)
        return f

    def start_group(
        self,
        host: Host,
        *,
        replica_id: str,
        groups: int,
        job: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start replica group ``replica_id`` of ``groups`` (one rank) of the MNIST job under
        torchft on ``host``; ``args`` go to the training script after ``--ft --job-id``."""
        port = free_port(self.network.gateway)
        environ: dict[str, Any] = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "REPLICA_GROUP_ID": replica_id,
            "NUM_REPLICA_GROUPS": str(groups),
            "TORCHFT_LIGHTHOUSE": self.lighthouse_url,
            "TORCHLOOM_NATS_URL": self.nats_url,
            "TORCHLOOM_STATE_DIR": str(self.state_dir / "none"),
            "GLOO_SOCKET_IFNAME": host.inner,
            **(env or {}),
        }
        # torchrun's store on the host's address: torchft's Manager joins it and tells its
        # peers where it is (MASTER_ADDR), so it must be an address they reach
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node-rank=0"),
            *("--nproc-per-node=1", f"--master-addr={host.address}", f"--master-port={port}"),
            *("-m", "torchloom.examples.mnist.train", "--ft", "--job-id", job),
        ]
        proc = host.popen(
            [*cmd, *args],
            env=environ,
            stdout=self._log(f"group-{job}-{replica_id}.log"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.groups.append(proc)
        return proc

    def close(self) -> None:
        """Stop every group it started, ``torchloom up`` and the lighthouse."""
        for proc in [*self.groups, self.up]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.groups, self.up]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.lighthouse.stop()
        for f in self._logs:
            f.close()

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
