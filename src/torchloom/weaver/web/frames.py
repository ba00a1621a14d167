"""What the dashboard shows of a job, as plain dicts; pure functions of state, track and time.

A *snapshot* is everything the page needs to draw a job from nothing; an
*update* carries only what changed since the previous frame: the rank rows that
differ, the events and chart points that are new, and the header and config
(small). The page applies updates in order; when a client falls behind, it is
sent a snapshot instead (see :mod:`~torchloom.weaver.web.feed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torchloom.protocol import to_builtins
from torchloom.weaver import views
from torchloom.weaver.state import Job, Rank, WeaverState
from torchloom.weaver.web.track import JobTrack, finite, rank_id

SNAPSHOT_EVENTS = 500
"""Events a snapshot carries (the page can ask the API for older ones)."""

_ROW_KEYS = (
    "replica_id",
    "rank",
    "group_world_size",
    "state",
    "host",
    "pid",
    "device",
    "step",
    "step_time_s",
    "samples_per_s",
    "applied_version",
    "applied_at_step",
    "desired_version",
    "heartbeat_age_s",
)


def rank_row(rank: Rank, job: Job, now: float, *, detail: bool = False) -> dict[str, Any]:
    """One rank as a row of the replicas table and a cell of the DR map; with ``detail``
    also everything :func:`~torchloom.weaver.views.rank_view` knows (config, metrics, quorum).

    ``risk`` (failure risk, 0-1) and ``straggler`` are None until a policy computes them.
    """
    v = views.rank_view(rank, job, now, with_config=detail)
    quorum = rank.quorum or {}
    return {
        **(v if detail else {}),
        "id": rank_id(rank),
        **{k: v[k] for k in _ROW_KEYS},
        "step_time_s": finite(v["step_time_s"]),
        "samples_per_s": finite(v["samples_per_s"]),
        "loss": finite(rank.metrics.get("loss")),
        "test_acc": finite(rank.metrics.get("test_acc")),
        "healing": bool(quorum.get("healing")),
        "participating": quorum.get("participating"),
        "straggler": None,
        "risk": None,
    }


def header(job: Job, track: JobTrack, health: dict[str, Any]) -> dict[str, Any]:
    """The run header: global step, samples/s, loss, accuracy, healthy groups, goodput, health."""
    live = job.live_ranks()
    latest = job.config.latest() if job.config else None
    drained = set(latest.drained) if latest else set()
    groups: dict[str, bool] = {}
    for r in job.ranks.values():
        gid = r.entry.replica_id
        if r.entry.state == "exited" or gid in drained:
            continue
        healthy = r.entry.state in ("training", "paused") and not (r.quorum or {}).get("healing")
        groups[gid] = groups.get(gid, True) and healthy
    losses = [v for r in live if (v := finite(r.metrics.get("loss"))) is not None]
    accs = [v for r in job.ranks.values() if (v := finite(r.metrics.get("test_acc"))) is not None]
    sps = [v for r in live if (v := finite(r.samples_per_s)) is not None]
    return {
        "job_id": job.job_id,
        "run_state": latest.run_state if latest else None,
        "step": max((r.entry.last_step for r in live or job.ranks.values()), default=None),
        "samples_per_s": round(sum(sps), 1) if sps else None,
        "loss": sum(losses) / len(losses) if losses else None,
        "test_acc": max(accs) if accs else None,
        "groups_healthy": sum(groups.values()),
        "groups_total": len(groups),
        "ranks_live": len(live),
        "ranks_total": len(job.ranks),
        "goodput": track.goodput,
        "weaver": health,
    }


def config(job: Job) -> dict[str, Any]:
    """The desired config: latest version, values, overrides, knob registry, recent applies."""
    latest = job.config.latest() if job.config else None
    applies = sorted(job.applies.values(), key=lambda t: t.version)[-8:]
    return {
        **views.knobs(job),
        "epoch": job.config.epoch if job.config else None,
        "effective_step": latest.effective_step if latest else None,
        "values": to_builtins(latest.values) if latest else {},
        "overrides": to_builtins(latest.overrides) if latest else {},
        "run_state": latest.run_state if latest else None,
        "drained": list(latest.drained) if latest else [],
        "applies": [
            {
                "version": t.version,
                "effective_step": t.effective_step,
                "done": t.done,
                "expected": len(t.expected),
                "applied": {f"{k[1]}/{k[2]}": s for k, s in t.applied.items()},
                "flagged": sorted(f"{k[1]}/{k[2]}" for k in t.flagged),
            }
            for t in applies
        ],
    }


def rows(job: Job, now: float) -> dict[str, dict[str, Any]]:
    """Every rank's row, by rank id, in DR-map order."""
    ranks = sorted(job.ranks.values(), key=lambda r: r.key)
    return {rank_id(r): rank_row(r, job, now) for r in ranks}


