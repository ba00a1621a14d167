"""Straggler detection and mitigation.

After Megatron-LM's ``StragglerDetector`` and NVIDIA resiliency-ext's straggler
scores (a *relative* score against the other ranks, an *individual* score
against the rank's own best), on the time a rank is busy on its own —
``data + compute`` per step from :meth:`Run.mark` — because in synchronous
training every rank's *total* step time is the slowest rank's: the fast ones
wait in the allreduce. Mitigation by rebalancing follows DynMO (dynamic load
balancing of per-worker work in proportion to measured throughput) while
torchloom holds the global batch constant.

A rank is flagged when, over the last ``window_s`` (a whole window of flushes
since it joined and since the last change of shares: never on its warm-up), at
least ``min_fraction`` of its flushes (and at least ``min_samples``) had a busy time per step of
``slow_ratio`` × the reference or more — the reference being the median of the
other live ranks' window medians — and, with three or more other ranks, when its
window median is also ``min_z`` robust z-scores (median/MAD) above theirs, so a
noisy job is judged by its own spread.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import msgspec

from torchloom.protocol.batching import format_weights, parse_weights
from torchloom.weaver.policies.base import Decision, mad, median_without, robust_z
from torchloom.weaver.state import Job, Rank, RankKey, RankWindow, WeaverState

EXACT_UP_TO = 64
"""Up to this many judged ranks, each is compared with the median and MAD of the others."""

Mitigation = Literal["rebalance", "drain", "alert"]


class StragglerParams(msgspec.Struct, kw_only=True):
    """Parameters of the straggler policy (times in seconds, ratios unitless).

    Attributes:
        slow_ratio: busy time per step, relative to the reference, that counts as slow.
        window_s: the recent past judged; a rank is judged once its flushes since it (or
            the newest rank) joined and since the newest config took effect span this long.
        min_fraction: share of the window's flushes that must be slow.
        min_samples: flushes needed in the window before judging at all.
        min_z: with ≥ 3 other ranks, the robust z-score the rank's median must also reach.
        mitigation: ``rebalance`` (shares of ``global_batch_size`` in proportion to
            measured throughput), ``drain`` (drain the replica group, with a
            replacement, once it has been slow for ``drain_after_s``) or ``alert``.
        drain_after_s: how long a group must stay slow before ``drain`` acts (at most the
            rank window, about 12 s at the default flush interval).
        min_change: rebalance only when a weight moves by more than this fraction.
        cooldown_s: no second action on the same job within this time (the change must
            take effect and fresh timings come in).
    """

    slow_ratio: float = 1.2
    window_s: float = 3.0
    min_fraction: float = 0.75
    min_samples: int = 5
    min_z: float = 3.0
    mitigation: Mitigation = "rebalance"
    drain_after_s: float = 10.0
    min_change: float = 0.05
    cooldown_s: float = 8.0


def check(p: StragglerParams) -> None:
    if p.slow_ratio <= 1.0:
        raise ValueError("slow_ratio must be > 1")
    if not 0.0 < p.min_fraction <= 1.0:
        raise ValueError("min_fraction must be in (0, 1]")
    if p.window_s <= 0 or p.drain_after_s <= 0 or p.cooldown_s < 0 or p.min_samples < 1:
        raise ValueError("window_s, drain_after_s > 0, cooldown_s >= 0, min_samples >= 1")


@dataclass(frozen=True, slots=True)
class Assessment:
    """One rank's straggler scores.

    Attributes:
        busy_s: its median busy (or, without phase marks, total) time per step in the window.
        reference_s: the median of the other live ranks' medians.
        ratio: ``busy_s / reference_s`` (the inverse of resiliency-ext's relative score).
        z: robust z-score of ``busy_s`` among the other ranks (None with < 3 others).
        slow_fraction: share of the window's flushes at ``slow_ratio`` × reference or more.
        slow_for_s: how long its flushes have been slow without a break (s).
        individual: ``busy_s`` over its own best (lowest) busy time per step since its
            timing windows began.
        flagged: a straggler by the rule above.
    """

    busy_s: float
    reference_s: float
    ratio: float
    z: float | None
    slow_fraction: float
    slow_for_s: float
    individual: float
    flagged: bool


def _span(
    window: RankWindow, now: float, p: StragglerParams, since: tuple[int, float]
) -> range | None:
    """Indices of the rank's flushes in the window and since ``since`` (step, ts): those with
    ``now - window_s <= ts <= now``, ``ts > since ts`` and ``step >= since step``, found by
    bisection on the ascending ``timing_ts``/``timing_step`` (O(log window), no loop).

    None while the rank's flushes since ``since`` do not yet reach back a whole window (its
    first one is under ``window_s`` old): a rank that just joined, or a job whose shares just
    changed, is not judged on the first second or two of steps — its warm-up (the first
    quorum and heal, allocator and DataLoader workers starting) — against warmed-up peers."""
    ts, steps = window.timing_ts, window.timing_step
    first = max(bisect.bisect_right(ts, since[1]), bisect.bisect_left(steps, since[0]))
    if first >= len(ts) or ts[first] > now - p.window_s:
        return None
    lo = max(first, bisect.bisect_left(ts, now - p.window_s))
    return range(lo, bisect.bisect_right(ts, now))


def assess(job: Job, now: float, p: StragglerParams) -> dict[RankKey, Assessment]:
    """Straggler scores of every live, training rank of ``job`` with enough recent flushes.

    Only flushes since the newest config took effect and since the newest rank joined
    count: a rebalance or a change of membership changes every group's share, so timings
    from before it do not judge the shares after it — and a rank is judged only once those
    flushes span a whole ``window_s`` (see :func:`_span`).

    Cost: a few bisections and a sort of the window's (≈15) busy times per rank, in C; the
    rest is O(1) per rank plus one sort of the ranks' medians.
    """
    latest = job.config.latest() if job.config else None
    live = job.live_ranks()
    since = (
        latest.effective_step if latest is not None else 0,
        max((r.entry.joined_ts for r in live), default=0.0),
    )
    recent: dict[RankKey, tuple[Rank, list[float]]] = {}
    horizon = now - p.window_s
    for r in live:
        ts = r.window.timing_ts
        # O(1) first: fewer than min_samples flushes can be in the window
        if r.state != "training" or len(ts) < p.min_samples or ts[-p.min_samples] < horizon:
            continue
        span = _span(r.window, now, p, since)
        if span is not None and len(span) >= p.min_samples:
            recent[r.key] = (r, sorted(islice(r.window.busy, span.start, span.stop)))
    medians = {k: _median_sorted(w) for k, (_, w) in recent.items()}
    ordered = sorted(medians.values())
    if len(ordered) < 2:
        return {}
    # Beyond EXACT_UP_TO ranks the spread (MAD) is that of all ranks, the rank's own value
    # included (it moves a median of that many by at most one place): O(N log N), not O(N²).
    spread = mad(ordered) if len(ordered) > EXACT_UP_TO else None
    out: dict[RankKey, Assessment] = {}
    for key, (rank, w) in recent.items():
        m = medians[key]
        ref = median_without(ordered, bisect.bisect_left(ordered, m))
        if ref <= 0:
            continue
        threshold = p.slow_ratio * ref
        fraction = (len(w) - bisect.bisect_left(w, threshold)) / len(w)
        busy = rank.window.busy
        streak = 0.0  # slow without a break, over the rank's whole timing window
        i = len(busy) - 1
        while i >= 0 and busy[i] >= threshold:
            i -= 1
        if i < len(busy) - 1:
            streak = now - rank.window.timing_ts[i + 1]
        if len(ordered) < 4:
            z = None
        elif spread is None:
            others = [v for k, v in medians.items() if k != key]
            z = robust_z(m, others, floor=0.05 * ref)
        else:
            z = (m - ref) / max(1.4826 * spread, 0.05 * ref)
        best = min(rank.window.best_busy, m)
        out[key] = Assessment(
            busy_s=m,
            reference_s=ref,
            ratio=m / ref,
            z=z,
            slow_fraction=fraction,
            slow_for_s=streak,
            individual=m / best if best > 0 else 1.0,
            flagged=fraction >= p.min_fraction and (z is None or z >= p.min_z),
        )
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _median_sorted(xs: list[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2.0


def impact(job: Job, scores: dict[RankKey, Assessment]) -> float | None:
    """Samples per second the job loses to its slowest rank: in synchronous training every step
    waits for it, so were it as fast as its reference the step would be ``busy − reference``
    shorter: ``lost = rate × (step / (step − extra) − 1)``, with ``rate`` the job's samples per
    second (the sum over its ranks) and ``step`` the median step time. None without the numbers.
    """
    if not scores:
        return None
    slow = max(scores.values(), key=lambda a: a.busy_s)
    extra = slow.busy_s - slow.reference_s
    live = job.live_ranks()
    rates = [r.samples_per_s for r in live if r.samples_per_s]
    steps = sorted(r.step_time_s for r in live if r.step_time_s)
    if not rates or not steps:
        return None
    step = steps[len(steps) // 2]
    if extra <= 0:
        return 0.0
    if step <= extra:
        return None
    return sum(rates) * (step / (step - extra) - 1.0)


def _impact_text(lost: float | None) -> str:
    return "" if lost is None else f"; the job loses ~{lost:.0f} samples/s to the slowest"


class StragglerPolicy:
    """Flag ranks that are slow on their own and rebalance, drain or alert (see module doc)."""

    name = "straggler"
    doc = "flag ranks busy ≥ slow_ratio × their peers; rebalance shares of the global batch, drain, or alert"
    Params = StragglerParams

    def __init__(self, params: StragglerParams) -> None:
        check(params)
        self.params = params
        self._assessed: dict[str, tuple[tuple[float, int], dict[RankKey, Assessment]]] = {}

    def assessed(self, job: Job, now: float, updates: int) -> dict[RankKey, Assessment]:
        """:func:`assess` of ``job`` at ``now``, worked out once per round (the dashboard's
        scores and :meth:`decide` share it) — while ``updates`` (``WeaverState.updates``)
        has not moved."""
        cached = self._assessed.get(job.job_id)
        if cached is None or cached[0] != (now, updates):
            cached = self._assessed[job.job_id] = ((now, updates), assess(job, now, self.params))
        return cached[1]

    def decide(self, now: float, state: WeaverState) -> list[Decision]:
        out: list[Decision] = []
        for job in state.jobs.values():
            latest = job.config.latest() if job.config else None
            if latest is None or latest.run_state != "running":
                continue
            scores = self.assessed(job, now, state.updates)
            flagged = {k: a for k, a in scores.items() if a.flagged}
            if not flagged:
                if self.params.mitigation == "rebalance" and latest.values.get("batch_weights"):
                    out += self._rebalance(job, now, scores, flagged)
                continue
            if self.params.mitigation == "rebalance":
                out += self._rebalance(job, now, scores, flagged)
            else:
                out += self._flag(job, flagged, impact(job, scores))
        return out

    def _features(self, key: RankKey, a: Assessment) -> dict[str, Any]:
        return {
            "rank": f"{key[1]}/{key[2]}",
            "busy_s": round(a.busy_s, 6),
            "reference_s": round(a.reference_s, 6),
            "ratio": round(a.ratio, 4),
            "z": None if a.z is None else round(a.z, 3),
            "slow_fraction": round(a.slow_fraction, 3),
            "slow_for_s": round(a.slow_for_s, 3),
            "individual": round(a.individual, 4),
        }

    def _flag(
        self, job: Job, flagged: dict[RankKey, Assessment], lost: float | None = None
    ) -> list[Decision]:
        p = self.params
        out = []
        for key, a in sorted(flagged.items()):
            rid = key[1]
            why = (
                f"rank {rid}/{key[2]} is a straggler: {a.busy_s * 1000:.1f} ms busy per step, "
                f"{a.ratio:.2f}× its peers' {a.reference_s * 1000:.1f} ms "
                f"(slow in {a.slow_fraction:.0%} of the last {p.window_s:g} s)" + _impact_text(lost)
            )
            drain = p.mitigation == "drain" and a.slow_for_s >= p.drain_after_s
            out.append(
                Decision(
                    policy=self.name,
                    job_id=job.job_id,
                    action="drain" if drain else "alert",
                    replica_id=rid,
                    replace=drain,
                    reason=f"{why}; slow for {a.slow_for_s:.1f} s: drain with replacement"
                    if drain
                    else why,
                    key=f"{self.name}/{job.job_id}/{'drain' if drain else 'alert'}/{rid}",
                    features={**self._features(key, a), "lost_samples_per_s": _round(lost)},
                )
            )
        return out

    def _rebalance(
        self, job: Job, now: float, scores: dict[RankKey, Assessment], flagged: dict[RankKey, Any]
    ) -> list[Decision]:
        """New ``batch_weights`` ∝ each group's samples per busy second, when they moved enough."""
        assert job.config is not None
        latest = job.config.latest()
        assert latest is not None
        global_batch = latest.values.get("global_batch_size")
        lost = impact(job, scores)
        if not global_batch:
            return self._flag(job, flagged, lost) if flagged else []
        groups: dict[str, float] = {}  # replica group → its slowest rank's busy time per step
        for key, a in scores.items():
            groups[key[1]] = max(groups.get(key[1], 0.0), a.busy_s)
        live_groups = {r.entry.replica_id for r in job.live_ranks()}
        if set(groups) != live_groups or len(groups) < 2:
            return []  # judge only with timings of every group
        try:
            current = parse_weights(latest.values.get("batch_weights"))
        except ValueError:
            current = {}
        w_now = {g: current.get(g, 1.0) for g in groups}
        total_w = sum(w_now.values())
        throughput = {g: (w_now[g] / total_w) * global_batch / groups[g] for g in groups}
        mean_t = sum(throughput.values()) / len(throughput)
        w_new = {g: t / mean_t for g, t in throughput.items()}
        spread = max(groups.values()) / min(groups.values())
        moved = max(abs(w_new[g] / (w_now[g] / (total_w / len(w_now))) - 1) for g in groups)
        if (not flagged and spread < self.params.slow_ratio) or moved <= self.params.min_change:
            return []
        text = format_weights(w_new)
        slow = ", ".join(f"{k[1]}/{k[2]} {a.ratio:.2f}×" for k, a in sorted(flagged.items()))
        why = (
            (f"straggler(s) {slow}: " if flagged else f"busy times {spread:.2f}× apart: ")
            + f"batch_weights={text} (samples per busy second {', '.join(f'{g}: {t:.0f}' for g, t in sorted(throughput.items()))}; global batch {global_batch} held)"
            + _impact_text(lost)
        )
        features: dict[str, Any] = {
            "global_batch_size": global_batch,
            "busy_s": {g: round(b, 6) for g, b in sorted(groups.items())},
            "weights_before": {g: round(w, 4) for g, w in sorted(w_now.items())},
            "weights_after": {g: round(w, 4) for g, w in sorted(w_new.items())},
            "spread": round(spread, 4),
            "flagged": sorted(f"{k[1]}/{k[2]}" for k in flagged),
            "lost_samples_per_s": _round(lost),
        }
        return [
            Decision(
                policy=self.name,
                job_id=job.job_id,
                action="set",
                values={"batch_weights": text},
                reason=why,
                key=f"{self.name}/{job.job_id}/rebalance",
                features=features,
            )
        ]
