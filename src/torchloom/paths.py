"""Where torchloom keeps its state, and how other processes find a running ``torchloom up``.

The state dir (``--state-dir``, ``$TORCHLOOM_STATE_DIR``, default
``$XDG_STATE_HOME/torchloom`` or ``~/.local/state/torchloom``) holds the NATS
JetStream storage, a lock file held while ``torchloom up`` runs, and
``endpoint.json`` with the NATS URL (and the dashboard's), which Threadlets and the CLI read when
``$TORCHLOOM_NATS_URL`` is not set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_NATS_URL = "TORCHLOOM_NATS_URL"
ENV_STATE_DIR = "TORCHLOOM_STATE_DIR"
ENDPOINT_FILE = "endpoint.json"
LOCK_FILE = "up.lock"
DEFAULT_UI_PORT = 8787
"""Port of the dashboard, HTTP API and ``/metrics`` of ``torchloom up``."""


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to bind or reach) is this machine's loopback."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def default_state_dir() -> Path:
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "torchloom"


def read_endpoint(state_dir: Path | None = None) -> dict[str, Any] | None:
    """The endpoint written by a running ``torchloom up``, or None."""
    path = (state_dir or default_state_dir()) / ENDPOINT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("nats_url"), str) else None


def write_endpoint(state_dir: Path, **fields: Any) -> None:
    path = state_dir / ENDPOINT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(fields, indent=2))
    tmp.replace(path)


def resolve_nats_url(explicit: str | None = None, state_dir: Path | None = None) -> str | None:
    """The NATS URL to use: explicit, then ``$TORCHLOOM_NATS_URL``, then the state dir's endpoint."""
    if explicit:
        return explicit
    env = os.environ.get(ENV_NATS_URL)
    if env:
        return env
    endpoint = read_endpoint(state_dir)
    return endpoint["nats_url"] if endpoint else None
