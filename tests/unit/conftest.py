"""What the unit tests share: the Weaver's pure state driven by hand, and an offline Run.

The Weaver's state is driven as the service drives it, with explicit time (``now``, in
seconds) and no server: :func:`join` and :func:`ctl` go through the control entry point
(``handle``, then ``commit`` when accepted), :func:`beat` is one telemetry flush of a rank.
They are plain functions, imported where used (``from tests.unit.conftest import beat``):
this directory is a package, so this module has one name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torchloom
from torchloom.protocol import ControlRequest, HistoryEvent, JoinInfo, KnobSpec, Telemetry
from torchloom.threadlet import Run
from torchloom.weaver.control import ControlSettings, Outcome, commit, handle
from torchloom.weaver.state import WeaverState, on_telemetry

JOB = "j"
"""The job every helper here speaks for unless told otherwise."""

SETTINGS = ControlSettings(lead_time_s=0.5, min_lead_steps=2)
"""Effective steps half a second ahead of the fastest rank, and at least 2 steps."""


def pid_of(replica: str, rank: int) -> int:
    """A rank's pid, the same in its join and in its heartbeats: ``1000 + 10 × replica + rank``."""
    return 1000 + 10 * (int(replica) if replica.isdigit() else 0) + rank


def beat(
    s: WeaverState,
    now: float,
    *,
    replica: str = "0",
    rank: int = 0,
    step: int = 10,
    state: str = "training",
    seq: int | None = None,
    applied: int = 0,
    step_time_s: float = 0.01,
    pid: int | None = None,
    host: str = "",
    conn: str = "",
    job: str = JOB,
) -> list[HistoryEvent]:
    """One telemetry flush (a heartbeat) of ``replica/rank`` at ``now``; the events it made.
    ``seq`` defaults to ``now`` in ms (later flushes are newer)."""
    msg = Telemetry(
        job_id=job,
        replica_id=replica,
        rank=rank,
        ts=now,
        step=step,
        seq=seq if seq is not None else int(now * 1000),
        state=state,
        applied_version=applied,
        step_time_s=step_time_s,
        pid=pid if pid is not None else pid_of(replica, rank),
        host=host,
        conn=conn,
    )
    return on_telemetry(s, msg, now)


def submit(
    s: WeaverState, req: ControlRequest, now: float, settings: ControlSettings = SETTINGS
) -> tuple[Outcome, list[HistoryEvent]]:
    """``req`` through the control entry point, committed when accepted (as after its KV
    write): the outcome and the events the commit made (none when refused)."""
    out = handle(s, req, now, settings)
    return out, commit(s, req, out, now) if out.reply.ok else []


def join(
    s: WeaverState,
    now: float,
    *,
    replica: str = "0",
    rank: int = 0,
    values: Mapping[str, Any] | None = None,
    custom: Iterable[KnobSpec] = (),
    pid: int | None = None,
    host: str = "",
    settings: ControlSettings = SETTINGS,
    job: str = JOB,
) -> tuple[Outcome, list[HistoryEvent]]:
    """``replica/rank`` joins with ``values`` as its initial knobs (``lr`` 0.1, ``batch_size``
    64 unless given); asserts the join is accepted."""
    info = JoinInfo(
        replica_id=replica,
        rank=rank,
        pid=pid if pid is not None else pid_of(replica, rank),
        host=host,
        initial_values=dict(values) if values is not None else {"lr": 0.1, "batch_size": 64},
        custom_knobs=list(custom),
    )
    out, events = submit(s, ControlRequest(op="join", job_id=job, join=info), now, settings)
    assert out.reply.ok, out.reply.error
    return out, events


def ctl(
    s: WeaverState,
    now: float,
    op: str,
    values: Mapping[str, Any] | None = None,
    *,
    replica: str | None = None,
    request: ControlRequest | None = None,
    settings: ControlSettings = SETTINGS,
    job: str = JOB,
) -> tuple[Outcome, list[HistoryEvent]]:
    """A control request (``set``, ``pause``, ``drain``, …; or ``request`` as given)."""
    req = request or ControlRequest(
        op=op, job_id=job, values=dict(values or {}), replica_id=replica
    )
    return submit(s, req, now, settings)


def two_groups(now: float = 100.0, *, steps: tuple[int, int] = (100, 100)) -> WeaverState:
    """Replica groups 0 and 1 of one rank each, joined and heard from at ``steps``."""
    s = WeaverState()
    for replica, step in zip(("0", "1"), steps, strict=True):
        join(s, now, replica=replica)
        beat(s, now, replica=replica, step=step)
    return s


def offline_run(*, job_id: str = JOB, knobs: Mapping[str, Any] | None = None, **kw: Any) -> Run:
    """A Run with no NATS session (rank 0 of replica group 0 unless told): configs are offered
    by hand through ``run.shared.offer``. ``knobs``: ``lr`` 0.1 and ``batch_size`` 8 unless
    given."""
    kw.setdefault("rank", 0)
    kw.setdefault("replica_id", "0")
    knobs = dict(knobs) if knobs is not None else {"lr": 0.1, "batch_size": 8}
    return torchloom.init(job_id=job_id, connect=False, knobs=knobs, **kw)
