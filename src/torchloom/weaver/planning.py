"""Where a job is, and at which step a new config version takes effect: pure, no I/O.

One rank far off the others (a bug in a user's loop that counts steps wrongly, a stale
process from an earlier launch with another step counter) must not decide the effective
step of every later version. So the job's position is taken by a quorum-like rule over
replica groups, not from the fastest rank:

1. Each replica group's step is the lower median of its live ranks' steps (the ranks of
   one group run in lockstep under DDP/FSDP, so one bad rank cannot move its group).
2. Groups are clustered by step: neighbours within ``far_steps`` of each other (the larger
   of ``far_min_steps`` and ``far_horizon_s`` of the job's median step rate) share a
   cluster.
3. The *reference* cluster is the one with the most replica groups (a strict majority when
   there is one), then the most ranks, then the one that has been in the DR map longest
   (its earliest join), then the lowest. With two groups that disagree, age decides: the
   newcomer is the suspect (a restarted group that has not healed yet, a stale process
   that joined late).
4. A live rank more than ``far_steps`` ahead of the reference cluster is an *outlier*: it is
   left out of planning and flagged in the history. Ranks behind it stay members — they
   reach the effective step later, which is harmless.

A pending version whose effective step lies more than ``far_steps`` beyond every member is
*out of reach*: it is never a floor for a later version (which supersedes it), and the
Weaver re-plans it (:func:`torchloom.weaver.control.replan_request`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torchloom.protocol import ConfigSnapshot, HistoryEvent
from torchloom.weaver.state import Job, Rank


@dataclass(frozen=True, slots=True)
class Reach:
    """How far from the job's position a step still counts as reachable.

    Attributes:
        far_min_steps: at least this many steps.
        far_horizon_s: or as many steps as the job makes in this many seconds, if more.
    """

    far_min_steps: int = 100
    far_horizon_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Position:
    """A job's position by the quorum rule (see the module docstring).

    Attributes:
        members: live ranks with a step that count for planning.
        outliers: live ranks far ahead of the reference cluster, left out.
        top_step: the highest step a member reported.
        far_steps: the distance beyond which a step is out of reach, in steps.
        groups: replica groups in the reference cluster, and in all.
    """

    members: list[Rank]
    outliers: list[Rank]
    top_step: int
    far_steps: int
    groups: tuple[int, int]

    def reachable(self, step: int) -> bool:
        """Whether a version effective at ``step`` is within reach of the members."""
        return step <= self.top_step + self.far_steps


def _lower_median(xs: list[int]) -> int:
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2]


def position(job: Job, *, reach: Reach) -> Position | None:
    """The job's position, or None when no live rank has reported a step yet."""
    by_group: dict[str, list[Rank]] = {}
    for rank in job.ranks.values():
        if rank.live and rank.entry.last_step >= 0:
            by_group.setdefault(rank.entry.replica_id, []).append(rank)
    if not by_group:
        return None
    rates = sorted(r.steps_per_s for ranks in by_group.values() for r in ranks)
    rate = rates[len(rates) // 2]
    far = max(reach.far_min_steps, math.ceil(rate * reach.far_horizon_s))
    groups = sorted(
        (_lower_median([r.entry.last_step for r in ranks]), rid) for rid, ranks in by_group.items()
    )
    clusters: list[list[tuple[int, str]]] = [[groups[0]]]
    for item in groups[1:]:
        if item[0] - clusters[-1][-1][0] > far:
            clusters.append([])
        clusters[-1].append(item)

    def rank_of(cluster: list[tuple[int, str]]) -> tuple[int, int, float, int]:
        ranks = [r for _, rid in cluster for r in by_group[rid]]
        oldest = min(r.entry.joined_ts for r in ranks)
        return (len(cluster), len(ranks), -oldest, -cluster[0][0])

    ref = max(clusters, key=rank_of)
    ceiling = ref[-1][0] + far
    members: list[Rank] = []
    outliers: list[Rank] = []
    for ranks in by_group.values():
        for r in ranks:
            (outliers if r.entry.last_step > ceiling else members).append(r)
    return Position(
        members=members,
        outliers=outliers,
        top_step=max(r.entry.last_step for r in members),
        far_steps=far,
        groups=(len(ref), len(groups)),
    )


def estimate_step(rank: Rank, at: float) -> float:
    """Where ``rank`` will be at time ``at`` (s), from its last report and step rate."""
    if rank.state == "paused":
        return float(rank.entry.last_step)
    return rank.entry.last_step + rank.steps_per_s * max(0.0, at - rank.entry.last_seen_ts)


def floor_snapshots(job: Job) -> list[ConfigSnapshot]:
    """The job's snapshots that can hold a new version back: all but a rollback every rank
    has applied (it took the steps back below its effective step; a change after it would
    otherwise wait until the ranks are there again)."""
    snapshots = job.config.snapshots if job.config else []
    done = {v for v, t in job.applies.items() if t.done}
    return [s for s in snapshots if s.rollback is None or s.version not in done]


def floor_step(snapshots: list[ConfigSnapshot], pos: Position | None) -> int:
    """The lowest effective step a new version may have: the highest effective step of a
    version still in reach (a version out of reach is superseded by the new one)."""
    steps = [s.effective_step for s in snapshots if pos is None or pos.reachable(s.effective_step)]
    return max(steps, default=0)


def plan_effective_step(
    job: Job,
    now: float,
    *,
    lead_time_s: float,
    min_lead_steps: int,
    reach: Reach = Reach(),
    pos: Position | None = None,
) -> int:
    """Pick the step at which a new config version takes effect on every rank.

    The step is ahead of where the fastest member (not an outlier, see :func:`position`) will
    be once ``lead_time_s`` (plus twice the slowest config delivery lately observed, at most
    5 s) has passed, by at least ``min_lead_steps``, and never before the effective step of a
    version still in reach. When the job is paused and every live rank waits at the pause
    step, that step is used: every rank applies the new version before it runs again.

    Args:
        job: the job, with its desired config and DR map.
        now: wall clock, seconds since the epoch.
        lead_time_s: time budget for every rank to hear of the change, in seconds.
        min_lead_steps: the effective step is at least this many steps ahead.
        reach: what counts as far (outliers, versions out of reach).
        pos: the job's position when the caller already worked it out (else it is).

    Returns:
        The effective step (the floor for a job with no live rank).
    """
    snapshots = job.config.snapshots if job.config else []
    latest = snapshots[-1] if snapshots else None
    pos = position(job, reach=reach) if pos is None else pos
    floor = floor_step(floor_snapshots(job), pos)
    planned = pos.members if pos is not None else job.live_ranks()
    if not planned:
        return floor
    if (
        latest is not None
        and latest.run_state == "paused"
        and latest.effective_step == floor
        and all(r.state == "paused" and r.entry.last_step == floor for r in planned)
    ):
        return floor
    lag_s = max((r.config_lag_s for r in planned), default=0.0)
    horizon = now + lead_time_s + min(2 * lag_s, 5.0)
    ahead = max(estimate_step(r, horizon) for r in planned)
    return max(floor, math.ceil(ahead - 1e-9) + min_lead_steps)


def flag_outliers(job: Job, pos: Position | None, now: float) -> list[HistoryEvent]:
    """Record which live ranks are outliers now (``job.outliers``): a ``step_outlier`` event
    for each newly flagged one; a rank back in range (or gone) is unflagged silently."""
    now_out = {r.key: r for r in pos.outliers} if pos is not None else {}
    events = []
    for key, rank in now_out.items():
        if key in job.outliers:
            continue
        e = rank.entry
        assert pos is not None
        events.append(
            HistoryEvent(
                job_id=job.job_id,
                kind="step_outlier",
                ts=now,
                replica_id=e.replica_id,
                rank=e.rank,
                step=e.last_step,
                message=f"rank {e.replica_id}/{e.rank} reports step {e.last_step}, over "
                f"{pos.far_steps} steps ahead of the job (step {pos.top_step} on "
                f"{pos.groups[0]} of {pos.groups[1]} replica group(s)); left out of "
                "effective-step planning",
                data={
                    "reported_step": e.last_step,
                    "job_step": pos.top_step,
                    "far_steps": pos.far_steps,
                    "host": e.host,
                    "pid": e.pid,
                },
            )
        )
    job.outliers = set(now_out)
    return events


def review(job: Job, now: float, *, reach: Reach) -> tuple[list[HistoryEvent], Position | None]:
    """The periodic look at a job's position: flag its outliers (:func:`flag_outliers`) and
    return the position, or None when there is nothing to look at — every live rank within
    ``far_min_steps`` of every other and of the newest effective step (a plain O(ranks) pass,
    the common case)."""
    steps = [r.entry.last_step for r in job.ranks.values() if r.live and r.entry.last_step >= 0]
    latest = job.config.latest() if job.config is not None else None
    top = max(steps, default=0)
    if latest is not None:
        top = max(top, latest.effective_step)
    if not steps or top - min(steps) <= reach.far_min_steps:
        return flag_outliers(job, None, now), None
    pos = position(job, reach=reach)
    return flag_outliers(job, pos, now), pos
