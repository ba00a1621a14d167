"""When to checkpoint: Young/Daly's interval from the job's own save cost and failure rate.

A checkpoint every ``T`` seconds costs ``C/T`` of the run (``C``: what one save costs the
training), and a failure loses ``T/2`` of work on average, so with a mean time between
failures ``M`` the loss is smallest at ``T* = √(2·C·M)`` (Young, 1974; Daly, 2006); CheckFreq
(Mohan et al., FAST'21) tunes the frequency at run time from measured costs, as here:

* ``C``: the median training-thread stall of the job's last complete checkpoints (the copy to
  CPU memory of an async save), with ``cost_prior_s`` before the first one;
* ``M``: the job's observed time over its failures plus one prior failure-free span,
  ``(mtbf_prior_s + observed_s) / (1 + failures)``, where a failure is a rank marked failed;
* ``T = clamp(T*, min_interval_s, max_interval_s)``.

The policy orders a checkpoint (``action="checkpoint"``) when ``T`` has passed since the
job's newest checkpoint request (or its first rank's join), no checkpoint is pending and
every live rank of the job runs a :class:`~torchloom.checkpoint.Checkpointer` (said by its
``checkpoint_ready`` event): a job without one is never asked.
"""

from __future__ import annotations

import math

import msgspec

from torchloom.weaver.policies.base import Decision, median, per_job
from torchloom.weaver.state import Job, WeaverState


class CheckpointIntervalParams(msgspec.Struct, kw_only=True):
    """Parameters of the checkpoint interval policy.

    Attributes:
        min_interval_s: the shortest time between two ordered checkpoints, in seconds.
        max_interval_s: the longest, in seconds.
        cost_prior_s: the save cost assumed before the job's first complete checkpoint, s.
        mtbf_prior_s: the failure-free time assumed before any is observed, in seconds.
        recent: complete checkpoints whose stalls make the cost estimate (the newest).
    """

    min_interval_s: float = 60.0
    max_interval_s: float = 3600.0
    cost_prior_s: float = 1.0
    mtbf_prior_s: float = 24 * 3600.0
    recent: int = 5


def check(p: CheckpointIntervalParams) -> None:
    if not 0.0 < p.min_interval_s <= p.max_interval_s:
        raise ValueError("0 < min_interval_s <= max_interval_s")
    if p.cost_prior_s <= 0 or p.mtbf_prior_s <= 0 or p.recent < 1:
        raise ValueError("cost_prior_s > 0, mtbf_prior_s > 0 and recent >= 1")


def interval_s(cost_s: float, mtbf_s: float, p: CheckpointIntervalParams) -> float:
    """Young/Daly's ``√(2·C·M)`` within ``[min_interval_s, max_interval_s]``, in seconds."""
    return min(max(math.sqrt(2.0 * cost_s * mtbf_s), p.min_interval_s), p.max_interval_s)


class CheckpointIntervalPolicy:
    """Order checkpoints at Young/Daly's interval, from the job's measured cost and failures."""

    name = "checkpoint"
    doc = "order a checkpoint every √(2 × save cost × MTBF), from this job's costs and failures"
    Params = CheckpointIntervalParams

    def __init__(self, params: CheckpointIntervalParams) -> None:
        check(params)
        self.params = params

    def decide(self, now: float, state: WeaverState) -> list[Decision]:
        return per_job(state, lambda job: self._job(now, job))

    def _job(self, now: float, job: Job) -> Decision | None:
        p = self.params
        latest = job.config.latest() if job.config else None
        live = job.live_ranks()
        if latest is None or latest.run_state != "running" or not live:
            return None
        if not all(r.checkpointing for r in live):
            return None
        if any(c.state == "pending" for c in job.checkpoints.values()):
            return None
        done = sorted(
            (c for c in job.checkpoints.values() if c.state == "complete"),
            key=lambda c: c.requested_ts,
        )[-p.recent :]
        cost = median([c.stall_s for c in done]) if done else p.cost_prior_s
        cost = max(cost, 1e-3)  # a stall too small to time still costs a write
        started = min(
            (r.entry.joined_ts for r in job.ranks.values() if r.entry.joined_ts > 0), default=now
        )
        observed = max(0.0, now - started)
        mtbf = (p.mtbf_prior_s + observed) / (1 + job.failures)
        every = interval_s(cost, mtbf, p)
        since = max([c.requested_ts for c in job.checkpoints.values()], default=started)
        if now - since < every:
            return None
        return Decision(
            policy=self.name,
            job_id=job.job_id,
            action="checkpoint",
            reason=f"{now - since:.0f} s since the last checkpoint; interval {every:.0f} s = "
            f"√(2 × {cost * 1e3:.0f} ms save cost × {mtbf / 3600:.1f} h MTBF)",
            key=f"{self.name}/{job.job_id}",
            features={
                "interval_s": round(every, 3),
                "cost_s": round(cost, 6),
                "mtbf_s": round(mtbf, 1),
                "failures": job.failures,
                "since_s": round(now - since, 3),
                "ranks": len(live),
            },
        )
