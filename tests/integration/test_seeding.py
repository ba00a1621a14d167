"""One seed, two runs in fresh processes: the same loss curve, DataLoader workers included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = r"""
import json, random, sys
import numpy as np, torch
from torch.utils.data import DataLoader, Dataset
from torchloom.seeding import loader_generator, seed_everything

class Noisy(Dataset):  # augmentation from python's and numpy's RNGs, in the workers
    def __len__(self): return 256
    def __getitem__(self, i):
        x = torch.full((8,), float(i % 7)) + torch.from_numpy(np.random.randn(8)).float()
        return x * random.uniform(0.5, 1.5), torch.tensor(i % 3)

seed = int(sys.argv[1])
seed_everything(seed)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
loader = DataLoader(Noisy(), batch_size=16, shuffle=True, num_workers=2,
                    generator=loader_generator(seed))
losses = []
for x, y in loader:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    losses.append(loss.item())
print(json.dumps(losses))
"""


def run(seed: int) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(seed)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_same_seed_gives_the_same_losses_and_another_seed_does_not() -> None:
    a, b, c = run(7), run(7), run(8)
    assert len(a) == 16 and a == b  # bit for bit, workers' augmentations and dropout included
    assert a != c


def test_a_seed_out_of_range_is_refused() -> None:
    from torchloom.seeding import seed_everything

    with pytest.raises(ValueError, match="outside"):
        seed_everything(-1)
