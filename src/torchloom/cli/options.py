"""Options, consoles and helpers shared by the ``torchloom`` commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from torchloom.client import WeaverClient
from torchloom.errors import InvalidRequestError
from torchloom.paths import ENV_NATS_URL, ENV_STATE_DIR

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

NatsUrl = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        envvar=ENV_NATS_URL,
        help="NATS server/cluster; default: the one `torchloom up` started",
    ),
]
StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar=ENV_STATE_DIR,
        help="state dir of `torchloom up` [default: ~/.local/state/torchloom]",
    ),
]
JobOpt = Annotated[
    str | None,
    typer.Option(
        "--job", "-j", envvar="TORCHLOOM_JOB", help="job id; default: the only job with live ranks"
    ),
]
ReplicaOpt = Annotated[str | None, typer.Option("--replica", "-r", help="only this replica group")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="recorded in the history")]
DEFAULT_TIMEOUT_S = 10.0
"""How long a command waits for the Weaver by default, in seconds: beyond the ~5-9 s a JetStream
cluster takes to elect new stream leaders after losing a server (the Weaver tries its write
again meanwhile, and the command its request)."""
TimeoutOpt = Annotated[
    float, typer.Option("--timeout-s", help="how long to wait for the Weaver, in seconds")
]


def setup_logging(verbose: bool) -> None:
    """Log torchloom's INFO lines with ``--verbose``, else warnings only, to stderr."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def weaver_client(
    nats_url: str | None, state_dir: Path | None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> WeaverClient:
    return WeaverClient(nats_url=nats_url, state_dir=state_dir, timeout_s=timeout_s)


def pick_job(client: WeaverClient, job: str | None) -> str:
    if job:
        return job
    jobs = client.status(limit=0).get("jobs", [])
    live = [j["job_id"] for j in jobs if set(j["summary"]["states"]) - {"exited", "failed"}]
    candidates = live or [j["job_id"] for j in jobs]
    if len(candidates) == 1:
        return str(candidates[0])
    if not candidates:
        raise InvalidRequestError("no job is known to the Weaver yet; pass --job")
    raise InvalidRequestError(f"several jobs ({', '.join(candidates)}): pass --job")


def parse_assignments(pairs: list[str], *, what: str) -> dict[str, str]:
    """``["lr=0.1", …]`` → ``{"lr": "0.1", …}``.

    Raises:
        InvalidRequestError: an item is not ``NAME=VALUE`` (``what`` names it: KNOB, PARAM).
    """
    values: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InvalidRequestError(f"expected {what}=VALUE, got {pair!r}")
        values[name.strip()] = value.strip()
    return values
