"""Benchmark: what torchloom.data's ElasticLoader costs against a plain DataLoader.

Run:  python bench/loader_overhead.py [--batches 600] [--rounds 3] [--workers 2]

Both loaders read the same in-memory MNIST-shaped dataset (60 000 × [1,28,28] float32,
samples gathered with ``__getitems__``), batch 64, shuffled, ``--workers`` worker
processes, 2 batches prefetched per worker; the training loop is replaced by nothing,
so the figure is the time the training thread waits per batch — the worst case for a
loader's overhead. Alternating rounds, medians. A third figure is the ElasticLoader
with no workers: what a batch costs when it is made in the main process (as after a
change that arrived too late to be prefetched).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import torchloom
from torchloom.data import ElasticLoader


class Images(Dataset[Any]):
    def __init__(self) -> None:
        self.x = torch.randn(60_000, 1, 28, 28)
        self.y = torch.randint(0, 10, (60_000,))

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Any:
        return self.x[i], self.y[i]

    def __getitems__(self, idx: list[int]) -> list[Any]:
        return list(zip(self.x[idx], self.y[idx], strict=True))


def plain(ds: Images, workers: int, n: int) -> float:
    dl = DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers, prefetch_factor=2)
    it = iter(dl)
    next(it)  # workers up
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return (time.perf_counter() - t0) / n


def elastic(ds: Images, workers: int, n: int) -> float:
    run = torchloom.init(
        job_id="bench", connect=False, rank=0, replica_id="0", knobs={"batch_size": 64}
    )
    loader = ElasticLoader(ds, run=run, num_workers=workers)
    loader.next(step=0)  # workers up
    loader.advance()
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        loader.next(step=step)
        loader.advance()
    dt = (time.perf_counter() - t0) / n
    loader.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = Images()
    base, ours = [], []
    for _ in range(args.rounds):
        base.append(plain(ds, args.workers, args.batches))
        ours.append(elastic(ds, args.workers, args.batches))
    b, o = statistics.median(base), statistics.median(ours)
    print(f"# loader overhead, {date.today()}, {platform.node()}, {args.workers} workers")
    print(f"plain DataLoader   {b * 1e6:8.1f} µs/batch  (rounds: {[round(x * 1e6) for x in base]})")
    print(f"ElasticLoader      {o * 1e6:8.1f} µs/batch  (rounds: {[round(x * 1e6) for x in ours]})")
    print(f"ratio              {o / b:8.2f}")
    main_only = elastic(ds, 0, args.batches // 3)
    print(
        f"ElasticLoader, 0 workers (every batch in the main process): {main_only * 1e6:.1f} µs/batch"
    )


if __name__ == "__main__":
    main()
