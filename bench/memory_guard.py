"""Benchmark: what the memory guard (torchloom.memory.MemoryGuard) costs a training step.

Run:  python bench/memory_guard.py [--steps 3000] [--rounds 5]

One process, CPU, a small MLP on random data with 2 micro-batches per step (gradient
accumulation), alternately run as a plain loop and through ``guard.run_step`` with a
``max_memory_gb`` budget in force (each micro-batch checked against its measured peak, cached
after the first step; ``micro_batch``/``micro_cap``/``mem_peak_gb`` logged every step). The Run
is offline (``connect=False``): the guard's own work on the training thread is what is timed,
not the Threadlet's. Per round the wall time per step after 50 warm-up steps, and the guard
around a step that does nothing but its checks (its own cost, free of the step's noise);
medians over rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

import torchloom
from torchloom.batchsize import peak_step_bytes
from torchloom.memory import MemoryGuard
from torchloom.protocol import ConfigSnapshot, DesiredConfig

WARMUP = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def micro(sizes: list[int], check=None) -> torch.Tensor:
        at, total = 0, torch.zeros(())
        for m in sizes:
            if check is not None:
                check(m)
            part = torch.nn.functional.cross_entropy(model(x[at : at + m]), y[at : at + m])
            (part * (m / 32)).backward()
            total += part.detach() * (m / 32)
            at += m
        return total

    def probe(b: int) -> None:
        micro([b])
        opt.zero_grad(set_to_none=True)

    run = torchloom.init(job_id="bench", connect=False, rank=0, replica_id="0",
                         knobs={"lr": 0.01, "batch_size": 32})  # fmt: skip
    values = {"lr": 0.01, "batch_size": 32, "max_memory_gb": 1.0}
    snap = ConfigSnapshot(version=1, effective_step=0, issued_ts=time.time(), values=values)
    run.shared.offer(DesiredConfig(job_id="bench", snapshots=[snap]), time.time())
    run.begin_step(0)
    guard = MemoryGuard(run, device=torch.device("cpu"),
                        peak_bytes=lambda b: peak_step_bytes(probe, b, track=(model, opt)))  # fmt: skip

    def plain_round() -> float:
        t0 = 0.0
        for i in range(args.steps + WARMUP):
            if i == WARMUP:
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            micro([16, 16])
            opt.step()
        return (time.perf_counter() - t0) / args.steps

    def guarded_round() -> float:
        t0 = 0.0
        for i in range(args.steps + WARMUP):
            if i == WARMUP:
                t0 = time.perf_counter()
            run.shared.points.drain()  # the Threadlet's flush, off the clock in a live run
            opt.zero_grad(set_to_none=True)
            guard.run_step([16, 16], lambda s: micro(s, guard.check),
                           reset=lambda: opt.zero_grad(set_to_none=True))  # fmt: skip
            opt.step()
        return (time.perf_counter() - t0) / args.steps

    def alone_round() -> float:
        """The guard with a step that only runs its checks: its own cost, without the noise of
        the step around it."""
        n = args.steps * 5
        t0 = time.perf_counter()
        for i in range(n):
            if i % 100 == 0:
                run.shared.points.drain()
            guard.run_step([16, 16], lambda s: [guard.check(m) for m in s], reset=lambda: None)
        return (time.perf_counter() - t0) / n

    plain, guarded, alone = [], [], []
    for _ in range(args.rounds):
        plain.append(plain_round())
        guarded.append(guarded_round())
        alone.append(alone_round())
    p, g = statistics.median(plain), statistics.median(guarded)
    spread = (max(plain) - min(plain)) / p
    print(f"memory guard, {date.today()}, {platform.node()}, torch {torch.__version__}")
    print(f"  plain step    {p * 1e6:8.1f} µs  (round-to-round spread {spread:.1%})")
    print(f"  guarded step  {g * 1e6:8.1f} µs  ×{g / p:.3f}")
    print(f"  difference    {(g - p) * 1e6:8.1f} µs per step (2 micro-batches, budget checked)")
    print(
        f"  guard alone   {statistics.median(alone) * 1e6:8.1f} µs per step (no-op step: its own work)"
    )


if __name__ == "__main__":
    main()
