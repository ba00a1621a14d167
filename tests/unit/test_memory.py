"""Memory-aware batching: the rank's guard (real Run, configs offered by hand) and the Weaver's
memory policy (a pure function of the state)."""

import time

import pytest
import torch

import torchloom
from tests.unit.test_policies import JOB, make_state, tel
from torchloom.errors import MemoryBudgetError
from torchloom.memory import MemoryGuard, split
from torchloom.protocol import ConfigSnapshot, DesiredConfig, MetricPoint
from torchloom.weaver.policies.memory import MemoryParams, MemoryPolicy
from torchloom.weaver.state import on_telemetry

CPU = torch.device("cpu")


def test_split_keeps_the_total_and_caps_each_micro_batch():
    assert split([16], None) == [16]
    assert split([16], 8) == [8, 8]
    assert split([10, 3], 4) == [4, 3, 3, 3]
    assert split([7], 1) == [1] * 7
    for sizes, cap in (([33, 5], 6), ([1], 1), ([100], 7)):
        out = split(sizes, cap)
        assert sum(out) == sum(sizes) and max(out) <= cap


def _run(budget_gb=None, max_batch=None):
    run = torchloom.init(job_id="j", connect=False, rank=0, replica_id="0",
                         knobs={"lr": 0.1, "batch_size": 16})  # fmt: skip
    values = {"lr": 0.1, "batch_size": 16, "max_memory_gb": budget_gb, "max_batch_size": max_batch}
    run.shared.offer(
        DesiredConfig(job_id="j", snapshots=[ConfigSnapshot(
            version=1, effective_step=0, issued_ts=time.time(), values=values)]),
        time.time(),
    )  # fmt: skip
    assert run.begin_step(0)
    return run


def test_a_micro_batch_over_the_cpu_budget_is_retried_smaller_and_the_samples_kept():
    run = _run(budget_gb=1.0)
    peak = {16: 3e9, 8: 1.5e9, 4: 0.6e9, 2: 0.4e9}  # bytes per micro-batch size
    guard = MemoryGuard(run, device=CPU, peak_bytes=peak.__getitem__)
    resets, tries = [], []

    def step(sizes):
        tries.append(list(sizes))
        for m in sizes:
            guard.check(m)
        return sum(sizes)

    assert guard.run_step([16], step, reset=lambda: resets.append(1)) == 16
    assert tries == [[16], [8, 8], [4, 4, 4, 4]] and len(resets) == 2
    assert guard.cap == 4 and guard.retries == 2
    events = [e for e in run.shared.events.drain() if e.kind == "oom_retried"]
    assert [e.data["micro_batch"] for e in events] == [8, 4]
    assert "needs 1.500 GB, over max_memory_gb=1" in events[1].reason
    logged = run.shared.points.drain()[-1][2]
    assert logged == {"micro_batch": 4, "micro_cap": 4, "mem_peak_gb": 0.6}
    # the next step starts from the cap: no failed try
    tries.clear()
    assert guard.run_step([16], step, reset=lambda: resets.append(1)) == 16
    assert tries == [[4, 4, 4, 4]]


def test_the_cap_drops_when_the_plan_is_small_enough_and_errors_end_the_step_when_they_must():
    run = _run(budget_gb=1.0)
    guard = MemoryGuard(run, device=CPU, peak_bytes=lambda b: int(b * 0.2e9))

    def step(sizes):
        for m in sizes:
            guard.check(m)

    guard.run_step([8], step, reset=lambda: None)
    assert guard.cap == 4
    run.shared.offer(
        DesiredConfig(job_id="j", snapshots=[
            ConfigSnapshot(version=1, effective_step=0, issued_ts=time.time(),
                           values={"lr": 0.1, "batch_size": 16, "max_memory_gb": 1.0}),
            ConfigSnapshot(version=2, effective_step=2, issued_ts=time.time(),
                           values={"lr": 0.1, "batch_size": 16, "max_memory_gb": 1.0,
                                   "max_batch_size": 4})]),
        time.time(),
    )  # fmt: skip
    assert run.begin_step(1) and run.begin_step(2)
    assert guard.micro_batches([4, 4]) == [4, 4] and guard.cap is None  # the job's own split
    # a micro-batch of one that does not fit, and no retry under FSDP: the error is raised
    tiny = MemoryGuard(run, device=CPU, peak_bytes=lambda b: 5e9)
    with pytest.raises(MemoryBudgetError):
        tiny.run_step([4], lambda sizes: [tiny.check(m) for m in sizes], reset=lambda: None)
    assert tiny.retries == 2  # 4 → 2 → 1, then it gives up
    no_retry = MemoryGuard(run, device=CPU, peak_bytes=lambda b: 5e9, retry=False)
    with pytest.raises(MemoryBudgetError):
        no_retry.run_step([4], lambda sizes: [no_retry.check(m) for m in sizes], reset=lambda: None)
    assert no_retry.retries == 0


def test_without_a_budget_nothing_is_measured_on_a_cpu():
    run = _run()
    guard = MemoryGuard(run, device=CPU, peak_bytes=lambda b: pytest.fail("measured"))
    guard.run_step([16], lambda sizes: [guard.check(m) for m in sizes], reset=lambda: None)
    logged = run.shared.points.drain()[-1][2]
    assert logged == {"micro_batch": 16, "micro_cap": 0}  # no peak, no I/O on this thread


def _log(state, rid, step, now, **values):
    on_telemetry(
        state, tel(rid, step, points=[MetricPoint(step=step, ts=now, values=values)], seq=step), now
    )


def test_the_policy_halves_near_the_budget_and_follows_a_rank_that_shrank():
    policy = MemoryPolicy(MemoryParams())
    state = make_state(values={"max_memory_gb": 1.0}, effective_step=10)
    _log(state, "0", 5, 1.0, micro_batch=16, mem_peak_gb=0.99, micro_cap=0)
    assert policy.decide(1.0, state) == []  # logged under an earlier config
    _log(state, "0", 12, 2.0, micro_batch=16, mem_peak_gb=0.95, micro_cap=0)
    _log(state, "1", 12, 2.0, micro_batch=16, mem_peak_gb=0.5, micro_cap=0)
    (d,) = policy.decide(2.0, state)
    assert d.action == "set" and d.values == {"max_batch_size": 8}
    assert "rank 0/0: peak 0.95 GB of 1 GB" in d.reason
    _log(state, "0", 13, 3.0, micro_batch=16, mem_peak_gb=0.5, micro_cap=0)
    _log(state, "1", 13, 3.0, micro_batch=4, mem_peak_gb=0.5, micro_cap=4)  # retried after OOM
    (d,) = policy.decide(3.0, state)
    assert d.values == {"max_batch_size": 4} and "ran out of memory" in d.reason


def test_the_policy_stays_quiet_without_a_budget_or_when_max_batch_size_is_already_small():
    policy = MemoryPolicy(MemoryParams())
    state = make_state(values={}, effective_step=0)
    _log(state, "0", 3, 1.0, micro_batch=16, mem_peak_gb=100.0, micro_cap=8)
    assert policy.decide(1.0, state) == []
    state = make_state(values={"max_memory_gb": 1.0, "max_batch_size": 4}, effective_step=0)
    _log(state, "0", 3, 1.0, micro_batch=4, mem_peak_gb=0.5, micro_cap=4)
    assert policy.decide(1.0, state) == []
    with pytest.raises(ValueError):
        MemoryPolicy(MemoryParams(high_water=1.5))
    assert JOB in state.jobs
