"""Failure prediction and proactive drain (after SuperBench's proactive validation and replacement).

Each rank's Threadlet samples its device's health (NVML on a GPU, psutil on a
CPU host; :mod:`torchloom.threadlet.device`). A risk score in [0, 1] per device
combines independent findings as a noisy-OR, ``1 − Π(1 − rᵢ)``:

* **rules** (absolute thresholds, :data:`RULES`): uncorrectable ECC errors, pages
  pending retirement and critical XID errors (1.0 / 0.9), temperature at or above
  ``temp_crit_c`` (0.9) or ``temp_warn_c`` (0.5), hardware/thermal throttling (0.5),
  corrected ECC errors growing faster than ``ecc_per_min`` (0.7), host memory nearly
  full (0.8);
* an **online anomaly model**: the robust z-score (median/MAD) of each signal's
  newest value against the device's own recent samples. It counts only once the rank
  has run ``warmup_s`` (memory, power and temperature ramp when training starts), only
  for a move of at least :data:`ANOMALY_MIN_DELTA` in the signal's own unit (a flat
  signal's tiny MAD makes any wiggle a huge z), and it adds at most
  ``anomaly_max_risk`` — below ``drain_risk``: an anomaly alone is shown, never acted on;
  with a rule's finding it can tip the device over.

When a device's risk stays at ``drain_risk`` or more for ``sustain_samples``
samples in a row, the replica group on it is drained with a replacement
(``torchloom run`` starts a fresh group) before the device fails. A healthy run drains
nothing: ``tests/unit/test_failure_healthy.py`` replays the device samples of a real
2-minute MNIST run on this project's CPU machines.
Validated on synthetic degradation traces only (``TORCHLOOM_DEVICE_TRACE``, the
simulator); the NVML read path has not met a failing GPU.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from torchloom.weaver.policies.base import Decision, mad, median
from torchloom.weaver.state import RankKey, WeaverState

CRITICAL_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95})
"""XID errors that mean the GPU is failing (DBE ECC, page retirement, NVLink, fell off the bus, …)."""

RULES = {
    "ecc_uncorrected": "uncorrectable ECC errors > 0 → 1.0",
    "retired_pages_pending": "pages pending retirement → 0.9",
    "xid": f"a critical XID ({', '.join(map(str, sorted(CRITICAL_XIDS)))}) → 1.0",
    "temp_c": "temperature ≥ temp_crit_c → 0.9, ≥ temp_warn_c → 0.5",
    "throttle_hw": "hardware or thermal clock throttling → 0.5",
    "ecc_corrected": "corrected ECC errors growing ≥ ecc_per_min → 0.7",
    "mem_used_frac": "host memory ≥ 97 % used → 0.8",
}
"""The documented rules of the risk score (signal → rule)."""

ANOMALY_SIGNALS = ("temp_c", "power_w", "ecc_corrected", "mem_used_frac", "swap_used_frac")
ANOMALY_MIN_DELTA = {
    "temp_c": 8.0,
    "power_w": 50.0,
    "ecc_corrected": 1.0,
    "mem_used_frac": 0.10,
    "swap_used_frac": 0.10,
}
"""The least rise above its recent median that the anomaly model counts, per signal (°C, W,
errors, fractions): a step in host memory from 6.6 % to 7.7 % used is 13 robust σ of a flat
signal, and no failure sign."""


class FailureParams(msgspec.Struct, kw_only=True):
    """Parameters of failure prediction.

    Attributes:
        drain_risk: risk at or above which a device counts as failing, in [0, 1].
        sustain_samples: consecutive samples at that risk before draining.
        temp_warn_c: temperature from which a device's risk is at least 0.5, °C.
        temp_crit_c: temperature from which it is at least 0.9, °C.
        ecc_per_min: corrected ECC errors per minute that count as a failing memory.
        z_warn: robust z-score where the anomaly model starts to add risk.
        z_crit: robust z-score where its risk reaches ``anomaly_max_risk``.
        anomaly_max_risk: the most risk the anomaly model adds, in [0, 1).
        warmup_s: seconds after a rank joins before the anomaly model judges its device.
        min_baseline: samples of a signal needed before the anomaly model judges it.
        replace: ask for a replacement replica group when draining.
        cooldown_s: no second drain of the same replica group within this time (seconds).
    """

    drain_risk: float = 0.8
    sustain_samples: int = 3
    temp_warn_c: float = 83.0
    temp_crit_c: float = 90.0
    ecc_per_min: float = 100.0
    z_warn: float = 6.0
    z_crit: float = 12.0
    anomaly_max_risk: float = 0.6
    warmup_s: float = 60.0
    min_baseline: int = 10
    replace: bool = True
    cooldown_s: float = 60.0


def check(p: FailureParams) -> None:
    if not 0.0 < p.drain_risk <= 1.0 or p.sustain_samples < 1:
        raise ValueError("drain_risk must be in (0, 1] and sustain_samples >= 1")
    if p.temp_warn_c >= p.temp_crit_c or p.z_warn >= p.z_crit:
        raise ValueError("temp_warn_c < temp_crit_c and z_warn < z_crit are needed")
    if not 0.0 <= p.anomaly_max_risk < 1.0 or p.warmup_s < 0:
        raise ValueError("anomaly_max_risk must be in [0, 1) and warmup_s >= 0")


@dataclass(frozen=True, slots=True)
class Risk:
    """A device's failure risk from one sample: the score and the reasons behind it."""

    score: float
    reasons: tuple[str, ...]


