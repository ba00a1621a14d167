"""Looking at a job: ``torchloom status``, ``knobs``, ``events``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from torchloom.cli import render
from torchloom.cli.options import (
    DEFAULT_TIMEOUT_S,
    JobOpt,
    NatsUrl,
    ReplicaOpt,
    StateDir,
    TimeoutOpt,
    out,
    pick_job,
    weaver_client,
)
from torchloom.protocol import HistoryEvent, to_builtins


def status(
    job: JobOpt = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            "-s",
            help="only ranks in this state (repeatable): training, failed, …, or live / dead",
        ),
    ] = None,
    replica: ReplicaOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="ranks shown (0: summary only)")] = 50,
    offset: Annotated[int, typer.Option("--offset", help="ranks skipped first")] = 0,
    sort: Annotated[
        str, typer.Option("--sort", help="attention (failed first), rank, slowest, step")
    ] = "attention",
    as_json: Annotated[bool, typer.Option("--json", help="print the raw status as JSON")] = False,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """A summary of the job (ranks per state, replica groups, applied versions, the slowest
    ranks) and a page of its DR map: per rank state, step, loss, samples/s, config version."""
    data = weaver_client(nats_url, state_dir, timeout_s).status(
        job, states=state, replica_id=replica, limit=limit, offset=offset, sort=sort
    )
    if as_json:
        out.print_json(json.dumps(data))
    else:
        out.print(render.status_view(data, width=out.width))


def knobs(
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """The job's knob registry: each knob's type, bounds, scope and desired value."""
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    data = client.control("knobs", job_id).data or {}
    t = Table(title=f"knobs of {job_id} (desired v{data.get('version')})", title_justify="left")
    for col in ("knob", "value", "rule", "scope", "doc"):
        t.add_column(col)
    for k in data.get("knobs", []):
        t.add_row(
            k["name"],
            "off" if k["value"] is None and k.get("allow_off") else str(k["value"]),
            k["rule"],
            k["scope"],
            k.get("doc", ""),
        )
    out.print(t)


def events(
    job: Annotated[
        str | None, typer.Option("--job", "-j", envvar="TORCHLOOM_JOB", help="only this job")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", "-k", help="only these kinds (repeatable)")
    ] = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
) -> None:
    """The job's history (joins, failures, config changes and applies), from the events stream."""
    kinds = set(kind or [])

    def show(ev: HistoryEvent) -> None:
        if kinds and ev.kind not in kinds:
            return
        if as_json:
            print(json.dumps(to_builtins(ev)), flush=True)
        else:
            out.print(render.event_line(ev))

    try:
        weaver_client(nats_url, state_dir).history(job, follow=follow, on_event=show)
    except KeyboardInterrupt:
        pass
