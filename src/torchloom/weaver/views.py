"""Read-only views of the Weaver's state as plain dicts (for ``status``, the CLI and APIs)."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchloom.errors import InvalidRequestError
from torchloom.protocol import ConfigSnapshot, resolve_values, select_snapshot, to_builtins
from torchloom.weaver.state import Job, Rank, RankKey, WeaverState

STATE_ORDER = (
    "failed",
    "hung",
    "suspect",
    "draining",
    "joining",
    "paused",
    "training",
    "exited",
)
"""The ``attention`` order of ranks in a status page: what needs a look first."""
SORTS = ("attention", "rank", "slowest", "step")
MAX_PAGE = 1000
"""The most ranks one status page holds (a reply must stay under the codec's size limit)."""
LISTED = 20
"""Rank ids listed per pending version (``waiting_for``, ``flagged``); the rest are counted."""


@dataclass(frozen=True, slots=True)
class StatusQuery:
    """Which ranks a status page shows.

    Attributes:
        states: only ranks in these states (as shown: ``draining`` included); ``live`` stands
            for every live state and ``dead`` for ``failed`` and ``exited``. None: all.
        replica_id: only this replica group.
        limit: ranks per page (1 … :data:`MAX_PAGE`); 0: the summary only.
        offset: ranks to skip (after filtering and sorting).
        sort: ``attention`` (failed, hung, suspect, … first, then by replica/rank), ``rank``
            (replica/rank), ``slowest`` (longest step first), ``step`` (lowest step first).
    """

    states: frozenset[str] | None = None
    replica_id: str | None = None
    limit: int = 100
    offset: int = 0
    sort: str = "attention"

    @classmethod
    def from_values(cls, values: dict[str, Any], replica_id: str | None) -> StatusQuery:
        """The query of a ``status`` request (its ``values``).

        Raises:
            InvalidRequestError: an unknown state or sort, or a limit/offset out of range.
        """
        raw = values.get("state")
        states = None
        if raw:
            items = [raw] if isinstance(raw, str) else list(raw)
            known = {*STATE_ORDER, "live", "dead"}
            bad = [s for s in items if s not in known]
            if bad:
                raise InvalidRequestError(
                    f"unknown state {bad[0]!r}: use {', '.join(sorted(known))}"
                )
            states = frozenset(_expand(items))
        sort = str(values.get("sort", "attention"))
        if sort not in SORTS:
            raise InvalidRequestError(f"unknown sort {sort!r}: use {', '.join(SORTS)}")
        try:
            limit, offset = int(values.get("limit", 100)), int(values.get("offset", 0))
        except (TypeError, ValueError):
            raise InvalidRequestError("limit and offset must be integers") from None
        if not 0 <= limit <= MAX_PAGE or offset < 0:
            raise InvalidRequestError(f"limit must be in 0..{MAX_PAGE} and offset >= 0")
        return cls(states=states, replica_id=replica_id, limit=limit, offset=offset, sort=sort)


def _expand(states: list[str]) -> set[str]:
    out: set[str] = set()
    for s in states:
        if s == "live":
            out |= {"joining", "training", "paused", "suspect", "hung", "draining"}
        elif s == "dead":
            out |= {"failed", "exited"}
        else:
            out.add(s)
    return out


def status(
    state: WeaverState, job_id: str | None, now: float, query: StatusQuery | None = None
) -> dict[str, Any]:
    """A summary of one job (or every job when ``job_id`` is None) and a page of its ranks.

    Its size does not grow with the job: counts per state, the slowest live ranks, applied
    config versions, and ``query.limit`` ranks (``page`` says which of how many matched).
    """
    query = query or StatusQuery()
    jobs = (
        [state.jobs[job_id]]
        if job_id and job_id in state.jobs
        else ([] if job_id else list(state.jobs.values()))
    )
    return {
        "ts": now,
        "jobs": [_job(job, now, query) for job in jobs if job.config is not None or job.ranks],
        "dropped_messages": dict(state.dropped_messages),
        "liveness": {
            "failure_timeout_s": state.liveness.failure_timeout_s,
            "suspect_after_s": state.liveness.suspect_after_s,
            "hang_timeout_s": state.liveness.hang_timeout_s,
        },
    }


def shown_state(rank: Rank, latest: ConfigSnapshot | None) -> str:
    """A rank's state as shown: ``draining`` for a live rank of a group being drained."""
    if latest is not None and rank.entry.replica_id in latest.drained and rank.live:
        return "draining"
    return rank.entry.state


def select(job: Job, query: StatusQuery) -> tuple[list[Rank], int]:
    """The page of ``job``'s ranks that ``query`` asks for, and how many matched it."""
    latest = job.config.latest() if job.config else None
    shown = ((shown_state(r, latest), r) for r in job.ranks.values())
    matched = [
        (st, r)
        for st, r in shown
        if (query.states is None or st in query.states)
        and (query.replica_id is None or r.entry.replica_id == query.replica_id)
    ]
    matched.sort(key=_SORT_KEYS[query.sort])
    page = matched[query.offset : query.offset + query.limit]
    return [r for _, r in page], len(matched)


def summary(job: Job) -> dict[str, Any]:
    """A job of any size in a few numbers: ranks per state (as shown), replica groups (all,
    live), applied config versions of the live ranks, the five slowest live ranks, the ranks
    flagged as step outliers."""
    latest = job.config.latest() if job.config else None
    counts: dict[str, int] = {}
    versions: dict[str, int] = {}
    groups: dict[str, bool] = {}
    for r in job.ranks.values():
        st = shown_state(r, latest)
        counts[st] = counts.get(st, 0) + 1
        groups[r.entry.replica_id] = groups.get(r.entry.replica_id, False) or r.live
        if r.live:
            v = str(r.entry.applied_version)
            versions[v] = versions.get(v, 0) + 1
    timed = [r for r in job.ranks.values() if r.live and r.step_time_s]
    slowest = heapq.nlargest(5, timed, key=lambda r: r.step_time_s or 0.0)
    return {
        "ranks": len(job.ranks),
        "states": dict(sorted(counts.items(), key=lambda kv: STATE_ORDER.index(kv[0]))),
        "replica_groups": len(groups),
        "replica_groups_live": sum(groups.values()),
        "applied_versions": versions,
        "slowest": [
            {"id": rank_id(r.key), "step_time_s": r.step_time_s, "step": r.entry.last_step}
            for r in slowest
        ],
        "outliers": sorted(rank_id(k) for k in job.outliers),
    }


def _job(job: Job, now: float, query: StatusQuery) -> dict[str, Any]:
    latest = job.config.latest() if job.config else None
    page, matched = select(job, query)
    pending = [t for t in sorted(job.applies.values(), key=lambda t: t.version) if not t.done]
    problems = sorted(
        {f"{rank_id(k)}: v{t.version}" for t in job.applies.values() for k in t.flagged}
    )
    return {
        "job_id": job.job_id,
        "epoch": job.config.epoch if job.config else None,
        "desired": to_builtins(latest) if latest else None,
        "summary": summary(job),
        "ranks": [rank_view(r, job, now) for r in page],
        "page": {
            "offset": query.offset,
            "limit": query.limit,
            "matched": matched,
            "sort": query.sort,
        },
        "pending_applies": [
            {
                "version": t.version,
                "effective_step": t.effective_step,
                "applied_count": len(t.applied),
                "waiting_count": len(t.expected - t.applied.keys()),
                "waiting_for": sorted(rank_id(k) for k in t.expected - t.applied.keys())[:LISTED],
                "flagged": sorted(rank_id(k) for k in t.flagged)[:LISTED],
            }
            for t in pending
        ],
        "apply_problems": problems[:LISTED],
        "apply_problems_total": len(problems),
    }


def rank_id(key: RankKey) -> str:
    """``"<replica_id>/<rank>"``."""
    return f"{key[1]}/{key[2]}"


_SORT_KEYS: dict[str, Callable[[tuple[str, Rank]], Any]] = {
    "attention": lambda sr: (STATE_ORDER.index(sr[0]), sr[1].key),
    "rank": lambda sr: sr[1].key,
    "slowest": lambda sr: (-(sr[1].step_time_s or 0.0), sr[1].key),
    "step": lambda sr: (sr[1].entry.last_step, sr[1].key),
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
        "state": shown_state(rank, latest),
        "outlier": rank.key in job.outliers,
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
