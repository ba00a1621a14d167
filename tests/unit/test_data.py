"""torchloom.data with real DataLoader worker processes and an offline Run fed configs by hand."""

import time

import pytest
import torch

from tests.unit.conftest import offline_run
from torchloom.data import ElasticLoader, SampleStream, Transforms
from torchloom.protocol import ConfigSnapshot, DesiredConfig, KnobSpec


class Numbers(torch.utils.data.Dataset):
    """Sample i is (tensor([i.0, i.0]), i): easy to check which samples a batch holds."""

    def __len__(self):
        return 100

    def __getitem__(self, i):
        return torch.full((2,), float(i)), i


def add_noise(std):
    return None if not std else (lambda s: (s[0] + std * torch.randn(2), s[1]))


def negate(on):
    return (lambda s: (-s[0], s[1])) if on else None


def transforms():
    t = Transforms()
    t.register(KnobSpec(name="noise_std", type="float", min=0.0, allow_off=True), add_noise)
    t.register(KnobSpec(name="negate", type="bool"), negate)
    return t


def loader_run(t=None, **knobs):
    """An offline Run of 1,000 steps with ``batch_size`` 8 and ``t``'s transform knobs."""
    return offline_run(
        knobs={"batch_size": 8, **knobs}, custom_knobs=t.knobs() if t else None, max_steps=1000
    )


def offer(run, version, effective_step, **values):
    run.shared.offer(
        DesiredConfig(
            job_id="j",
            snapshots=[
                ConfigSnapshot(
                    version=version,
                    effective_step=effective_step,
                    values=values,
                    issued_ts=time.time(),
                )
            ],
        ),
        time.time(),
    )


def test_stream_is_a_shuffled_endless_sequence_of_epochs():
    s = SampleStream(10, seed=3)
    first = s.indices(0, 10)
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != list(range(10))
    across = s.indices(8, 5)  # two from epoch 0, three from epoch 1
    assert across[:2].tolist() == first[8:].tolist()
    assert sorted(s.indices(10, 10).tolist()) == list(range(10))
    assert SampleStream(10, seed=3).indices(0, 10).tolist() == first.tolist()  # same on every rank
    s.advance(13)
    assert (s.epoch, s.cursor) == (1, 13)
    other = SampleStream(10, seed=3)
    other.load_state_dict(s.state_dict())
    assert other.cursor == 13
    with pytest.raises(ValueError, match="n/seed/shuffle"):
        SampleStream(11, seed=3).load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        s.advance(-1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_size_change_is_exact_at_the_effective_step_with_workers(num_workers):
    run = loader_run()
    loader = ElasticLoader(Numbers(), run=run, num_workers=num_workers)
    sizes, sources = {}, {}
    taken = []
    for step in run.steps():
        if step == 7:
            offer(run, 2, 9, batch_size=12)  # arrives after steps 8-10 were requested
        if step == 30:
            offer(run, 3, 40, batch_size=5)  # arrives 10 steps ahead: the workers see it coming
        batch = loader.next(step=step)
        sizes[step], sources[step] = len(batch.indices), batch.source
        assert batch.data[1].tolist() == batch.indices.tolist()
        taken += batch.indices.tolist()
        loader.advance()
        if step == 50:
            break
    assert [sizes[s] for s in (7, 8, 9, 10)] == [8, 8, 12, 12]
    assert [sizes[s] for s in (38, 39, 40, 41)] == [12, 12, 5, 5]
    # the stream goes on without a gap or a repeat: 10 epochs' worth is every sample 5 times …
    assert len(taken) == 9 * 8 + 31 * 12 + 11 * 5
    assert taken == SampleStream(100, seed=0).indices(0, len(taken)).tolist()
    if num_workers:
        assert sources[9] == "main"  # the late change: made in the main process once …
        assert all(sources[s] == "worker" for s in range(12, 51))  # … then by the workers again
        assert loader.stats["worker"] > 40
    loader.close()


def test_transforms_switch_at_the_effective_step_and_run_in_the_workers():
    t = transforms()
    run = loader_run(t)
    loader = ElasticLoader(Numbers(), run=run, transforms=t, num_workers=2)
    seen = {}
    for step in run.steps():
        if step == 2:
            offer(run, 2, 12, noise_std=0.5, negate=True)
        if step == 14:
            offer(run, 3, 25, noise_std=None)
        b = loader.next(step=step)
        seen[step] = b
        loader.advance()
        if step == 30:
            break
    for step, b in seen.items():
        x, _ = b.data
        clean = torch.stack([torch.full((2,), float(i)) for i in b.indices.tolist()])
        if step < 12:
            assert b.settings == (("noise_std", None), ("negate", None))
            assert torch.equal(x, clean)
        elif step < 25:
            assert b.settings == (("noise_std", 0.5), ("negate", True))
            assert (x + clean).abs().max() > 0.01 and (x + clean).abs().max() < 3  # negated + noise
            assert b.source == "worker", step  # known 10 steps ahead: made in the workers
        else:
            assert b.settings == (("noise_std", None), ("negate", True))
            assert torch.equal(x, -clean)
    loader.close()


def test_worker_and_main_process_make_the_same_samples():
    t = transforms()
    run = loader_run(t, noise_std=0.3)
    workers = ElasticLoader(Numbers(), run=run, transforms=t, num_workers=2)
    main = ElasticLoader(Numbers(), run=run, transforms=t, num_workers=0)
    for step in range(5):
        a, b = workers.next(step=step), main.next(step=step)
        assert a.source == "worker" and b.source == "main"
        assert torch.equal(a.data[0], b.data[0])  # the noise is seeded by the stream position
        workers.advance()
        main.advance()
    workers.close()


def test_quorum_change_and_failed_commit_keep_the_stream_whole():
    """Two replica groups share a global batch of 20; group 1 leaves at step 3; a step fails."""
    run = loader_run(global_batch_size=20)
    g0 = ElasticLoader(Numbers(), run=run, num_workers=2)
    g1 = ElasticLoader(Numbers(), run=run, num_workers=0)
    trained = []
    for step in range(3):
        for loader, rank in ((g0, 0), (g1, 1)):
            b = loader.next(step=step, participants=2, replica_rank=rank)
            assert len(b.indices) == 10
            trained += b.indices.tolist()
            loader.advance()
    # step 3 fails mid-way (not committed): nobody moves the cursor
    b = g0.next(step=3, participants=1, replica_rank=0)
    assert len(b.indices) == 20 and b.source == "main"
    g0.advance(committed=False)
    for step in (3, 4, 5):  # group 0 alone retries step 3, then goes on
        b = g0.next(step=step, participants=1, replica_rank=0)
        trained += b.indices.tolist()
        g0.advance()
    # group 1 rejoins: it heals the cursor from group 0
    g1.load_state_dict(g0.state_dict())
    for loader, rank in ((g0, 0), (g1, 1)):
        trained += loader.next(step=6, participants=2, replica_rank=rank).indices.tolist()
        loader.advance()
    assert g0.stream.cursor == g1.stream.cursor == 140
    assert trained == SampleStream(100, seed=0).indices(0, 140).tolist()  # no repeat, no gap
    g0.close()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        ElasticLoader(Numbers(), run=loader_run(), group_world_size=2, group_rank=2)
    with pytest.raises(ValueError):
        ElasticLoader(Numbers(), run=loader_run(), num_workers=-1)
    t = transforms()
    with pytest.raises(ValueError, match="already registered"):
        t.register(KnobSpec(name="negate", type="bool"), negate)
