"""What the one comm hook costs a DDP step: DDP's own allreduce against torchloom's
``GradCompression`` hook with ``grad_compression=none`` (the same allreduce, through Python),
and what each codec's compute costs, on 2 gloo ranks in this process's children.

    python bench/comm_overhead.py [--steps 300] [--repeats 5]

Runs are interleaved (baseline, hook, baseline, …) so both see the same machine; the figure
is the median step time per variant and its ratio to DDP's own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import torchloom
from torchloom.comm import GradCompression
from torchloom.examples.mnist.train import Net

VARIANTS = ("ddp", "none", "bf16", "powersgd:4", "topk:0.01")


def step_times(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(10):  # warm up (DDP rebuilds its buckets after the first steps)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def worker(rank: int, steps: int, repeats: int, port: int, out: dict[str, list[float]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            model = torch.nn.parallel.DistributedDataParallel(Net())
            if variant != "ddp":
                run = torchloom.init(
                    job_id="bench", knobs={"grad_compression": variant}, connect=False
                )
                GradCompression(run).register(model)
            dist.barrier()
            times[variant].append(step_times(model, x, y, steps))
    if rank == 0:
        out.update({k: v for k, v in times.items()})
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from torchloom._proc import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args.steps, args.repeats, free_port(), out), nprocs=2)
        times = dict(out)
    base = statistics.median(times["ddp"])
    print(f"{time.strftime('%Y-%m-%d')} · 2 gloo ranks · MNIST CNN, batch 64 per rank")
    print(f"{'variant':<14}{'step ms':>9}{'vs DDP':>8}{'µs/step':>9}")
    for v in VARIANTS:
        m = statistics.median(times[v])
        print(f"{v:<14}{m * 1e3:>9.3f}{m / base:>8.3f}{(m - base) * 1e6:>9.0f}")


if __name__ == "__main__":
    main()
