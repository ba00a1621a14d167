"""Benchmark: the GPT job (examples/gpt) on this machine's GPUs — NCCL, DDP and FSDP2, bf16
autocast — steered by a real Weaver: tokens/s, MFU, held-out loss; the batch-size finder on
CUDA (doubling, then bisecting, until the allocator runs out of memory); and a CUDA
out-of-memory error provoked mid-run by lowering ``max_memory_gb``, which must keep the run
alive and its batch unchanged.

Run:  python bench/gpt_gpu.py [--steps 300] [--size gpt2-small] [--out DIR]

It starts ``torchloom up`` (embedded NATS, no dashboard) in a temporary state directory and runs
each case as a user would: ``torchrun --standalone --nproc-per-node=<GPUs>
examples/gpt/train.py …`` (with one GPU, a process group of one: NCCL and FSDP2 still run);
``set lr=…`` is sent mid-run and must be applied at one step. ``--size tiny --cpu`` runs the
same driver on a CPU (gloo, 2 processes) to check the driver itself. Prints one table and
writes ``gpt_gpu.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from torchloom.client import WeaverClient
from torchloom.paths import read_endpoint

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # GPT-2 small's shape (124M parameters with its 50k vocabulary; ~86M here: bytes, 256 tokens)
    "gpt2-small": ["--layers", "12", "--heads", "12", "--d-model", "768", "--context", "1024"],
    "tiny": ["--layers", "2", "--heads", "2", "--d-model", "64", "--context", "64"],
}


def torchloom(*args: str) -> list[str]:
    return [sys.executable, "-c", "from torchloom.cli import main; main()", *args]


def wait(pred: Any, *, timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every_s)
    raise TimeoutError(f"no {what} within {timeout_s:.0f} s")


class Case:
    """One run of the GPT job under torchrun, its output in ``out/<name>``."""

    def __init__(self, name: str, args: argparse.Namespace, *extra: str, nproc: int) -> None:
        self.name, self.dir = name, args.out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.dir / "train.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(ROOT / "examples/gpt/train.py"),
               "--job-id", name, "--out-dir", str(self.dir), *SIZES[args.size], *extra]  # fmt: skip
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def finish(self, timeout_s: float) -> list[dict[str, Any]]:
        try:
            rc = self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        self.wall_s = time.monotonic() - self.t0
        if rc != 0:
            tail = (self.dir / "train.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name}: exit status {rc}\n{tail}")
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("rank*.json"))]


def events(client: WeaverClient, job: str) -> list[Any]:
    out: list[Any] = []
    client.history(job, follow=False, on_event=out.append)
    return out


def ranks_past(client: WeaverClient, job: str, step: int) -> bool:
    try:
        jobs = client.status(job)["jobs"]
    except Exception:  # not joined yet
        return False
    ranks = [r for r in (jobs[0]["ranks"] if jobs else []) if r["state"] == "training"]
    return bool(ranks) and all(r["step"] >= step for r in ranks)


def metric(client: WeaverClient, job: str, name: str) -> float | None:
    ranks = client.status(job)["jobs"][0]["ranks"]
    vals = [(r.get("metrics") or {}).get(name) for r in ranks]
    return max((v for v in vals if v is not None), default=None)


def steer(client: WeaverClient, job: str, values: dict[str, Any]) -> dict[str, Any]:
    """``set`` and wait until every rank applied it; returns the version's config_applied event."""
    reply = client.control("set", job, values=values)
    assert reply.ok, reply.error
    applied = wait(
        lambda: [
            e
            for e in events(client, job)
            if e.kind == "config_applied" and e.version == reply.version
        ],
        timeout_s=120,
        what=f"v{reply.version} applied",
    )[0]
    return {"version": reply.version, "effective_step": reply.effective_step,
            "message": applied.message, "consistent": applied.data.get("consistent")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", choices=sorted(SIZES), default="gpt2-small")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    ap.add_argument("--cpu", action="store_true", help="check the driver on a CPU (gloo)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cases", default="fsdp,ddp,finder,oom", help="which runs, comma-separated")
    args = ap.parse_args()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="gpt-gpu-"))
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and not gpus:
        sys.exit("bench/gpt_gpu.py: no GPU here (--cpu checks the driver on a CPU)")
    nproc = gpus or 2
    device = torch.cuda.get_device_name(0) if gpus else platform.processor() or "cpu"
    state = args.out / "state"
    up_log = open(args.out / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        torchloom("up", "--state-dir", str(state), "--no-ui", "--lighthouse", "none"),
        stdout=up_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    results: dict[str, Any] = {"date": date.today().isoformat(), "device": device,
                               "gpus": gpus, "size": args.size, "torch": torch.__version__}  # fmt: skip
    try:

        def endpoint() -> dict[str, Any] | None:
            if up.poll() is not None:
                raise RuntimeError(f"torchloom up exited: {(args.out / 'up.log').read_text()}")
            return read_endpoint(state)

        ep = wait(endpoint, timeout_s=60, what="torchloom up")
        os.environ["TORCHLOOM_NATS_URL"] = ep["nats_url"]
        client = WeaverClient(nats_url=ep["nats_url"], timeout_s=10.0)
        common = ["--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
                  "--eval-every", str(max(1, args.steps // 2))]  # fmt: skip
        cases = set(args.cases.split(","))
        for parallel in ("fsdp", "ddp"):
            if parallel not in cases:
                continue
            name = f"gpt-{parallel}"
            case = Case(name, args, *common, "--parallel", parallel, nproc=nproc)
            wait(lambda n=name: ranks_past(client, n, args.steps // 3), timeout_s=300,
                 what=f"{name} at step {args.steps // 3}")  # fmt: skip
            lr = steer(client, name, {"lr": 1e-3})
            seen = client.status(name)["jobs"][0]["ranks"][0]  # as `torchloom status` shows it
            out = case.finish(timeout_s=600)
            s = out[0]
            results[name] = {
                "wall_s": round(case.wall_s, 1),
                "steps": s["step"] + 1,
                "tokens_per_s_per_rank": s["flops_per_s"] / s["flops_per_token"],
                "flops_per_s_per_rank": s["flops_per_s"],
                "mfu": s["mfu"],
                "eval_loss": s["eval_loss"],
                "first_loss": s["losses"][0],
                "last_loss": s["losses"][-1],
                "sharded": s["sharded"],
                "lr_change": lr,
                "lr_after": s["lr"],
                "same_weights": len({x["params_sha256"] for x in out}) == 1,
                "rank_seen": {"device": seen["device"], "metrics": seen["metrics"]},
            }
            print(f"{name}: {json.dumps(results[name])}", flush=True)

        if gpus and "finder" in cases:  # doubling, then bisecting, until CUDA runs out of memory
            case = Case("gpt-finder", args, "--batch-size", str(args.batch_size),
                        "--max-steps", "5", "--eval-every", "0", "--find-batch-size",
                        nproc=nproc)  # fmt: skip
            s = case.finish(timeout_s=600)[0]
            results["finder"] = {"max_batch_size": s["max_batch_size"],
                                 "wall_s": round(case.wall_s, 1)}  # fmt: skip
            print(f"finder: {json.dumps(results['finder'])}", flush=True)

        if gpus and "oom" in cases:
            # a budget lowered mid-run below the step's peak: a real CUDA out-of-memory error,
            # retried in smaller micro-batches; the memory policy makes them job-wide
            name, big = "gpt-oom", args.batch_size * 4
            case = Case(name, args, "--batch-size", str(big), "--max-steps", str(args.steps),
                        "--eval-every", "0", "--parallel", "ddp", nproc=nproc)  # fmt: skip
            wait(lambda: ranks_past(client, name, 20), timeout_s=300, what=f"{name} at step 20")
            peak = wait(lambda: metric(client, name, "mem_peak_gb"), timeout_s=60,
                        what="mem_peak_gb")  # fmt: skip
            budget = round(peak * 0.7, 2)
            lowered = steer(client, name, {"max_memory_gb": budget})
            shrunk = wait(
                lambda: [
                    e
                    for e in events(client, name)
                    if e.kind == "config_set" and (e.data.get("values") or {}).get("max_batch_size")
                ],
                timeout_s=300,
                what="the memory policy's max_batch_size",
            )[0]
            out = case.finish(timeout_s=900)
            s = out[0]
            retried = [e for e in events(client, name) if e.kind == "oom_retried"]
            results["oom"] = {
                "peak_gb": peak,
                "budget_gb": budget,
                "set_at_step": lowered["effective_step"],
                "oom_retried": [(e.step, e.data.get("micro_batch")) for e in retried],
                "policy_max_batch_size": shrunk.data["values"]["max_batch_size"],
                "samples_per_step": sorted(set(s["samples"])),
                "finished": s["stop_reason"],
                "oom_retries": s["oom_retries"],
                "last_loss": s["losses"][-1],
            }
            print(f"oom: {json.dumps(results['oom'])}", flush=True)
    finally:
        up.terminate()
        up.wait(30)
        up_log.close()
        (args.out / "gpt_gpu.json").write_text(json.dumps(results, indent=1))

    print(f"\n{results['date']}, {device} × {gpus or 'CPU'}, torch {torch.__version__}, "
          f"{args.size}, batch {args.batch_size} × context per rank, {args.steps} steps")  # fmt: skip
    print("| run | tokens/s per rank | MFU | held-out loss | lr set at one step |")
    print("| --- | --- | --- | --- | --- |")
    for parallel in ("fsdp", "ddp"):
        if f"gpt-{parallel}" not in results:
            continue
        r = results[f"gpt-{parallel}"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (CPU)"
        print(f"| {parallel} | {r['tokens_per_s_per_rank']:,.0f} | {mfu} | "
              f"{r['eval_loss']:.3f} | {r['lr_change']['message']} |")  # fmt: skip


if __name__ == "__main__":
    main()
