"""Goodput under failures: torchloom + torchft against checkpoint-restart, side by side.

Run:  python bench/goodput.py [--wall-s 90] [--kill-every-s 15] [--seed 0]

Both runs train the MNIST reference job on 2 workers for the same wall time, with the
same seed and data, while a worker is SIGKILLed every ``--kill-every-s`` seconds (the
same seeded schedule), then are stopped with ``torchloom stop`` and evaluated:

* **torchloom + torchft**: 2 replica groups of 1 rank (``torchloom run --replicas 2 ...
  --ft --global-batch-size 128``). A killed group is restarted by the supervisor and
  heals from its peer; the other keeps training.
* **checkpoint-restart**: 1 group of 2 DDP ranks under torchrun, a checkpoint every
  ``--checkpoint-every`` steps: a kill stops every rank and a fresh torchrun starts them
  again from the latest checkpoint, as torchrun's elastic restart does (done by starting
  a new torchrun: torchrun's in-place restart failed to re-form the gloo mesh here).

Printed per run: steps in the final model and samples trained (steps × 128), final test
accuracy, the median step time (from the Weaver's telemetry, sampled through the run), and
the effective training time ratio = steps in the final model × median step time / wall
time (how much of the wall clock went into steps that count).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from torchloom.chaos import choose_victim
from torchloom.client import WeaverClient
from torchloom.errors import NotReachableError
from torchloom.stack import LighthouseConfig, Stack, StackConfig
from torchloom.supervisor import RestartPolicy, Supervisor

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "mnist" / "train.py"
GLOBAL_BATCH = 128


def chaos_until(
    client: WeaverClient, job: str, *, wall_s: float, every_s: float, seed: int
) -> tuple[int, list[float]]:
    """Kill a random live rank every ``every_s`` until ``wall_s``; also sample the ranks'
    step times (s) from the Weaver's telemetry, twice a second."""
    rng, host, kills, t0 = random.Random(seed), socket.gethostname(), 0, time.monotonic()
    step_times: list[float] = []
    next_kill = every_s
    while (elapsed := time.monotonic() - t0) < wall_s:
        try:
            jobs = client.status(job, states=["live"], limit=1000).get("jobs", [])
        except NotReachableError:  # the Weaver is busy or (re)starting: look again
            jobs = []
        ranks = jobs[0]["ranks"] if jobs else []
        step_times += [
            r["step_time_s"] for r in ranks if r["state"] == "training" and r.get("step_time_s")
        ]
        if elapsed >= next_kill and wall_s - elapsed > 1.0:
            next_kill += every_s
            victim = choose_victim(ranks, target="random", host=host, rng=rng)
            if victim is not None:
                subprocess.run(["kill", "-9", str(victim["pid"])], check=False)
                kills += 1
        time.sleep(0.5)
    return kills, step_times


def stop_job(client: WeaverClient, job: str) -> None:
    for _ in range(50):  # a restart may be in progress: wait until a rank is there to stop
        try:
            client.control("stop", job, reason="benchmark wall time reached")
            return
        except Exception:
            time.sleep(0.2)


