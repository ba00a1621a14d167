"""Memory-aware batching, job-wide: a rank near its ``max_memory_gb`` budget, or one that ran out
of memory and shrank its own micro-batches, makes ``max_batch_size`` smaller for the whole job.

Each rank's :class:`torchloom.memory.MemoryGuard` logs ``micro_batch`` (its largest micro-batch
of the step), ``mem_peak_gb`` (the step's peak: CUDA's allocator, or on a CPU the measured peak
of that micro-batch) and ``micro_cap`` (the cap it set itself after an out-of-memory retry, 0
when none). Only values logged under the config in force count. The policy then sets

* ``max_batch_size = micro_batch // 2`` when a rank's peak is above ``high_water`` × the budget
  (it is about to run out: the next larger activation or fragmentation would end the step), or
* ``max_batch_size = micro_cap`` when a rank shrank after an out-of-memory error,

the smallest over the ranks, and only when that is below the ``max_batch_size`` in force. The
global batch is the knobs' (``batch_size`` / ``global_batch_size``): only its split into
gradient-accumulation micro-batches changes, on every rank at one effective step — which FSDP
needs (each micro-batch is a collective there) and which keeps the ranks' step times even.
It never raises ``max_batch_size`` again: a person does (``set max_batch_size=off``) once the
budget is larger.
"""

from __future__ import annotations

import msgspec

from torchloom.weaver.policies.base import Decision, per_job
from torchloom.weaver.state import Job, WeaverState


class MemoryParams(msgspec.Struct, kw_only=True):
    """Parameters of the memory policy.

    Attributes:
        high_water: the fraction of ``max_memory_gb`` above which a rank's micro-batch halves.
        cooldown_s: no second change within this time (seconds).
    """

    high_water: float = 0.9
    cooldown_s: float = 2.0


def check(p: MemoryParams) -> None:
    if not 0.0 < p.high_water <= 1.0:
        raise ValueError("high_water must be in (0, 1]")
    if p.cooldown_s < 0:
        raise ValueError("cooldown_s must be >= 0")


class MemoryPolicy:
    """A rank near ``max_memory_gb`` or out of memory → a smaller ``max_batch_size`` job-wide."""

    name = "memory"
    doc = (
        "a rank near max_memory_gb, or out of memory: max_batch_size smaller job-wide (same batch)"
    )
    Params = MemoryParams

    def __init__(self, params: MemoryParams) -> None:
        check(params)
        self.params = params

    def decide(self, now: float, state: WeaverState) -> list[Decision]:
        return per_job(state, self._job)

    def _job(self, job: Job) -> Decision | None:
        latest = job.config.latest() if job.config else None
        if latest is None or latest.run_state != "running":
            return None
        budget = latest.values.get("max_memory_gb")
        if budget is None:
            return None
        current = latest.values.get("max_batch_size")
        found: list[tuple[int, str, str]] = []  # (max_batch_size wanted, rank, why)
        for rank in job.live_ranks():
            if rank.metrics_step < latest.effective_step:
                continue  # nothing logged under this config yet
            m = rank.metrics
            micro, peak, cap = m.get("micro_batch"), m.get("mem_peak_gb"), m.get("micro_cap")
            who = f"{rank.entry.replica_id}/{rank.entry.rank}"
            high = peak is not None and peak > self.params.high_water * budget
            if high and micro is not None and micro > 1:
                found.append((int(micro) // 2, who, f"peak {peak:.3g} GB of {budget:g} GB "
                              f"with micro-batches of {int(micro)}"))  # fmt: skip
                continue
            if cap:
                found.append((int(cap), who, f"ran out of memory and went on in micro-batches "
                              f"of {int(cap)}"))  # fmt: skip
        if not found:
            return None
        want, who, why = min(found)
        if current is not None and want >= current:
            return None
        return Decision(
            policy=self.name,
            job_id=job.job_id,
            action="set",
            values={"max_batch_size": want},
            reason=f"rank {who}: {why}: max_batch_size {current or 'off'} → {want} on every rank "
            "(the batch unchanged, more gradient-accumulation steps)",
            key=f"{self.name}/{job.job_id}",
            features={"rank": who, "max_memory_gb": budget, "max_batch_size": want},
        )
