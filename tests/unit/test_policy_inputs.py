"""What the policies read and write on the training side: phase marks, the gradient guard,
device samples, uneven batch shares, injected faults."""

import math

import pytest
import torch

from tests.unit.conftest import offline_run
from torchloom.chaos import FailurePlan, failure_steps, nan_steps, slowdown
from torchloom.errors import InvalidKnobError
from torchloom.protocol import BUILTIN_KNOBS, coerce
from torchloom.protocol.batching import format_weights, parse_weights, plan_step, split
from torchloom.threadlet.agent import _comm_per_step, _per_step
from torchloom.threadlet.device import DeviceSampler, degradation, trace_from_env


def test_marks_split_each_step_into_phases():
    run = offline_run(knobs={})
    for _ in run.steps():
        run.mark("data")
        run.mark("compute")
        run.mark("comm")
        if run.step == 9:
            break
    assert set(run.phase_totals) == {"data", "compute", "comm", "other"}
    assert all(v >= 0 for v in run.phase_totals.values())
    assert _per_step({"compute": 3.0, "comm": 1.0}, {"compute": 1.0}, 4) == {
        "compute": 0.5,
        "comm": 0.25,
    }


def test_a_flush_that_saw_no_gradient_bytes_reports_none_not_zero():
    before = {"sent": 100.0, "dense": 200.0}
    assert _comm_per_step({"sent": 150.0, "dense": 300.0}, before, 2) == {
        "sent": 25.0,
        "dense": 50.0,
    }
    assert _comm_per_step(dict(before), before, 1) is None  # a step begun, its bytes to come
    assert _comm_per_step({}, {}, 3) is None  # no collective at all (one process)


def grads_model(bad=False):
    m = torch.nn.Linear(4, 2)
    m.weight.grad = torch.ones_like(m.weight)
    m.bias.grad = torch.ones_like(m.bias)
    if bad:
        m.weight.grad[0, 0] = float("nan")
    return m


def test_guard_gradients_zeroes_a_nonfinite_step_only_when_asked():
    run = offline_run(knobs={"skip_nonfinite": True})
    m = grads_model(bad=True)
    norm = run.guard_gradients(m.parameters())
    assert not math.isfinite(float(norm))
    assert all(float(p.grad.abs().sum()) == 0.0 for p in m.parameters())
    m = grads_model()
    run.guard_gradients(m.parameters())
    assert float(m.weight.grad.sum()) == 8.0  # a finite step is untouched
    m = grads_model(bad=True)
    offline_run(knobs={}).guard_gradients(m.parameters())  # skip_nonfinite off
    assert math.isnan(float(m.weight.grad[0, 0]))


def test_guard_gradients_clips_and_its_norm_rides_on_the_next_log():
    run = offline_run(knobs={"grad_clip": 1.0})
    m = grads_model()
    norm = run.guard_gradients(m.parameters())
    assert float(norm) == pytest.approx(math.sqrt(10))
    total = torch.cat([p.grad.flatten() for p in m.parameters()]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-4)
    run.log(loss=0.5)
    (_, _, values), *_ = run.shared.points.drain(10)
    assert set(values) == {"loss", "grad_norm"}


def test_host_device_sample_and_a_synthetic_degradation():
    sample = DeviceSampler(device="cpu:test").sample(0.0)
    assert 0.0 <= sample["mem_used_frac"] <= 1.0 and "cpu_util" in sample
    assert degradation(0.0)["temp_c"] == 70.0 and degradation(10.0)["temp_c"] == 90.0
    assert degradation(10.0)["throttle_hw"] == 1.0 and degradation(4.0)["ecc_corrected"] == 8.0
    env = FailurePlan().degrade("1", after_s=-5.0, rate=2.0).env()
    overlay = trace_from_env("1", env)
    assert overlay is not None and trace_from_env("0", env) is None
    with_trace = DeviceSampler(device="cpu:test", overlay=overlay).sample(__import__("time").time())
    assert with_trace["temp_c"] >= 89.0  # 5 s in at twice the rate


def test_fault_plans_reach_the_training_script():
    env = FailurePlan().fail_at("1", 50).slow("1", from_step=10, factor=3.0).nan_at("0", 7).env()
    assert failure_steps("1", env) == {50} and failure_steps("0", env) == frozenset()
    assert slowdown("1", env) == (10, 3.0) and slowdown("0", env) is None
    assert nan_steps("0", env) == {7} and nan_steps("1", env) == frozenset()


def test_batch_weights_split_the_global_batch_and_weigh_the_loss():
    assert split(128, [1, 1, 1]) == [43, 43, 42]
    assert split(100, [2, 1, 1]) == [50, 25, 25]
    assert sum(split(97, [1.3, 0.7, 1.1, 0.2])) == 97
    assert parse_weights("0:1,1:0.5") == {"0": 1.0, "1": 0.5}
    assert parse_weights(format_weights({"1": 0.5, "0": 1.0})) == {"0": 1.0, "1": 0.5}
    for bad in ("0:0", "0:-1", "x", "0:nan", ":1"):
        with pytest.raises(ValueError):
            parse_weights(bad)
    config = {"global_batch_size": 120, "batch_weights": "0:2,1:1"}
    ids = ("0", "1", "2")
    plans = [
        plan_step(config, participants=3, replica_rank=r, participant_ids=ids) for r in range(3)
    ]
    assert [p.local_samples for p in plans] == [60, 30, 30]
    assert [p.offset for p in plans] == [0, 60, 90]  # the shares tile the step's batch
    # averaging the groups' (mean loss × loss_scale) weighs every sample 1 / global batch
    for p in plans:
        assert p.loss_scale / (3 * p.local_samples) == pytest.approx(1 / 120)
    assert [p.loss_scale for p in plans] == pytest.approx([1.5, 0.75, 0.75])
    # a quorum whose ids are unknown (a group healing) splits evenly on every group alike
    even = [plan_step(config, participants=3, replica_rank=r) for r in range(3)]
    assert [p.local_samples for p in even] == [40, 40, 40]


def test_the_weights_knob_is_validated():
    spec = BUILTIN_KNOBS["batch_weights"]
    assert coerce(spec, "0:1,1:0.55") == "0:1,1:0.55"
    assert coerce(spec, "off") is None
    with pytest.raises(InvalidKnobError, match=r"'0=1' is not of the form 0:1,1:0\.5"):
        coerce(spec, "0=1")
    assert spec.rule() == "str like 0:1,1:0.5 or off"
    custom = BUILTIN_KNOBS["lr_scaling"].__class__(name="tag", type="str", pattern="[a-z]+")
    with pytest.raises(InvalidKnobError, match="does not match"):
        coerce(custom, "A1")
