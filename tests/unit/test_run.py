"""The Threadlet's training-side API with no NATS session: configs are offered by hand."""

import threading
import time

import pytest
import torch

import torchloom
from tests.unit.conftest import offline_run
from torchloom.errors import InvalidKnobError, InvalidRequestError
from torchloom.protocol import ConfigSnapshot, DesiredConfig


def doc(*snaps):
    return DesiredConfig(
        job_id="j", snapshots=[ConfigSnapshot(issued_ts=time.time(), **s) for s in snaps]
    )


def test_init_validates_initial_knobs_and_ids():
    with pytest.raises(InvalidKnobError):
        offline_run(knobs={"lr": -1})
    with pytest.raises(InvalidRequestError):
        torchloom.init(job_id="bad job", connect=False)


def test_identity_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("REPLICA_GROUP_ID", "7")
    run = torchloom.init(job_id="j", connect=False)
    assert (run.identity.replica_id, run.identity.rank, run.identity.group_world_size) == (
        "7",
        3,
        4,
    )
    assert run.identity.device.startswith("cpu:") or run.identity.device.startswith("GPU-")
    assert torchloom.init(job_id="j", connect=False, rank=1).identity.rank == 1  # explicit wins


def test_config_applies_exactly_at_the_effective_step():
    run = offline_run(max_steps=40)
    seen = {}
    for step in run.steps():
        if step == 5:
            run.shared.offer(
                doc(
                    dict(version=1, effective_step=0, values={"lr": 0.1, "batch_size": 8}),
                    dict(version=2, effective_step=20, values={"lr": 0.01, "batch_size": 16}),
                ),
                time.time(),
            )
        seen[step] = (run["lr"], run["batch_size"], run.applied_version)
    assert seen[19] == (0.1, 8, 1)
    assert seen[20] == (0.01, 16, 2)
    assert run.step == 39 and run.stop_reason == "finished"
    events = run.shared.events.drain()
    applied = [e for e in events if e.kind == "config_applied"]
    assert [(e.step, e.version) for e in applied] == [(6, 1), (20, 2)]
    assert events[-1].kind == "exited" and events[-1].reason == "finished"


def test_versions_heard_late_are_still_applied_in_order():
    run = offline_run(max_steps=30)
    snaps = [
        dict(version=2, effective_step=10, values={"lr": 0.2}),
        dict(version=3, effective_step=12, values={"lr": 0.3}),
    ]
    lrs = {}
    for step in run.steps():
        if step == 3:  # only the newest document arrives; it still carries v2
            run.shared.offer(doc(*snaps), time.time())
        lrs[step] = run["lr"]
    assert lrs[9] == 0.1 and lrs[10] == 0.2 and lrs[11] == 0.2 and lrs[12] == 0.3


def test_older_documents_are_ignored():
    run = offline_run()
    run.shared.offer(doc(dict(version=5, effective_step=0, values={"lr": 0.5})), time.time())
    run.shared.offer(doc(dict(version=4, effective_step=0, values={"lr": 0.4})), time.time())
    assert run.shared.doc.latest().version == 5


def test_config_lag_is_the_delivery_of_a_push_not_the_age_of_a_version_read_at_start():
    """A version the process read itself (its join reply, a read after a reconnect) was made
    before it asked: its age is not how long changes take to reach this rank (a process that
    started 10 s after a change would report 10 s, and the Weaver would plan its next change
    that far ahead)."""
    run = offline_run()
    ten_s_ago = time.time() - 10.0
    made = DesiredConfig(
        job_id="j",
        snapshots=[ConfigSnapshot(version=3, effective_step=0, issued_ts=ten_s_ago, values={})],
    )
    run.shared.offer(made, None)
    assert run.shared.doc is made and run.shared.config_lag_s == 0.0
    pushed = DesiredConfig(
        job_id="j",
        snapshots=[ConfigSnapshot(version=4, effective_step=0, issued_ts=ten_s_ago, values={})],
    )
    run.shared.offer(pushed, ten_s_ago + 0.25)
    assert run.shared.config_lag_s == pytest.approx(0.25)


