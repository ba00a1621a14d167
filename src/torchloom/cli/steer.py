"""Steering a job: ``torchloom set``, ``pause``, ``resume``, ``stop``, ``drain``, ``forget``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Annotated

import typer

from torchloom.cli.options import (
    DEFAULT_TIMEOUT_S,
    JobOpt,
    NatsUrl,
    ReasonOpt,
    ReplicaOpt,
    StateDir,
    TimeoutOpt,
    out,
    parse_assignments,
    pick_job,
    weaver_client,
)
from torchloom.client import WeaverClient, who
from torchloom.errors import NotReachableError
from torchloom.protocol import ControlRequest
from torchloom.protocol.messages import ControlOp


def set_(
    assignments: Annotated[
        list[str], typer.Argument(help="KNOB=VALUE … (e.g. lr=0.01 batch_size=128 grad_clip=off)")
    ],
    replica: ReplicaOpt = None,
    reason: ReasonOpt = "",
    wait: Annotated[
        bool, typer.Option("--wait", help="wait until every rank has applied it")
    ] = False,
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Change knobs, job-wide or for one replica group, at a step every rank agrees on."""
    values = parse_assignments(assignments, what="KNOB")
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    reply = client.control("set", job_id, values=values, replica_id=replica, reason=reason)
    out.print(
        f"v{reply.version} accepted: {' '.join(assignments)}"
        f"{f' on replica group {replica}' if replica else ''} → effective at step {reply.effective_step} (job {job_id})"
    )
    checkpoint = (reply.data or {}).get("checkpoint")
    if checkpoint:  # a switch of the optimizer: its state is saved first
        out.print(
            f"checkpoint {checkpoint} of the state before it is taken at step {reply.effective_step} "
            f"(`torchloom rollback --to {checkpoint}` goes back)"
        )
    if wait:
        _wait_applied(client, job_id, int(reply.version or 0), timeout_s=max(timeout_s, 60.0))


def _wait_applied(client: WeaverClient, job_id: str, version: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = client.status(job_id, states=["live"], limit=20, sort="rank").get("jobs", [])
        applied = jobs[0]["summary"]["applied_versions"] if jobs else {}
        if applied and all(int(v) >= version for v in applied):
            n = sum(applied.values())
            steps = [
                f"{r['replica_id']}/{r['rank']} at step {r.get('applied_at_step')}"
                for r in jobs[0]["ranks"]
            ]
            more = f" … and {n - len(steps)} more" if n > len(steps) else ""
            out.print(f"v{version} applied by {n} rank(s): " + ", ".join(steps) + more)
            return
        time.sleep(0.2)
    raise NotReachableError(
        f"v{version} was not applied by every rank within {timeout_s:g} s (see `torchloom status`)"
    )


def state_command(op: ControlOp, doc: str) -> Callable[..., None]:
    """The command ``torchloom pause|resume|stop``: one request each, the same options."""

    def command(
        job: JobOpt = None,
        reason: ReasonOpt = "",
        nats_url: NatsUrl = None,
        state_dir: StateDir = None,
        timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
    ) -> None:
        client = weaver_client(nats_url, state_dir, timeout_s)
        job_id = pick_job(client, job)
        reply = client.control(op, job_id, reason=reason)
        out.print(
            f"v{reply.version}: {op} accepted → effective at step {reply.effective_step} (job {job_id})"
        )

    command.__doc__ = doc
    return command


def drain(
    replica: Annotated[
        str | None, typer.Option("--replica", "-r", help="the replica group to take out")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="`torchloom run` starts a fresh group in its place")
    ] = False,
    device: Annotated[
        str | None,
        typer.Option("--device", help="take out the groups using this device (UUID or cpu:HOST)"),
    ] = None,
    job: JobOpt = None,
    reason: ReasonOpt = "",
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Take a replica group (or every group on a device) out of the run at a step all agree on:
    it finishes the step before, leaves, exits 0 and is removed from the DR map."""
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    reply = client.request(
        ControlRequest(
            op="drain",
            job_id=job_id,
            replica_id=replica,
            device=device,
            replace=replace,
            reason=reason,
            requested_by=who(),
            request_id=uuid.uuid4().hex,
        )
    )
    what = f"replica group {replica}" if replica else f"the replica group(s) on {device}"
    out.print(
        f"v{reply.version}: drain of {what} accepted → it leaves before step {reply.effective_step} (job {job_id})"
    )


def forget(
    replica: ReplicaOpt = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="only this rank (with --replica)")
    ] = None,
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Take gone ranks (failed, exited) out of the DR map: all of the job's, of one replica
    group, or one rank. Live ranks are never forgotten. (The Weaver forgets gone ranks by
    itself after an hour, and keeps at most 1,000 per job.)"""
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    values = {"rank": rank} if rank is not None else {}
    reply = client.control("forget", job_id, values=values, replica_id=replica)
    data = reply.data or {}
    ids = data.get("ranks", [])
    shown = ", ".join(ids[:10]) + (" …" if len(ids) > 10 else "")
    out.print(f"forgot {data.get('forgotten', 0)} gone rank(s) of job {job_id}: {shown or '—'}")