def rule_risk(
    sample: dict[str, float],
    previous: tuple[float, dict[str, float]] | None,
    now: float,
    p: FailureParams,
) -> Risk:
    """The rules' risk for one sample (``previous``: the sample before, for rates)."""
    parts: list[tuple[float, str]] = []
    if sample.get("ecc_uncorrected", 0) > 0:
        parts.append((1.0, f"{sample['ecc_uncorrected']:.0f} uncorrectable ECC errors"))
    if sample.get("retired_pages_pending", 0) >= 1:
        parts.append((0.9, "pages pending retirement"))
    if int(sample.get("xid", 0)) in CRITICAL_XIDS:
        parts.append((1.0, f"XID {int(sample['xid'])}"))
    temp = sample.get("temp_c")
    if temp is not None and temp >= p.temp_crit_c:
        parts.append((0.9, f"{temp:.0f} °C ≥ {p.temp_crit_c:g} °C"))
    elif temp is not None and temp >= p.temp_warn_c:
        parts.append((0.5, f"{temp:.0f} °C ≥ {p.temp_warn_c:g} °C"))
    if sample.get("throttle_hw", 0) >= 1:
        parts.append((0.5, "clocks throttled (hardware/thermal)"))
    if previous is not None and "ecc_corrected" in sample and "ecc_corrected" in previous[1]:
        dt_min = max(now - previous[0], 1e-3) / 60.0
        rate = (sample["ecc_corrected"] - previous[1]["ecc_corrected"]) / dt_min
        if rate >= p.ecc_per_min:
            parts.append((0.7, f"corrected ECC errors +{rate:.0f}/min"))
    if sample.get("mem_used_frac", 0) >= 0.97 and "cpu_util" in sample:
        parts.append((0.8, f"host memory {sample['mem_used_frac']:.0%} used"))
    if not parts:
        return Risk(0.0, ())
    return Risk(noisy_or(s for s, _ in parts), tuple(r for _, r in parts))


def noisy_or(scores: Iterable[float]) -> float:
    """``1 − Π(1 − sᵢ)``: independent findings, each a probability of failing, combined."""
    keep = 1.0
    for score in scores:
        keep *= 1.0 - score
    return 1.0 - keep


