"""Network-aware ``sync_every`` for LocalSGD / DiLoCo.

With ``H = sync_every`` inner steps of compute ``c`` each and an outer allreduce
of ``a`` seconds, communication takes ``f = a / (H·c + a)`` of the wall time.
To hold ``f`` at ``target_comm_frac`` (f*), ``H* = a·(1 − f*) / (f*·c)``. The
ranks report, per outer step, the busy time (``data + compute`` ≈ ``H·c``) and
the ``comm`` time (the sync) through :meth:`Run.mark`; the policy takes the
median over ranks and over the last ``window_s``, and moves ``sync_every``
toward ``H*`` when ``f`` leaves the band ``[target/band, target·band]``, by at
most ``max_step_factor`` per change and within ``[min_sync_every, max_sync_every]``
(and the knob's own bounds and ``multiple_of``). Larger H trades convergence
per sample for throughput (DiLoCo, Douillard et al. 2023; the H sweeps there),
so the bounds are the user's to set.
"""

from __future__ import annotations

import msgspec

from torchloom.weaver.policies.base import Decision, median, per_job
from torchloom.weaver.state import Job, WeaverState


class SyncPeriodParams(msgspec.Struct, kw_only=True):
    """Parameters of the network-aware ``sync_every`` policy.

    Attributes:
        target_comm_frac: share of wall time the outer sync should take, in (0, 1).
        band: act when the measured share is above ``target × band`` or below ``target / band``.
        min_sync_every, max_sync_every: bounds of the inner steps per outer step.
        max_step_factor: the most one change multiplies or divides ``sync_every`` by.
        window_s: the recent past measured (seconds).
        min_samples: flushes with timings needed per rank.
        cooldown_s: no second change within this time (seconds).
    """

    target_comm_frac: float = 0.1
    band: float = 1.5
    min_sync_every: int = 1
    max_sync_every: int = 1000
    max_step_factor: float = 2.0
    window_s: float = 10.0
    min_samples: int = 3
    cooldown_s: float = 20.0


def check(p: SyncPeriodParams) -> None:
    if not 0.0 < p.target_comm_frac < 1.0 or p.band <= 1.0 or p.max_step_factor <= 1.0:
        raise ValueError("target_comm_frac in (0, 1), band > 1, max_step_factor > 1")
    if not 1 <= p.min_sync_every <= p.max_sync_every:
        raise ValueError("1 <= min_sync_every <= max_sync_every")


def proposal(
    sync_every: int, busy_s: float, comm_s: float, p: SyncPeriodParams, *, multiple_of: int = 1
) -> int | None:
    """The new ``sync_every`` for the measured busy and comm seconds per outer step, or None."""
    if busy_s <= 0 or comm_s < 0:
        return None
    frac = comm_s / (busy_s + comm_s)
    f = p.target_comm_frac
    if f / p.band <= frac <= f * p.band:
        return None
    per_inner = busy_s / sync_every
    ideal = comm_s * (1 - f) / (f * per_inner) if comm_s > 0 else p.max_sync_every
    lo, hi = sync_every / p.max_step_factor, sync_every * p.max_step_factor
    target = min(max(ideal, lo, p.min_sync_every), hi, p.max_sync_every)
    new = max(multiple_of, round(target / multiple_of) * multiple_of)
    return new if new != sync_every else None


class SyncPeriodPolicy:
    """Hold the outer sync's share of wall time near a target by moving ``sync_every``."""

    name = "sync_every"
    doc = "DiLoCo/LocalSGD: move sync_every so the outer allreduce takes ~target_comm_frac of wall time"
    Params = SyncPeriodParams

    def __init__(self, params: SyncPeriodParams) -> None:
        check(params)
        self.params = params

    def decide(self, now: float, state: WeaverState) -> list[Decision]:
        return per_job(state, lambda job: self._job(now, job))

    def _job(self, now: float, job: Job) -> Decision | None:
        p = self.params
        latest = job.config.latest() if job.config else None
        if latest is None or latest.run_state != "running" or job.config is None:
            return None
        current = latest.values.get("sync_every")
        spec = job.config.knobs.get("sync_every")
        if not isinstance(current, int) or spec is None:
            return None
        busy, comm = [], []
        for rank in job.live_ranks():
            # only outer steps run under the current sync_every
            w = [
                t
                for t in rank.window.timing
                if now - t.ts <= p.window_s
                and t.step >= latest.effective_step
                and t.busy_s is not None
                and t.comm_s is not None
            ]
            if len(w) < p.min_samples:
                return None  # judge only when every rank has timings
            busy.append(median([t.busy_s for t in w if t.busy_s is not None]))
            comm.append(median([t.comm_s for t in w if t.comm_s is not None]))
        if not busy:
            return None
        b, c = median(busy), median(comm)
        lo = max(p.min_sync_every, int(spec.min or 1))
        hi = min(p.max_sync_every, int(spec.max or p.max_sync_every))
        bounded = msgspec.structs.replace(p, min_sync_every=lo, max_sync_every=max(lo, hi))
        new = proposal(current, b, c, bounded, multiple_of=spec.multiple_of or 1)
        if new is None:
            return None
        frac = c / (b + c)
        return Decision(
            policy=self.name,
            job_id=job.job_id,
            action="set",
            values={"sync_every": new},
            reason=f"outer sync takes {frac:.0%} of wall time ({c * 1000:.0f} ms per outer step against "
            f"{b * 1000:.0f} ms of compute), target {p.target_comm_frac:.0%}: sync_every {current} → {new}",
            key=f"{self.name}/{job.job_id}",
            features={
                "sync_every": current,
                "busy_s": round(b, 6),
                "comm_s": round(c, 6),
                "comm_frac": round(frac, 4),
                "proposed": new,
                "ranks": len(busy),
            },
        )
