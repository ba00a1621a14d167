"""Checkpoints: what a save costs the training thread, what a recovery costs, and the goodput
of a job whose every rank crashes again and again.

Run:  python bench/checkpoint.py [--sizes-mb 32 256] [--saves 5] [--wall-s 600]
                                 [--crash-every-s 60] [--skip-goodput]

1. **Stall per save** (one process, the same model, in turn): the training thread's time in
   ``Checkpointer.save`` with DCP's ``async_save`` (the copy to CPU memory; the write goes on
   in the background) against a blocking ``dcp.save``, and the write's end to end time; the
   same async save with zstd (``compress=True``): bytes and time. ``state`` is an MLP and its
   SGD momentum (so the checkpoint is twice the weights), float32.
2. **Recovery**: ``Checkpointer.load`` of that checkpoint from host RAM (a tmpfs,
   ``/dev/shm``: outside the process, so it survives a crash of every rank) against a disk
   directory, with the page cache dropped first where this machine lets us (root), so the
   disk figure is a read from the device.
3. **Goodput under whole-job crashes**: the MNIST reference job, one group of 2 DDP ranks,
   a rank SIGKILLed every ``--crash-every-s`` (torchrun then stops the other: the whole job
   dies; the supervisor starts it again), for ``--wall-s``:
   * *torchloom*: ``--checkpoint-dir`` on the tmpfs with ``--checkpoint-backup`` on disk
     every 5th; the Weaver's ``checkpoint`` policy chooses the interval (Young/Daly from the
     job's measured save cost and failures, here with ``min_interval_s = 5``, an MTBF prior
     of 600 s and a save-cost prior of 50 ms: :data:`POLICIES`) and every restart resumes from
     the Weaver's choice;
   * *torchrun + fixed interval*: the job's own ``torch.save`` every ``--baseline-every``
     steps to disk, a restart loads the newest (``--baseline-checkpoint-dir``).
   Printed: steps in the final model, kills, median step time and the effective training
   time ratio (steps in the final model × median step time / wall time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchloom
from goodput import TRAIN, supervise_under_chaos
from torchloom.checkpoint import Checkpointer
from torchloom.stack import LighthouseConfig, StackConfig
from torchloom.supervisor import RestartPolicy, Supervisor

RAM = Path("/dev/shm")
POLICIES = "[checkpoint]\nmin_interval_s = 5.0\nmtbf_prior_s = 600.0\ncost_prior_s = 0.05\n"
"""The torchloom arm's checkpoint policy settings (a cluster that fails often, async saves)."""


