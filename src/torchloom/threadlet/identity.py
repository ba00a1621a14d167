"""Who this training process is: job, replica group, rank, host, pid, device.

Read once at :func:`torchloom.init`, never on the hot path. Explicit arguments
win over environment variables; torchrun sets ``RANK``/``WORLD_SIZE`` (the rank
inside this replica group) and torchft's launchers set ``REPLICA_GROUP_ID``.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Identity:
    job_id: str
    replica_id: str
    rank: int
    group_world_size: int
    host: str
    pid: int
    device: str
    resuming: bool = False


def default_job_id(argv0: str | None = None) -> str:
    """The job id when a script gives none: ``$TORCHLOOM_JOB`` when set, else the script's name.

    The script's name is the file name of ``sys.argv[0]`` without its suffix (``train_lm.py``
    → ``train_lm``; a package run with ``python -m pkg`` → ``__main__``'s package ``pkg``),
    with characters outside ``[A-Za-z0-9_-]`` turned into ``-`` and cut to 64; ``python``
    when there is no script (an interactive session, ``python -c``). So one script runs as
    different jobs with ``TORCHLOOM_JOB=a python train.py`` and no edit.
    """
    env = os.environ.get("TORCHLOOM_JOB")
    if env:
        return env
    arg = sys.argv[0] if argv0 is None and sys.argv else (argv0 or "")
    path = Path(arg)
    name = path.parent.name if path.name == "__main__.py" else path.stem
    if arg in ("", "-c", "-m") or not name:
        name = "python"
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64]


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(
                    f"environment variable {name}={value!r} is not an integer"
                ) from None
    return default


def resolve_identity(
    *,
    job_id: str,
    replica_id: str | None,
    rank: int | None,
    group_world_size: int | None,
    device: str | None,
) -> Identity:
    """Fill in what was not given from torchrun/torchft environment variables.

    Replica id: argument, ``TORCHLOOM_REPLICA_ID``, ``REPLICA_GROUP_ID``, else ``"0"``.
    Rank: argument, ``RANK``, else 0. Group world size: argument, ``WORLD_SIZE``, else 1.
    Host: ``TORCHLOOM_HOST`` (the Kubernetes manifests set it to the node's name), Slurm's
    ``SLURMD_NODENAME``, else the host name — the name a drain takes out of service.
    """
    host = (
        os.environ.get("TORCHLOOM_HOST")
        or os.environ.get("SLURMD_NODENAME")
        or socket.gethostname()
    )
    rid = (
        replica_id
        or os.environ.get("TORCHLOOM_REPLICA_ID")
        or os.environ.get("REPLICA_GROUP_ID")
        or "0"
    )
    r = rank if rank is not None else _env_int("RANK", default=0)
    ws = group_world_size if group_world_size is not None else _env_int("WORLD_SIZE", default=1)
    resuming = _env_int("TORCHELASTIC_RESTART_COUNT", default=0) > 0 or bool(
        os.environ.get("TORCHLOOM_RESTARTED")
    )
    return Identity(
        resuming=resuming,
        job_id=job_id,
        replica_id=str(rid),
        rank=r,
        group_world_size=ws,
        host=host,
        pid=os.getpid(),
        device=device or detect_device(host),
    )


def detect_device(host: str) -> str:
    """The accelerator this process uses: ``cuda:<NVML UUID>`` when torch has CUDA, else ``cpu:<host>``.

    Uses torch only if the training script already imported it (no import cost
    here), and the device torchrun assigns (``LOCAL_RANK``).
    """
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            index = _env_int("LOCAL_RANK", default=0) % torch.cuda.device_count()
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return f"GPU-{uuid}" if not uuid.startswith("GPU-") else uuid
    except Exception:  # a broken CUDA setup must not stop training
        pass
    return f"cpu:{host}"
