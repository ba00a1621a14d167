"""The batch-size finder: its search, and its answer against a CPU memory budget."""

import pytest
import torch

from torchloom.batchsize import budget_probe, find_max_batch_size, peak_step_bytes
from torchloom.errors import NothingFitsError


def counting(limit_fits: int):
    tried: list[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= limit_fits

    return fits, tried


def test_doubling_then_bisecting_finds_the_largest_that_fits():
    fits, tried = counting(100)
    assert find_max_batch_size(fits) == 100
    assert tried[:8] == [1, 2, 4, 8, 16, 32, 64, 128]  # doubling until 128 fails
    assert len(tried) <= 8 + 6  # then a bisection of (64, 128)
    fits, _ = counting(10**9)
    assert find_max_batch_size(fits, limit=300) == 300  # capped at the limit
    with pytest.raises(NothingFitsError):
        find_max_batch_size(counting(0)[0])
    with pytest.raises(ValueError):
        find_max_batch_size(fits, start=0)


def test_the_answer_fits_a_cpu_budget_and_twice_it_does_not():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b: int) -> None:
        x, y = torch.randn(b, 64), torch.randint(0, 10, (b,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    track = (model, opt)
    budget = peak_step_bytes(step, 300, track=track)  # what 300 samples take
    found = find_max_batch_size(budget_probe(step, budget_bytes=budget, track=track))
    assert 250 <= found <= 400  # about 300 (activations grow linearly; a few KiB of slack)
    assert peak_step_bytes(step, found, track=track) <= budget
    assert peak_step_bytes(step, 2 * found, track=track) > budget