def model_of(size_mb: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP of about ``size_mb`` MB of float32 weights, with SGD momentum (one step taken, so
    the momentum buffers exist)."""
    width = 1024
    layers = max(1, round(size_mb * 2**20 / 4 / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(8, width)).sum().backward()
    opt.step()
    return model, opt


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_saves(url: str, size_mb: float, saves: int, root: Path) -> dict[str, float]:
    """Median stall (s) of ``saves`` async and blocking saves, the async write's total time,
    and the zstd save's bytes and time; a checkpoint left in RAM and on disk for loading."""
    model, opt = model_of(size_mb)
    run = torchloom.init(job_id=f"bench{size_mb:g}", knobs={}, nats_url=url, interval_ms=500)
    out: dict[str, float] = {}
    for name, kw, where in (
        ("async", {}, root / "disk"),
        ("blocking", {"blocking": True}, root / "disk"),
        ("async_zstd", {"compress": True}, root / "disk"),
        ("ram", {}, RAM / f"torchloom-bench-{os.getpid()}"),
    ):
        ckpt = Checkpointer(run, state={"model": model, "optim": opt}, storage=where, **kw)
        stalls, totals = [], []
        for i in range(saves if name != "ram" else 1):
            t0 = time.perf_counter()
            ckpt.save(f"{name}-{i}", step=i)
            stalls.append(time.perf_counter() - t0)
            ckpt.wait()
            totals.append(time.perf_counter() - t0)
        out[f"{name}_stall_s"] = statistics.median(stalls)
        out[f"{name}_total_s"] = statistics.median(totals)
        directory = Path(ckpt.path(f"{name}-0"))
        out[f"{name}_bytes"] = sum(p.stat().st_size for p in directory.iterdir())
        out[f"{name}_dir"] = str(directory)  # type: ignore[assignment]
    # recovery: the same checkpoint from RAM and from disk, into the same state, in turn
    # (median of 3 each, the page cache dropped before each load)
    loads: dict[str, list[float]] = {"ram": [], "disk": []}
    where = {"ram": RAM / f"torchloom-bench-{os.getpid()}", "disk": root / "disk"}
    for _ in range(3):
        for name, storage in where.items():
            ckpt = Checkpointer(run, state={"model": model, "optim": opt}, storage=storage)
            out["cache_dropped"] = float(drop_page_cache())
            t0 = time.perf_counter()
            ckpt.load("ram-0" if name == "ram" else "async-0")
            loads[name].append(time.perf_counter() - t0)
    for name, times in loads.items():
        out[f"load_{name}_s"] = statistics.median(times)
    run.close(reason="bench done")
    shutil.rmtree(RAM / f"torchloom-bench-{os.getpid()}", ignore_errors=True)
    return out


def goodput_run(tmp: Path, args: argparse.Namespace, name: str, *script: str, **stack_kw: Any):
    """One arm: the MNIST job (one group of 2 DDP ranks, restarted on any failure) with
    ``script`` arguments, under the crash schedule, scored."""
    stack = StackConfig(
        state_dir=tmp / f"state-{name}", lighthouse=LighthouseConfig(url=None), **stack_kw
    ).build()
    stack.start()
    out = tmp / f"out-{name}"
    sup = Supervisor(
        script=[
            str(TRAIN),
            *("--job-id", f"goodput-{name}", "--max-steps", "10000000", "--eval-every", "0"),
            *("--log-every", "0", "--seed", str(args.seed), "--batch-size", "64"),
            *("--out-dir", str(out), *script),
        ],
        replicas=1,
        nproc_per_group=2,
        env={"TORCHLOOM_NATS_URL": stack.nats_url},
        log_dir=tmp / f"logs-{name}",
        policy=RestartPolicy(max_restarts=1000, backoff_s=0.0),
        say=lambda _: None,
    )
    return supervise_under_chaos(stack, sup, f"goodput-{name}", out, chaos_args(args))


def goodput_torchloom(tmp: Path, args: argparse.Namespace) -> dict:
    policies = tmp / "policies.toml"
    policies.write_text(POLICIES)
    ram = RAM / f"torchloom-goodput-{os.getpid()}"
    try:
        return goodput_run(
            tmp,
            args,
            "loom",
            *("--checkpoint-dir", str(ram), "--checkpoint-backup", str(tmp / "backup-loom")),
            *("--backup-every", "5"),
            policy_file=policies,
        )
    finally:
        shutil.rmtree(ram, ignore_errors=True)


def goodput_baseline(tmp: Path, args: argparse.Namespace) -> dict:
    return goodput_run(
        tmp,
        args,
        "base",
        *("--baseline-checkpoint-dir", str(tmp / "ckpt-base")),
        *("--baseline-checkpoint-every", str(args.baseline_every)),
    )


def chaos_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(wall_s=args.wall_s, kill_every_s=args.crash_every_s, seed=args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[32.0, 256.0])
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--wall-s", type=float, default=600.0)
    ap.add_argument("--crash-every-s", type=float, default=60.0)
    ap.add_argument("--baseline-every", type=int, default=500, help="steps between its saves")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-goodput", action="store_true")
    ap.add_argument("--keep", type=Path, default=None, help="keep logs and checkpoints here")
    args = ap.parse_args()
    host = socket.gethostname()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        stack = StackConfig(state_dir=tmp / "state-saves", lighthouse=LighthouseConfig(url=None))
        saves_stack = stack.build()
        saves_stack.start()
        try:
            rows = [
                (mb, bench_saves(saves_stack.nats_url, mb, args.saves, tmp / f"s{mb:g}"))
                for mb in args.sizes_mb
            ]
        finally:
            saves_stack.stop()
        print(
            f"# checkpoints — {date.today()} — {host}, {os.cpu_count()} CPUs, torch {torch.__version__}\n"
        )
        print(f"## stall per save (median of {args.saves}; state = MLP weights + SGD momentum)\n")
        print(
            "| weights MB | checkpoint MB | async stall ms | blocking stall ms | blocking / async "
            "| async write s | zstd MB | zstd write s |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mb, r in rows:
            print(
                f"| {mb:g} | {r['async_bytes'] / 1e6:.0f} | {r['async_stall_s'] * 1e3:.1f} | "
                f"{r['blocking_stall_s'] * 1e3:.0f} | {r['blocking_stall_s'] / r['async_stall_s']:.1f}× "
                f"| {r['async_total_s']:.2f} | {r['async_zstd_bytes'] / 1e6:.0f} | "
                f"{r['async_zstd_total_s']:.2f} |"
            )
        dropped = all(r["cache_dropped"] for _, r in rows)
        print(
            f"\n## recovery: load of the checkpoint (page cache "
            f"{'dropped before each load' if dropped else 'NOT dropped: no root'})\n"
        )
        print("| weights MB | from RAM (tmpfs) s | from disk s | disk / RAM |")
        print("|---:|---:|---:|---:|")
        for mb, r in rows:
            print(
                f"| {mb:g} | {r['load_ram_s']:.3f} | {r['load_disk_s']:.3f} | "
                f"{r['load_disk_s'] / r['load_ram_s']:.1f}× |"
            )
        if args.skip_goodput:
            return
        goodput = [
            ("torchloom (Weaver's interval, RAM + disk backup)", goodput_torchloom(tmp, args)),
            (
                f"torchrun + torch.save every {args.baseline_every} steps",
                goodput_baseline(tmp, args),
            ),
        ]
        print(
            f"\n## goodput: {args.wall_s:g} s, the whole job killed every {args.crash_every_s:g} s "
            f"(MNIST, 1 group of 2 DDP ranks, seed {args.seed}); torchloom's policy: "
            f"{POLICIES.strip().replace(chr(10), ' ')}\n"
        )
        print(
            "| run | kills | steps in final model | median step ms | effective training time ratio |"
        )
        print("|---|---:|---:|---:|---:|")
        for name, r in goodput:
            print(
                f"| {name} | {r['kills']} | {r['steps']} | {r['median_step_ms']:.1f} | "
                f"{r['ratio']:.2f} |"
            )
        a, b = goodput[0][1], goodput[1][1]
        print(
            f"\ntorchloom kept {a['steps'] / max(b['steps'], 1):.2f}× the steps in the same wall time."
        )
    subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    main()
