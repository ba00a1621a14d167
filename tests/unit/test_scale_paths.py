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
from torchloom.weaver.policies.failure import (
    DeviceMemo,
    FailureParams,
    FailurePolicy,
    device_risks,
)
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


def _plain_assess(job, now, p):  # the straggler rule read straight off its definition
    latest = job.config.latest()
    live = job.live_ranks()
    since_step = latest.effective_step
    since_ts = max(r.entry.joined_ts for r in live)
    windows = {}
    for r in live:
        admissible = [t for t in r.window.timing if t.ts > since_ts and t.step >= since_step]
        w = [t for t in admissible if now - p.window_s <= t.ts <= now]
        if len(w) >= p.min_samples and admissible[0].ts <= now - p.window_s:
            windows[r.key] = [t.busy_s for t in w]
    medians = {k: statistics.median(w) for k, w in windows.items()}
    out = {}
    for k, w in windows.items():
        ref = statistics.median([m for j, m in medians.items() if j != k])
        out[k] = (medians[k], ref, sum(b >= p.slow_ratio * ref for b in w) / len(w))
    return out


def test_straggler_bisection_matches_a_plain_scan_of_the_windows() -> None:
    rng = random.Random(6)
    p = StragglerParams()
    for trial in range(20):
        state = make_state(rng.randint(2, 9), effective_step=rng.choice([0, 20, 40]))
        t = run_timing(
            state, 0.0, rng.uniform(1.0, 6.0), lambda rid, t: 0.02 * rng.uniform(0.8, 1.6)
        )
        now = t - rng.uniform(0.0, 2.0)  # the window may end before the newest flush
        got = assess(state.jobs[JOB], now, p)
        plain = _plain_assess(state.jobs[JOB], now, p)
        assert set(got) == set(plain), trial
        for k, (m, ref, fraction) in plain.items():
            a = got[k]
            assert (a.busy_s, a.reference_s, a.slow_fraction) == pytest.approx((m, ref, fraction))


def test_a_flush_whose_step_goes_back_starts_the_timing_windows_afresh() -> None:
    state = make_state(1)
    window = state.jobs[JOB].ranks[(JOB, "0", 0)].window
    for step in range(10, 20):
        feed(state, "0", tel("0", step, busy=0.01 if step == 12 else 0.02), step / 10)
    assert len(window.timing) == 10 and window.best_busy == 0.01
    feed(state, "0", tel("0", 3, busy=0.03), 2.1)  # a restarted process, from a checkpoint
    assert list(window.timing_step) == [3] and list(window.busy) == [0.03]
    assert window.best_busy == 0.03 and len(window.timing) == len(window.timing_ts) == 1


def test_divergence_baselines_are_worked_out_a_bounded_number_per_round(monkeypatch) -> None:
    from torchloom.weaver.policies import divergence

    n = divergence.BASELINES_PER_ROUND * 2 + 10
    state = make_state(n)
    rng = random.Random(7)
    for step in range(60):
        for g in range(n):
            point = MetricPoint(step, 0.0, {"loss": 1.0 + rng.gauss(0, 0.01)})
            feed(state, str(g), tel(str(g), step, points=[point]), step / 10)
    last = str(n - 1)
    for step in range(60, 66):
        feed(state, last, tel(last, step, points=[MetricPoint(step, 0.0, {"loss": 3.0})]), 6.6)
    worked = []
    real = divergence.baseline
    monkeypatch.setattr(divergence, "baseline", lambda v, p: worked.append(1) or real(v, p))
    policy = DivergencePolicy(DivergenceParams())
    rounds = []
    for r in range(4):
        worked.clear()
        rounds.append((policy.decide(7.0 + r, state), len(worked)))
    assert [w for _, w in rounds] == [256, 256, 10, 0]
    assert [len(d) for d, _ in rounds] == [0, 0, 1, 1]  # the spiking rank's turn came in round 3
    assert rounds[2][0][0].features["rank"] == f"{last}/0"


def test_failure_judges_only_new_samples_and_spreads_baseline_refreshes(monkeypatch) -> None:
    from torchloom.weaver.policies import failure

    n = 200
    state = make_state(n)
    policy = FailurePolicy(FailureParams(warmup_s=0.0))  # baselines from the first minute on
    refreshed = []
    real = failure.signal_baselines
    monkeypatch.setattr(failure, "signal_baselines", lambda h, p: refreshed.append(1) or real(h, p))
    judged = []
    real_rules = failure.rule_risk
    monkeypatch.setattr(failure, "rule_risk", lambda *a: judged.append(1) or real_rules(*a))
    per_round = []
    for i in range(60):
        for g in range(n):
            feed(state, str(g), tel(str(g), i, device={"temp_c": 60.0, "power_w": 300.0}), i)
        refreshed.clear()
        policy.assessed(state, float(i))
        per_round.append(len(refreshed))
    assert max(per_round[30:]) < n / 3  # in step, but not all in the same round
    assert sum(per_round[30:]) >= n * 30 / (2 * failure.REFRESH_SAMPLES)  # yet every rank's
    judged.clear()
    state.updates += 1  # a round with no new sample: nothing judged again, same answers
    before = policy.assessed(state, 59.0)
    again = policy.assessed(state, 59.5)
    assert judged == [] and again == before
