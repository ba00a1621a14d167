import math

import pytest

from torchloom.protocol.batching import plan_batch, plan_step, scale_lr


@pytest.mark.parametrize("global_batch", [1, 7, 64, 128, 1000])
@pytest.mark.parametrize("participants", [1, 2, 3, 5])
@pytest.mark.parametrize("max_batch", [None, 16, 50])
def test_shares_always_add_up_to_the_global_batch(global_batch, participants, max_batch):
    plans = [
        plan_batch(
            global_batch=global_batch,
            participants=participants,
            replica_rank=r,
            max_batch=max_batch,
        )
        for r in range(participants)
    ]
    assert sum(p.local_samples for p in plans) == global_batch
    for p in plans:
        assert sum(p.micro_batches) == p.local_samples
        if max_batch:
            assert all(m <= max_batch for m in p.micro_batches)
    assert max(p.local_samples for p in plans) - min(p.local_samples for p in plans) <= 1
    # consecutive offsets: the shares tile [0, global_batch)
    assert [p.offset for p in plans] == [
        sum(q.local_samples for q in plans[:r]) for r in range(len(plans))
    ]


@pytest.mark.parametrize("participants", [1, 2, 3])
@pytest.mark.parametrize("group_world_size", [1, 2, 3])
@pytest.mark.parametrize(
    "config",
    [
        {"batch_size": 32},
        {"global_batch_size": 100, "max_batch_size": 16},
        {"global_batch_size": 2},
    ],
)
def test_step_plans_of_all_ranks_tile_the_global_batch(participants, group_world_size, config):
    plans = [
        plan_step(
            config,
            participants=participants,
            replica_rank=r,
            group_world_size=group_world_size,
            group_rank=k,
        )
        for r in range(participants)
        for k in range(group_world_size)
    ]
    covered = sorted(i for p in plans for i in range(p.offset, p.offset + p.local_samples))
    assert covered == list(range(plans[0].global_samples))  # every sample of the step exactly once
    if "batch_size" in config:
        assert {p.local_samples for p in plans} == {32}
        assert plans[0].global_samples == 32 * participants * group_world_size


def test_two_to_one_to_two_groups():
    assert plan_batch(
        global_batch=128, participants=2, replica_rank=1, max_batch=None
    ).micro_batches == (64,)
    one = plan_batch(global_batch=128, participants=1, replica_rank=0, max_batch=96)
    assert one.micro_batches == (64, 64) and one.local_samples == 128  # accumulation within the max


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        plan_batch(global_batch=128, participants=2, replica_rank=2, max_batch=None)
    with pytest.raises(ValueError):
        plan_batch(global_batch=0, participants=1, replica_rank=0, max_batch=None)
    with pytest.raises(ValueError):
        scale_lr(0.1, old_global=128, new_global=256, rule="cubic")


def test_lr_scaling_rules():
    assert scale_lr(0.1, old_global=128, new_global=256, rule="linear") == pytest.approx(0.2)
    assert scale_lr(0.1, old_global=128, new_global=256, rule="sqrt") == pytest.approx(
        0.1 * math.sqrt(2)
    )
    assert scale_lr(0.1, old_global=128, new_global=256, rule="none") == 0.1