@dataclass(slots=True)
class Cursor:
    """How far a stream of frames has got: what the last frame sent held."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    event_seq: int = 0
    series_ts: float = float("-inf")
    series_stride: int = 1


def update(
    job: Job, track: JobTrack, health: dict[str, Any], now: float, jobs: list[str], cursor: Cursor
) -> dict[str, Any]:
    """What changed since the frame ``cursor`` describes; moves ``cursor`` past this frame.

    ``ranks`` holds, per rank that changed, its ``id`` and the fields that changed (a new
    rank comes whole); the page merges them into the rows it has.

    When the chart series was thinned since (see :class:`~torchloom.weaver.web.series.Series`),
    the whole series is sent with ``series_reset`` so that the page's copy stays as small.
    """
    current = rows(job, now)
    changed = [_changes(row, cursor.rows.get(rid)) for rid, row in current.items()]
    reset = track.series.stride != cursor.series_stride
    series = track.series.since(float("-inf") if reset else cursor.series_ts)
    events = track.events_after(cursor.event_seq)
    frame = {
        "type": "update",
        "ts": now,
        "jobs": jobs,
        "header": header(job, track, health),
        "config": config(job),
        "ranks": [c for c in changed if c is not None],
        "removed": sorted(set(cursor.rows) - set(current)),
        "events": events,
        "series": series,
        "series_reset": reset,
    }
    cursor.rows = current
    cursor.event_seq = track.event_seq
    cursor.series_ts = track.series.ts[-1] if track.series.ts else cursor.series_ts
    cursor.series_stride = track.series.stride
    return frame


def _changes(row: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fields of ``row`` that differ from ``before`` (with its ``id``); all of a new row;
    None when nothing changed."""
    if before is None:
        return row
    diff = {k: v for k, v in row.items() if before.get(k) != v}
    return {"id": row["id"], **diff} if diff else None


def snapshot(
    job: Job, track: JobTrack, health: dict[str, Any], now: float, jobs: list[str]
) -> tuple[dict[str, Any], Cursor]:
    """Everything the page needs to draw ``job`` from nothing, and the cursor just after it."""
    current = rows(job, now)
    frame = {
        "type": "snapshot",
        "ts": now,
        "jobs": jobs,
        "header": header(job, track, health),
        "config": config(job),
        "ranks": list(current.values()),
        "sparks": {k: [list(p) for p in v] for k, v in track.sparks.items()},
        "events": track.events_after(0, limit=SNAPSHOT_EVENTS),
        "series": track.series.since(float("-inf")),
    }
    cursor = Cursor(
        rows=current,
        event_seq=track.event_seq,
        series_ts=track.series.ts[-1] if track.series.ts else float("-inf"),
        series_stride=track.series.stride,
    )
    return frame, cursor


def job_ids(state: WeaverState) -> list[str]:
    """The jobs worth showing: those with a config or a known rank."""
    return sorted(j.job_id for j in state.jobs.values() if j.config is not None or j.ranks)
