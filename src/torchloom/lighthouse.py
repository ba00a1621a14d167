"""The embedded torchft lighthouse, from the Rust extension in the torchft wheel.

It computes the quorum of replica groups for torchft's Managers. ``torchloom up``
starts it on loopback when torchft is installed (``pip install -e ".[torchft]"``);
``--lighthouse URL`` points to an existing one instead. It runs as a child
process, so the controller never imports torch.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from torchloom._proc import free_port, preexec, stop_child
from torchloom.errors import TorchloomError


def extension_path() -> str | None:
    """torchft's compiled extension (it holds the lighthouse), found without importing torch."""
    spec = importlib.util.find_spec("torchft")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("_torchft*.so"))
        if found:
            return str(found[0])
    return None


def available() -> bool:
    return extension_path() is not None


class Lighthouse:
    """A child ``torchft_lighthouse``.

    Args:
        log_file: where its output goes.
        heartbeat_timeout_ms: a replica group silent this long leaves the quorum, in ms
            (torchft's default is 5000; 1000 works on loopback).
        join_timeout_ms: how long a quorum waits for heartbeating stragglers, in ms.
        min_replicas: the smallest quorum.
        quorum_tick_ms: how often a pending quorum is re-checked, in ms (torchft's default is
            100; every training step waits for a quorum, so a short tick saves step time).
    """

    def __init__(
        self,
        *,
        log_file: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        heartbeat_timeout_ms: int = 1000,
        join_timeout_ms: int = 10000,
        min_replicas: int = 1,
        quorum_tick_ms: int = 10,
    ) -> None:
        self.log_file = log_file
        self.host = host
        self.port = port
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.join_timeout_ms = join_timeout_ms
        self.min_replicas = min_replicas
        self.quorum_tick_ms = quorum_tick_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, *, timeout_s: float = 10.0) -> str:
        """Start it and wait until it accepts connections; returns its ``http://`` URL.

        Raises:
            TorchloomError: torchft is missing, the lighthouse exits early, or does not listen in ``timeout_s``.
        """
        extension = extension_path()
        if extension is None:
            raise TorchloomError('torchft is not installed: pip install -e ".[torchft]"')
        port = self.port or free_port(self.host)
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("_lighthouse_main.py")),
            "--bind",
            f"{self.host}:{port}",
            "--min_replicas",
            str(self.min_replicas),
            "--heartbeat_timeout_ms",
            str(self.heartbeat_timeout_ms),
            "--join_timeout_ms",
            str(self.join_timeout_ms),
            "--quorum_tick_ms",
            str(self.quorum_tick_ms),
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env={**os.environ, "TORCHLOOM_TORCHFT_EXTENSION": extension},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=preexec(),
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TorchloomError(
                    f"torchft_lighthouse exited with code {self.proc.returncode} (log: {self.log_file})"
                )
            try:
                with socket.create_connection((self.host, port), timeout=0.2):
                    self.port = port
                    self.url = f"http://{self.host}:{port}"
                    return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TorchloomError(
            f"torchft_lighthouse did not listen within {timeout_s:g} s (log: {self.log_file})"
        )

    def stop(self) -> None:
        stop_child(self.proc)