def signal_baselines(
    history: list[dict[str, float]], p: FailureParams
) -> dict[str, tuple[float, float]]:
    """Per anomaly signal with ``min_baseline`` past values: ``(median, σ)`` of its past,
    σ = 1.4826·MAD floored at 1 % of the mean (so a flat signal's noise is not a huge score)."""
    out = {}
    for name in ANOMALY_SIGNALS:
        past = [h[name] for h in history if name in h]
        if len(past) >= p.min_baseline:
            c = median(past)
            floor = max(1e-6, 0.01 * abs(sum(past) / len(past)))
            out[name] = (c, max(1.4826 * mad(past, c), floor))
    return out


def anomaly_risk(
    history: list[dict[str, float]],
    sample: dict[str, float],
    p: FailureParams,
    *,
    baselines: dict[str, tuple[float, float]] | None = None,
) -> Risk:
    """The anomaly model's risk: the largest robust z of a signal against its own past
    (``baselines``: :func:`signal_baselines` of ``history`` when already at hand)."""
    best, why = 0.0, ""
    base = signal_baselines(history, p) if baselines is None else baselines
    for name, (c, sigma) in base.items():
        if name not in sample or sample[name] - c < ANOMALY_MIN_DELTA.get(name, 0.0):
            continue
        z = (sample[name] - c) / sigma
        if z > best:
            best, why = z, f"{name} {sample[name]:.4g} is {z:.1f} robust σ above its recent median"
    if best <= p.z_warn:
        return Risk(0.0, ())
    top = p.anomaly_max_risk
    return Risk(min(top, top * (best - p.z_warn) / (p.z_crit - p.z_warn)), (why,))


REFRESH_SAMPLES = 10
"""A device's signal baselines are worked out again after this many new samples."""


@dataclass(slots=True)
class DeviceMemo:
    """What the failure policy already worked out for one rank's device: the risk of each
    recent sample (by its time) and the signals' baselines, refreshed every
    ``REFRESH_SAMPLES`` samples — each sample is judged once, in O(signals).

    :func:`assess` starts each rank's ``baseline_age`` at its own phase (0 …
    ``REFRESH_SAMPLES`` - 1), so ranks that sample in step refresh over several rounds,
    not all in one. ``newest`` is the assessment at the newest sample (its time, risk,
    streak): a round in which the device sent nothing new costs O(1).
    """

    risks: dict[float, Risk] = field(default_factory=dict)
    baselines: dict[str, tuple[float, float]] = field(default_factory=dict)
    baseline_age: int = REFRESH_SAMPLES
    newest: tuple[float, Risk, int] | None = None


def _past(samples: list[tuple[float, dict[str, float]]], i: int) -> list[dict[str, float]]:
    """Up to 60 samples before sample ``i``: the anomaly model's history."""
    return [s for _, s in samples[max(0, i - 60) : i]]


def device_risks(
    samples: list[tuple[float, dict[str, float]]],
    p: FailureParams,
    *,
    last: int,
    memo: DeviceMemo | None = None,
    started_ts: float = 0.0,
) -> list[Risk]:
    """The risk of each of the ``last`` newest samples of one device's window (oldest first),
    each judged by the rules and, from ``started_ts + warmup_s`` on (``started_ts``: when the
    rank joined, s), against the samples before it (``memo``: reuse and keep what earlier
    rounds worked out)."""
    out = []
    for i in range(max(0, len(samples) - last), len(samples)):
        ts, sample = samples[i]
        if memo is not None and ts in memo.risks:
            out.append(memo.risks[ts])
            continue
        rules = rule_risk(sample, samples[i - 1] if i else None, ts, p)
        if ts < started_ts + p.warmup_s:
            anomaly = Risk(0.0, ())
        elif memo is None:
            anomaly = anomaly_risk(_past(samples, i), sample, p)
        else:
            if memo.baseline_age >= REFRESH_SAMPLES:
                memo.baselines, memo.baseline_age = signal_baselines(_past(samples, i), p), 0
            memo.baseline_age += 1
            anomaly = anomaly_risk([], sample, p, baselines=memo.baselines)
        risk = Risk(noisy_or((rules.score, anomaly.score)), rules.reasons + anomaly.reasons)
        if memo is not None:
            memo.risks[ts] = risk
        out.append(risk)
    if memo is not None and len(memo.risks) > 2 * last:
        keep = {ts for ts, _ in samples[-last:]}
        memo.risks = {ts: r for ts, r in memo.risks.items() if ts in keep}
    return out


