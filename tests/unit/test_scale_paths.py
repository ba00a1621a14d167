"""The Weaver's paths that keep it cheap at thousands of ranks give the same answers as the
plain ones: the intake histogram, the leave-one-out median, the straggler rule beyond
EXACT_UP_TO ranks, memoised device risks and baselines, coalesced terminal lines."""

from __future__ import annotations

import random
import statistics

import pytest

from tests.unit.test_policies import JOB, feed, make_state, run_timing, tel
from torchloom.cli.render import event_lines
from torchloom.protocol import HistoryEvent, MetricPoint
from torchloom.weaver.ingest import LAG_BOUNDS_S, IngestStats
from torchloom.weaver.policies.base import median_without
from torchloom.weaver.policies.divergence import DivergenceParams, DivergencePolicy
from torchloom.weaver.policies.failure import DeviceMemo, FailureParams, device_risks
from torchloom.weaver.policies.straggler import EXACT_UP_TO, StragglerParams, assess


def test_intake_histogram_counts_and_quantiles() -> None:
    stats = IngestStats()
    assert stats.lag_quantile_s(0.5) is None
    rng = random.Random(1)
    lags = [rng.uniform(0.001, 0.05) for _ in range(5000)] + [2.0] * 10 + [-0.01]
    for lag in lags:
        stats.observe(nbytes=100, lag_s=lag)
    assert stats.messages == len(lags) and stats.bytes == 100 * len(lags)
    assert sum(stats.lag_counts) == len(lags)
    exact = sorted(max(0.0, x) for x in lags)
    for q in (0.5, 0.9, 0.99):
        got = stats.lag_quantile_s(q)
        assert got is not None
        assert abs(got - exact[int(q * len(exact))]) <= 0.34 * exact[int(q * len(exact))]
    assert stats.lag_quantile_s(1.0) == pytest.approx(2.0, rel=0.34)
    earlier = stats.copy()
    stats.observe(nbytes=7, lag_s=150.0)  # beyond the last bound: counted in the overflow
    later = stats.since(earlier)
    assert later.messages == 1 and later.bytes == 7 and later.lag_counts[-1] == 1
    assert later.lag_quantile_s(0.5) == LAG_BOUNDS_S[-1]
    with pytest.raises(ValueError):
        stats.lag_quantile_s(0.0)


def test_median_without_matches_the_median_of_the_rest() -> None:
    rng = random.Random(2)
    for n in range(2, 30):
        xs = sorted(rng.choice([rng.random(), 0.5]) for _ in range(n))
        for j in range(n):
            assert median_without(xs, j) == pytest.approx(statistics.median(xs[:j] + xs[j + 1 :]))
    with pytest.raises(ValueError):
        median_without([1.0], 0)


def test_straggler_beyond_exact_up_to_flags_only_the_slow_ranks() -> None:
    n = EXACT_UP_TO * 3
    state = make_state(n)
    rng = random.Random(3)
    slow = {"7", "100"}
    t = run_timing(
        state,
        0.0,
        4.0,
        lambda rid, t: 0.02 * (1.5 if rid in slow else 1.0) * rng.uniform(0.95, 1.05),
    )
    scores = assess(state.jobs[JOB], t, StragglerParams())
    assert len(scores) == n
    assert {k[1] for k, a in scores.items() if a.flagged} == slow


def test_memoised_device_risks_match_the_plain_ones() -> None:
    p = FailureParams()
    rng = random.Random(4)
    samples = []
    memo = DeviceMemo()
    for i in range(80):
        temp = 60.0 + rng.gauss(0, 0.5) + (25.0 if i >= 70 else 0.0)
        samples.append((float(i), {"temp_c": temp, "power_w": 300.0 + rng.gauss(0, 2)}))
        window = samples[-64:]
        memoised = device_risks(window, p, last=3, memo=memo)
        plain = device_risks(window, p, last=3)
        assert [r.score > 0 for r in memoised] == [r.score > 0 for r in plain]
        assert [r.score for r in memoised] == pytest.approx([r.score for r in plain], abs=0.15)
    assert memoised[-1].score >= 0.5 and len(memo.risks) <= 6


def test_divergence_baseline_is_reused_and_still_sees_a_spike_and_a_nan() -> None:
    state = make_state(1)
    policy = DivergencePolicy(DivergenceParams())
    rng = random.Random(5)
    for step in range(300):
        feed(
            state,
            "0",
            tel("0", step, points=[MetricPoint(step, 0.0, {"loss": 1.0 + rng.gauss(0, 0.01)})]),
            step,
        )
        assert policy.decide(float(step), state) == []
    for step in range(300, 306):
        feed(state, "0", tel("0", step, points=[MetricPoint(step, 0.0, {"loss": 3.0})]), step)
    (d,) = policy.decide(306.0, state)
    assert d.features["trigger"] == "spike" and d.values["lr"] == pytest.approx(0.05)
    feed(state, "0", tel("0", 306, points=[MetricPoint(306, 0.0, {"loss": None})]), 306.0)
    (d,) = DivergencePolicy(DivergenceParams()).decide(306.5, state)
    assert d.features["trigger"] == "nonfinite"


def test_a_storm_of_events_prints_a_few_lines_and_a_count() -> None:
    events = [
        HistoryEvent(job_id="j", kind="rank_joined", ts=0.0, message=f"rank 0/{i} joined")
        for i in range(10_000)
    ] + [HistoryEvent(job_id="j", kind="config_set", ts=0.0, message="v2")]
    lines = [str(line) for line in event_lines(events, max_per_kind=5)]
    assert len(lines) == 7
    assert "rank 0/4 joined" in lines[4] and "v2" in lines[5]
    assert "9995 more" in lines[6] and "rank_joined" in lines[6]