def results(out_dir: Path, wall_s: float, chaos: tuple[int, list[float]]) -> dict:
    kills, step_times = chaos
    summaries = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    steps = max(s["step"] for s in summaries) + 1
    median = sorted(step_times)[len(step_times) // 2]
    return {
        "steps": steps,
        "samples": steps * GLOBAL_BATCH,
        "test_acc": max(s["test_acc"] or 0 for s in summaries),
        "ratio": steps * median / wall_s,
        "median_step_ms": median * 1000,
        "kills": kills,
    }


def supervise_under_chaos(
    stack: Stack, sup: Supervisor, job: str, out: Path, args: argparse.Namespace
) -> dict:
    """Run ``sup`` under the kill schedule for the wall time, stop the job, and score it."""
    client = WeaverClient(nats_url=stack.nats_url)
    done = threading.Event()
    threading.Thread(target=lambda: (sup.run(), done.set()), daemon=True).start()
    try:
        chaos = chaos_until(
            client, job, wall_s=args.wall_s, every_s=args.kill_every_s, seed=args.seed
        )
        stop_job(client, job)
        done.wait(120)
    finally:
        sup.stop()
        stack.stop()
    return results(out, args.wall_s, chaos)


def run_torchloom(tmp: Path, args: argparse.Namespace) -> dict:
    stack = StackConfig(state_dir=tmp / "state-ft").build()
    stack.start()
    out = tmp / "out-ft"
    sup = Supervisor(
        script=[
            str(TRAIN),
            "--ft",
            "--job-id",
            "goodput-ft",
            "--max-steps",
            "10000000",
            "--eval-every",
            "0",
            "--log-every",
            "0",
            "--seed",
            str(args.seed),
            "--global-batch-size",
            str(GLOBAL_BATCH),
            "--out-dir",
            str(out),
        ],
        replicas=2,
        nproc_per_group=1,
        env={"TORCHLOOM_NATS_URL": stack.nats_url, "TORCHFT_LIGHTHOUSE": stack.lighthouse_url},
        log_dir=tmp / "logs-ft",
        policy=RestartPolicy(max_restarts=1000, backoff_s=0.5),
        say=lambda _: None,
    )
    return supervise_under_chaos(stack, sup, "goodput-ft", out, args)


def run_checkpoint_restart(tmp: Path, args: argparse.Namespace) -> dict:
    stack = StackConfig(state_dir=tmp / "state-ckpt", lighthouse=LighthouseConfig(url=None)).build()
    stack.start()
    out = tmp / "out-ckpt"
    # one group of 2 DDP ranks; any failure stops every rank and a fresh torchrun resumes from the checkpoint
    sup = Supervisor(
        script=[
            str(TRAIN),
            "--job-id",
            "goodput-ckpt",
            "--max-steps",
            "10000000",
            "--eval-every",
            "0",
            "--log-every",
            "0",
            "--seed",
            str(args.seed),
            "--batch-size",
            str(GLOBAL_BATCH // 2),
            "--out-dir",
            str(out),
            "--baseline-checkpoint-dir",
            str(tmp / "ckpt"),
            "--baseline-checkpoint-every",
            str(args.checkpoint_every),
        ],
        replicas=1,
        nproc_per_group=2,
        env={"TORCHLOOM_NATS_URL": stack.nats_url},
        log_dir=tmp / "logs-ckpt",
        policy=RestartPolicy(max_restarts=1000, backoff_s=0.0),
        say=lambda _: None,
    )
    return supervise_under_chaos(stack, sup, "goodput-ckpt", out, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wall-s", type=float, default=90.0)
    ap.add_argument("--kill-every-s", type=float, default=15.0)
    ap.add_argument(
        "--checkpoint-every", type=int, default=100, help="baseline: steps between checkpoints"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--keep", type=Path, default=None, help="keep logs and checkpoints in this folder"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(args.keep) if args.keep else scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        rows = [
            ("torchloom + torchft", run_torchloom(Path(tmp), args)),
            ("checkpoint-restart (torchrun)", run_checkpoint_restart(Path(tmp), args)),
        ]
    print(
        f"# goodput — {date.today()} — {socket.gethostname()}, 2 workers, {args.wall_s:g} s wall, "
        f"a SIGKILL every {args.kill_every_s:g} s (seed {args.seed}), global batch {GLOBAL_BATCH}\n"
    )
    print(
        "| run | kills | steps in final model | samples trained | test accuracy | median step ms | effective training time ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['kills']} | {r['steps']} | {r['samples']} | {r['test_acc']:.4f} | "
            f"{r['median_step_ms']:.1f} | {r['ratio']:.2f} |"
        )
    ft, ck = rows[0][1], rows[1][1]
    print(
        f"\ntorchloom + torchft trained {ft['samples'] / max(ck['samples'], 1):.2f}× the samples of checkpoint-restart "
        "in the same wall time."
    )


if __name__ == "__main__":
    main()
