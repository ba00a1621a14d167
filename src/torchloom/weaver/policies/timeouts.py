"""Timeouts that follow the run: torchft's collective and quorum timeouts and the Weaver's
failure and hang timeouts, set from what the ranks measurably take.

A fixed timeout is a guess: too short and a slow-but-alive replica group (a throttled device,
a host that swaps, a stop-the-world pause) is cut off — its peers' allreduce times out, the
step is not committed, the Weaver declares it failed — over and over; too long and a dead
group stalls everyone for the whole timeout. This policy measures, over the last
``window_s`` of every live rank:

- the longest *stall*: the longest time between two telemetry flushes that saw progress (a
  lower bound on the longest step, to the flush interval);
- the longest *silence*: the longest gap between two heartbeats (a stopped or starved process:
  ``RankWindow.silences``);

and proposes ``margin ×`` those (the same high-percentile × margin rule as the
"dynamic timeout" of NVIDIA resiliency-ext's in-job restarts and of Meta's Llama 3 training
report), within floors and ceilings:

- ``collective_timeout_s`` and ``quorum_timeout_s`` (torchft jobs that register them): from
  the stall and the silence;
- ``failure_timeout_s`` (heartbeats): from the silence — a crash is still seen at once by its
  closed connection (``torchloom up`` watches connections), so a longer heartbeat timeout costs
  only the time to notice a hung host;
- ``hang_timeout_s`` (step not moving): from the stall.

It changes a timeout when the proposal differs from the one in force by more than
``change_ratio``, as one job-wide version; the reason names the numbers. Up at once; down only
to ``1/change_ratio`` of it per change, and only while the job is *calm* (:func:`calm`): every
rank it knows has been training for the whole window and none failed, left or (re)joined in
it — a restarted process's silences start afresh and a failed group's are gone, so without
this rule a slow group that crashed once would have its timeouts lowered by its calm peers'
view and be cut off again. A dead group is still found fast again once the run is calm.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec

from torchloom.weaver.policies.base import Decision, per_job
from torchloom.weaver.state import Job, LivenessConfig, WeaverState


class TimeoutParams(msgspec.Struct, kw_only=True):
    """Parameters of the timeouts policy (seconds unless said).

    Attributes:
        margin: a timeout is this many times the longest wait measured.
        window_s: the recent past measured.
        min_samples: flushes with progress needed per rank before judging.
        min_collective_timeout_s, max_collective_timeout_s: bounds of torchft's timeouts.
        min_failure_timeout_s, max_failure_timeout_s: bounds of the heartbeat timeout.
        min_hang_timeout_s, max_hang_timeout_s: bounds of the hang timeout.
        change_ratio: act when a proposal is this factor above or below the timeout in force.
        cooldown_s: no second change within this time.
    """

    margin: float = 3.0
    window_s: float = 30.0
    min_samples: int = 5
    min_collective_timeout_s: float = 2.0
    max_collective_timeout_s: float = 600.0
    min_failure_timeout_s: float = 0.8
    max_failure_timeout_s: float = 120.0
    min_hang_timeout_s: float = 30.0
    max_hang_timeout_s: float = 3600.0
    change_ratio: float = 1.5
    cooldown_s: float = 10.0


def check(p: TimeoutParams) -> None:
    if p.margin < 1.0 or p.change_ratio <= 1.0 or p.window_s <= 0 or p.min_samples < 1:
        raise ValueError("margin >= 1, change_ratio > 1, window_s > 0, min_samples >= 1")
    for lo, hi in (
        (p.min_collective_timeout_s, p.max_collective_timeout_s),
        (p.min_failure_timeout_s, p.max_failure_timeout_s),
        (p.min_hang_timeout_s, p.max_hang_timeout_s),
    ):
        if not 0 < lo <= hi:
            raise ValueError("each timeout's floor must be > 0 and <= its ceiling")


def measure(job: Job, now: float, p: TimeoutParams) -> tuple[float, float, int] | None:
    """``(longest stall s, longest silence s, ranks measured)`` over the live training ranks,
    or None while any of them has fewer than ``min_samples`` flushes with progress in the
    window (judge only with every rank's view)."""
    stall = silence = 0.0
    n = 0
    for rank in job.live_ranks():
        if rank.state not in ("training", "suspect"):
            continue
        ts = [t for t in rank.window.timing_ts if now - t <= p.window_s]
        if len(ts) < p.min_samples:
            return None
        stall = max(stall, max(b - a for a, b in itertools.pairwise(ts)))
        stall = max(stall, max(t.step_s for t in rank.window.timing if now - t.ts <= p.window_s))
        silence = max([silence, *(g for t, g in rank.window.silences if now - t <= p.window_s)])
        n += 1
    return (stall, silence, n) if n else None


def calm(job: Job, now: float, p: TimeoutParams) -> bool:
    """True when every rank of ``job`` has been live and training (or suspect) since at least
    ``window_s`` ago and none failed or exited within it: the measured window is then every
    rank's whole window, and a timeout may go down."""
    for rank in job.ranks.values():
        if rank.live:
            if rank.state not in ("training", "suspect") or now - rank.entry.joined_ts < p.window_s:
                return False
        elif now - rank.entry.state_since_ts < p.window_s:
            return False
    return True


def _bounded(x: float, lo: float, hi: float) -> float:
    return round(min(max(x, lo), hi), 1)


class TimeoutPolicy:
    """Set torchft's and the Weaver's timeouts from measured stalls and silences (module doc)."""

    name = "timeouts"
    doc = "collective/quorum/failure/hang timeouts = margin × the longest measured stall or silence"
    Params = TimeoutParams

    def __init__(self, params: TimeoutParams) -> None:
        check(params)
        self.params = params

    def decide(self, now: float, state: WeaverState) -> list[Decision]:
        return per_job(state, lambda job: self._job(now, state, job))

    def proposals(
        self,
        job: Job,
        values: dict[str, Any],
        weaver: LivenessConfig,
        stall: float,
        silence: float,
        *,
        lower: bool,
    ) -> dict[str, tuple[float, float]]:
        """``{knob: (in force, proposed)}`` of every timeout this job has that should move;
        down (to at most ``1/change_ratio`` of the one in force) only with ``lower``."""
        p = self.params
        wait = max(stall, silence)
        want = {
            "collective_timeout_s": _bounded(
                p.margin * wait, p.min_collective_timeout_s, p.max_collective_timeout_s
            ),
            "failure_timeout_s": _bounded(
                p.margin * silence, p.min_failure_timeout_s, p.max_failure_timeout_s
            ),
            "hang_timeout_s": _bounded(
                p.margin * stall, p.min_hang_timeout_s, p.max_hang_timeout_s
            ),
        }
        want["quorum_timeout_s"] = want["collective_timeout_s"]
        defaults = {
            "failure_timeout_s": weaver.failure_timeout_s,
            "hang_timeout_s": weaver.hang_timeout_s,
        }
        out = {}
        assert job.config is not None
        for knob, new in want.items():
            if knob not in job.config.knobs:
                continue
            current = values.get(knob)
            if current is None and knob not in defaults:
                continue  # torchft's timeouts: only a job that registered them (a torchft job)
            in_force = float(current if current is not None else defaults[knob])
            if new > in_force * p.change_ratio:
                out[knob] = (in_force, new)
            elif lower and new < in_force / p.change_ratio:
                out[knob] = (in_force, max(new, round(in_force / p.change_ratio, 1)))
        return out

    def _job(self, now: float, state: WeaverState, job: Job) -> Decision | None:
        latest = job.config.latest() if job.config else None
        if latest is None or latest.run_state != "running":
            return None
        measured = measure(job, now, self.params)
        if measured is None:
            return None
        stall, silence, n = measured
        moves = self.proposals(
            job,
            dict(latest.values),
            state.liveness,
            stall,
            silence,
            lower=calm(job, now, self.params),
        )
        if not moves:
            return None
        changes = ", ".join(f"{k} {old:g} → {new:g} s" for k, (old, new) in sorted(moves.items()))
        return Decision(
            policy=self.name,
            job_id=job.job_id,
            action="set",
            values={k: new for k, (_, new) in moves.items()},
            reason=f"longest stall {stall:.2f} s, longest heartbeat silence {silence:.2f} s over "
            f"{n} rank(s) in the last {self.params.window_s:g} s (× {self.params.margin:g}): {changes}",
            key=f"{self.name}/{job.job_id}",
            features={
                "stall_s": round(stall, 4),
                "silence_s": round(silence, 4),
                "ranks": n,
                **{f"{k}_before": old for k, (old, _) in moves.items()},
                **{k: new for k, (_, new) in moves.items()},
            },
        )
