"""What the dashboard shows of a job, as plain dicts; pure functions of state, track and time.

A *snapshot* is everything the page needs to draw a job from nothing; an
*update* carries only what changed since the previous frame: the rank rows that
differ, the events and chart points that are new, and the header and config
(small). The page applies updates in order; when a client falls behind, it is
sent a snapshot instead (see :mod:`~torchloom.weaver.web.feed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torchloom.protocol import to_builtins
from torchloom.weaver import views
from torchloom.weaver.state import Job, Rank, WeaverState
from torchloom.weaver.web.schema import ConfigView, Header, Health, RankDetail, RankRow
from torchloom.weaver.web.track import JobTrack, finite, key_id, rank_id, spark_points

SNAPSHOT_EVENTS = 500
"""Events a snapshot carries (the page can ask the API for older ones)."""


def rank_row(rank: Rank, job: Job, now: float) -> RankRow:
    """One rank as a row of the replicas table and a cell of the DR map."""
    return _row(rank, views.rank_view(rank, job, now, with_config=False))


def rank_detail(rank: Rank, job: Job, now: float) -> RankDetail:
    """A rank's row plus everything :func:`~torchloom.weaver.views.rank_view` knows."""
    v = views.rank_view(rank, job, now)
    return {
        **_row(rank, v),
        "steps_per_s": v["steps_per_s"],
        "metrics": v["metrics"],
        "dropped_points": v["dropped_points"],
        "quorum": v["quorum"],
        "config": v["config"],
    }


def _row(rank: Rank, v: dict[str, Any]) -> RankRow:
    quorum = rank.quorum or {}
    return {
        "id": rank_id(rank),
        "replica_id": v["replica_id"],
        "rank": v["rank"],
        "group_world_size": v["group_world_size"],
        "state": v["state"],
        "host": v["host"],
        "pid": v["pid"],
        "device": v["device"],
        "step": v["step"],
        "step_time_s": finite(v["step_time_s"]),
        "samples_per_s": finite(v["samples_per_s"]),
        "applied_version": v["applied_version"],
        "applied_at_step": v["applied_at_step"],
        "desired_version": v["desired_version"],
        "heartbeat_age_s": v["heartbeat_age_s"],
        "loss": finite(rank.metrics.get("loss")),
        "test_acc": finite(rank.metrics.get("test_acc")),
        "healing": bool(quorum.get("healing")),
        "participants": quorum.get("participants"),
        "straggler": rank.straggler,
        "risk": None if rank.risk is None else round(rank.risk, 3),
    }


def header(job: Job, track: JobTrack, health: Health) -> Header:
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
    mfus = [v for r in live if (v := finite(r.metrics.get("mfu"))) is not None]
    flops = [v for r in live if (v := finite(r.metrics.get("flops_per_s"))) is not None]
    return {
        "job_id": job.job_id,
        "run_state": latest.run_state if latest else None,
        "step": max((r.entry.last_step for r in live or job.ranks.values()), default=None),
        "samples_per_s": round(sum(sps), 1) if sps else None,
        "loss": sum(losses) / len(losses) if losses else None,
        "test_acc": max(accs) if accs else None,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "flops_per_s": sum(flops) if flops else None,
        "groups_healthy": sum(groups.values()),
        "groups_total": len(groups),
        "ranks_live": len(live),
        "ranks_total": len(job.ranks),
        "goodput": track.goodput,
        "weaver": health,
    }


def config(job: Job) -> ConfigView:
    """The desired config: latest version, values, overrides, knob registry, recent applies."""
    latest = job.config.latest() if job.config else None
    applies = sorted(job.applies.values(), key=lambda t: t.version)[-8:]
    knobs = views.knobs(job)
    return {
        "job_id": job.job_id,
        "version": knobs["version"],
        "knobs": knobs["knobs"],
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
                "applied": {key_id(k): s for k, s in t.applied.items()},
                "flagged": sorted(key_id(k) for k in t.flagged),
            }
            for t in applies
        ],
    }


def rows(job: Job, now: float) -> dict[str, RankRow]:
    """Every rank's row, by rank id, in DR-map order."""
    ranks = sorted(job.ranks.values(), key=lambda r: r.key)
    return {rank_id(r): rank_row(r, job, now) for r in ranks}


@dataclass(slots=True)
class Cursor:
    """How far a stream of frames has got: what the last frame sent held."""

    rows: dict[str, RankRow] = field(default_factory=dict)
    event_seq: int = 0
    series_ts: float = float("-inf")
    series_stride: int = 1


def update(
    job: Job, track: JobTrack, health: Health, now: float, jobs: list[str], cursor: Cursor
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


def _changes(row: RankRow, before: RankRow | None) -> Mapping[str, Any] | None:
    """The fields of ``row`` that differ from ``before`` (with its ``id``); all of a new row;
    None when nothing changed."""
    if before is None:
        return row
    diff = {k: v for k, v in row.items() if before.get(k) != v}
    return {"id": row["id"], **diff} if diff else None


def snapshot(
    job: Job, track: JobTrack, health: Health, now: float, jobs: list[str]
) -> dict[str, Any]:
    """Everything the page needs to draw ``job`` from nothing."""
    return {
        "type": "snapshot",
        "ts": now,
        "jobs": jobs,
        "header": header(job, track, health),
        "config": config(job),
        "ranks": list(rows(job, now).values()),
        "sparks": spark_points(track),
        "events": track.events_after(0, limit=SNAPSHOT_EVENTS),
        "series": track.series.since(float("-inf")),
    }


def cursor_at(track: JobTrack, current: dict[str, RankRow]) -> Cursor:
    """The cursor of a frame that held the rows ``current`` and everything ``track`` holds."""
    return Cursor(
        rows=current,
        event_seq=track.event_seq,
        series_ts=track.series.ts[-1] if track.series.ts else float("-inf"),
        series_stride=track.series.stride,
    )


def shown(job: Job) -> bool:
    """Whether the dashboard shows ``job``: it has a config or a known rank."""
    return job.config is not None or bool(job.ranks)


def job_ids(state: WeaverState) -> list[str]:
    """The jobs the dashboard shows, sorted."""
    return sorted(j.job_id for j in state.jobs.values() if shown(j))
