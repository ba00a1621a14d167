"""Read-only views of the Weaver's state as plain dicts (for ``status``, the CLI and APIs)."""

from __future__ import annotations

from typing import Any

from torchloom.protocol import resolve_values, select_snapshot, to_builtins
from torchloom.weaver.state import Job, Rank, WeaverState


def status(state: WeaverState, job_id: str | None, now: float) -> dict[str, Any]:
    """The DR map and per-rank figures of one job (or every job when ``job_id`` is None)."""
    jobs = (
        [state.jobs[job_id]]
        if job_id and job_id in state.jobs
        else ([] if job_id else list(state.jobs.values()))
    )
    return {
        "ts": now,
        "jobs": [_job(job, now) for job in jobs if job.config is not None or job.ranks],
        "dropped_messages": dict(state.dropped_messages),
        "liveness": {
            "failure_timeout_s": state.liveness.failure_timeout_s,
            "suspect_after_s": state.liveness.suspect_after_s,
            "hang_timeout_s": state.liveness.hang_timeout_s,
        },
    }


def _job(job: Job, now: float) -> dict[str, Any]:
    latest = job.config.latest() if job.config else None
    pending = [t for t in sorted(job.applies.values(), key=lambda t: t.version) if not t.done]
    return {
        "job_id": job.job_id,
        "epoch": job.config.epoch if job.config else None,
        "desired": to_builtins(latest) if latest else None,
        "ranks": [rank_view(r, job, now) for r in sorted(job.ranks.values(), key=lambda r: r.key)],
        "pending_applies": [
            {
                "version": t.version,
                "effective_step": t.effective_step,
                "applied": {f"{k[1]}/{k[2]}": s for k, s in t.applied.items()},
                "waiting_for": sorted(f"{k[1]}/{k[2]}" for k in t.expected - set(t.applied)),
                "flagged": sorted(f"{k[1]}/{k[2]}" for k in t.flagged),
            }
            for t in pending
        ],
        "apply_problems": sorted(
            {f"{k[1]}/{k[2]}: v{t.version}" for t in job.applies.values() for k in t.flagged}
        ),
    }


def rank_view(rank: Rank, job: Job, now: float, *, with_config: bool = True) -> dict[str, Any]:
    """One rank of the DR map with its figures, applied and desired config version, and
    (``with_config``) the knob values in force for it."""
    e = rank.entry
    latest = job.config.latest() if job.config else None
    snap = (
        select_snapshot(job.config.snapshots, max(e.last_step, 0))
        if job.config is not None
        else None
    )
    desired_version = snap.version if snap else None
    applied_at = None
    for t in job.applies.values():
        if t.version == e.applied_version and rank.key in t.applied:
            applied_at = t.applied[rank.key]
    return {
        "replica_id": e.replica_id,
        "rank": e.rank,
        "group_world_size": e.group_world_size,
        "state": "draining" if latest and e.replica_id in latest.drained and rank.live else e.state,
        "host": e.host,
        "pid": e.pid,
        "device": e.device,
        "step": e.last_step,
        "steps_per_s": round(rank.steps_per_s, 3),
        "samples_per_s": rank.samples_per_s,
        "step_time_s": rank.step_time_s,
        "metrics": dict(rank.metrics),
        "applied_version": e.applied_version,
        "applied_at_step": applied_at,
        "desired_version": desired_version,
        "heartbeat_age_s": round(max(0.0, now - e.last_seen_ts), 3),
        "dropped_points": rank.dropped_points,
        "quorum": rank.quorum,
        **({"config": resolve_values(snap, e.replica_id) if snap else {}} if with_config else {}),
    }


def knobs(job: Job) -> dict[str, Any]:
    """The job's knob registry and the desired value of each knob."""
    latest = job.config.latest() if job.config else None
    specs = job.config.knobs if job.config else {}
    return {
        "job_id": job.job_id,
        "version": latest.version if latest else None,
        "knobs": [
            {
                **to_builtins(spec),
                "rule": spec.rule(),
                "value": latest.values.get(name) if latest else None,
            }
            for name, spec in sorted(specs.items())
        ],
    }
