"""One seed for a run: python, numpy, torch (CPU and every CUDA device) and DataLoader workers.

::

    from torchloom.seeding import seed_everything, loader_generator
    seed_everything(1234)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=4,
                        generator=loader_generator(1234))

Each DataLoader worker is seeded by torch from the loader's generator (``base_seed + worker_id``
for python's ``random`` and torch, a derived state for numpy — torch's ``_worker_loop``), so a
seeded generator makes the workers' augmentations repeat too. Two runs with the same seed, the
same config and the same number of ranks then give the same loss curve on CPU (tested); on CUDA
also pass ``deterministic=True`` (cuDNN and cuBLAS pick deterministic kernels; some ops then
raise, by torch's design, when they have none).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python's ``random``, numpy's global generator, torch's CPU generator and every CUDA
    device's (when CUDA is there).

    Args:
        seed: any integer in ``[0, 2**32)``; ranks that must differ (data shards drawn at
            random) add their rank themselves.
        deterministic: also ask torch for deterministic algorithms
            (``torch.use_deterministic_algorithms(True)``, cuDNN deterministic and not
            benchmarking, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``).

    Raises:
        ValueError: ``seed`` is outside ``[0, 2**32)``.
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} is outside [0, 2**32)")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def loader_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, for ``DataLoader(generator=…)``: it draws the
    shuffle order and the seeds of the loader's workers."""
    return torch.Generator().manual_seed(seed)