def assess(
    state: WeaverState, p: FailureParams, memos: dict[RankKey, DeviceMemo] | None = None
) -> dict[RankKey, tuple[Risk, int]]:
    """Each live rank's device risk now, and for how many samples in a row it has been at
    ``drain_risk`` or more (counting up to ``sustain_samples``); ``memos`` (per rank) carry
    work over from earlier rounds."""
    out: dict[RankKey, tuple[Risk, int]] = {}
    for job in state.jobs.values():
        for rank in job.live_ranks():
            window = rank.window.device
            if not window:
                continue
            memo = None
            if memos is not None:
                memo = memos.get(rank.key)
                if memo is None:
                    phase = zlib.crc32(repr(rank.key).encode()) % REFRESH_SAMPLES
                    memo = memos[rank.key] = DeviceMemo(baseline_age=phase)
                elif memo.newest is not None and memo.newest[0] == window[-1][0]:
                    out[rank.key] = memo.newest[1:]
                    continue
            risks = device_risks(
                list(window),
                p,
                last=p.sustain_samples,
                memo=memo,
                started_ts=rank.entry.joined_ts,
            )
            streak = 0
            for r in reversed(risks):
                if r.score < p.drain_risk:
                    break
                streak += 1
            out[rank.key] = (risks[-1], streak)
            if memo is not None:
                memo.newest = (window[-1][0], risks[-1], streak)
    if memos is not None:
        for key in [k for k in memos if k not in out]:
            del memos[key]
    return out


class FailurePolicy:
    """Drain (with replacement) the replica group on a device whose failure risk stays high."""

    name = "failure"
    doc = "device health rules + robust anomaly scores; sustained risk ≥ drain_risk → drain with replacement"
    Params = FailureParams

    def __init__(self, params: FailureParams) -> None:
        check(params)
        self.params = params
        self._memos: dict[RankKey, DeviceMemo] = {}
        self._assessed: tuple[tuple[float, int], dict[RankKey, tuple[Risk, int]]] | None = None

    def assessed(self, state: WeaverState, now: float) -> dict[RankKey, tuple[Risk, int]]:
        """:func:`assess` at ``now``, worked out once per round and carrying each sample's
        risk over from earlier rounds (the dashboard's scores and :meth:`decide` share it, while
        ``state.updates`` has not moved)."""
        if self._assessed is None or self._assessed[0] != (now, state.updates):
            self._assessed = ((now, state.updates), assess(state, self.params, self._memos))
        return self._assessed[1]

    def decide(self, now: float, state: WeaverState) -> list[Decision]:
        p = self.params
        out: list[Decision] = []
        for key, (risk, streak) in sorted(self.assessed(state, now).items()):
            job = state.jobs[key[0]]
            latest = job.config.latest() if job.config else None
            if streak < p.sustain_samples or latest is None or latest.run_state == "stopped":
                continue
            if key[1] in latest.drained:
                continue
            rank = job.ranks[key]
            features: dict[str, Any] = {
                "rank": f"{key[1]}/{key[2]}",
                "device": rank.entry.device,
                "risk": round(risk.score, 3),
                "streak": streak,
                "sample": dict(rank.window.device[-1][1]),
            }
            out.append(
                Decision(
                    policy=self.name,
                    job_id=key[0],
                    action="drain",
                    replica_id=key[1],
                    replace=p.replace,
                    reason=f"device {rank.entry.device} of rank {key[1]}/{key[2]} at failure risk "
                    f"{risk.score:.2f} for {streak} samples ({'; '.join(risk.reasons)}): drain"
                    + (" with replacement" if p.replace else ""),
                    key=f"{self.name}/{key[0]}/{key[1]}",
                    features=features,
                )
            )
        return out