def test_max_steps_and_stop_follow_the_config():
    run = offline_run(max_steps=1000)
    run.shared.offer(doc(dict(version=1, effective_step=0, values={"max_steps": 15})), time.time())
    assert list(run.steps())[-1] == 14
    run2 = offline_run(max_steps=1000)
    run2.shared.offer(
        doc(dict(version=1, effective_step=7, values={}, run_state="stopped")), time.time()
    )
    assert list(run2.steps()) == list(range(7)) and run2.stop_reason == "stopped"


def test_pause_blocks_at_the_boundary_until_resume():
    run = offline_run(max_steps=50)
    run.shared.offer(
        doc(dict(version=1, effective_step=10, values={}, run_state="paused")), time.time()
    )
    steps = []
    t = threading.Thread(target=lambda: steps.extend(run.steps()))
    t.start()
    deadline = time.time() + 5
    while run.state != "paused" and time.time() < deadline:
        time.sleep(0.01)
    assert run.state == "paused" and run.step == 10 and steps == list(range(10))
    run.shared.offer(
        doc(
            dict(version=1, effective_step=10, values={}, run_state="paused"),
            dict(version=2, effective_step=10, values={"lr": 0.7}, run_state="running"),
        ),
        time.time(),
    )
    t.join(5)
    assert steps == list(range(50)) and run["lr"] == 0.7


def test_bind_optimizer_follows_lr_momentum_and_weight_decay():
    w = torch.nn.Parameter(torch.zeros(3))
    sgd = torch.optim.SGD([w], lr=1.0, momentum=0.5)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1.0, weight_decay=0.0)
    run = offline_run(knobs={"lr": 0.1, "momentum": 0.9})
    run.bind_optimizer(sgd)
    run.bind_optimizer(adam)
    assert sgd.param_groups[0]["lr"] == 0.1 and sgd.param_groups[0]["momentum"] == 0.9
    assert adam.param_groups[0]["betas"][0] == 0.9
    run.shared.offer(
        doc(
            dict(
                version=1,
                effective_step=0,
                values={"lr": 0.01, "momentum": 0.8, "weight_decay": 0.1},
            )
        ),
        time.time(),
    )
    next(iter(run.steps()))
    assert sgd.param_groups[0]["lr"] == 0.01 and sgd.param_groups[0]["weight_decay"] == 0.1
    assert adam.param_groups[0]["betas"] == (0.8, adam.defaults["betas"][1])


def test_log_keeps_tensors_detached_and_counts_drops():
    run = offline_run(buffer_points=4)
    x = torch.ones(2, requires_grad=True)
    for _ in range(6):
        run.log(loss=(x * 2).sum())
    items = run.shared.points.drain()
    assert len(items) == 4 and run.shared.points.dropped == 2
    assert not items[0][2]["loss"].requires_grad


def test_clip_grad_norm_follows_grad_clip():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)
    run = offline_run(knobs={"grad_clip": "off"})
    assert run.clip_grad_norm_([p]) is None and p.grad[0] == 10.0
    run.shared.offer(doc(dict(version=1, effective_step=0, values={"grad_clip": 1.0})), time.time())
    next(iter(run.steps()))
    run.clip_grad_norm_([p])
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(1.0, rel=1e-4)


def test_a_drained_replica_group_leaves_at_the_effective_step():
    run = offline_run(max_steps=100)
    run.shared.offer(
        doc(
            dict(version=1, effective_step=0, values={}),
            dict(version=2, effective_step=12, values={}, drained=["0"]),
        ),
        time.time(),
    )
    assert list(run.steps()) == list(range(12)) and run.stop_reason == "drained"
    other = torchloom.init(job_id="j", connect=False, rank=0, replica_id="1", max_steps=20)
    other.shared.offer(
        doc(dict(version=2, effective_step=12, values={}, drained=["0"])), time.time()
    )
    assert list(other.steps())[-1] == 19 and other.stop_reason == "finished"


def test_batch_plan_follows_the_config_and_the_quorum():
    run = offline_run(knobs={"batch_size": 32, "global_batch_size": 128, "max_batch_size": 48})
    plan = run.batch_plan(participants=2, replica_rank=0)
    assert plan.local_samples == 64 and plan.micro_batches == (32, 32)
    assert run.batch_plan(participants=1, replica_rank=0).micro_batches == (43, 43, 42)
    plain = offline_run(knobs={"batch_size": 32})
    assert plain.batch_plan(participants=3, replica_rank=2).micro_batches == (32,)
