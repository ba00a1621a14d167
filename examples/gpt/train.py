"""A small GPT pretraining run, steered by torchloom: byte-level tokens on the Book of Genesis
(shipped in ``examples/data``), DDP or FSDP2, held-out evaluation, MFU, one seed.

    torchloom up &
    python examples/gpt/train.py --nproc 2 --max-steps 400     # DDP: re-executed under torchrun
    torchrun --nproc-per-node=2 examples/gpt/train.py --max-steps 400            # the same
    torchrun --nproc-per-node=2 examples/gpt/train.py --parallel fsdp            # FSDP2 (fully_shard)
    torchloom set lr=0.001 batch_size=32 --job gpt --wait

The config is checked before any process group starts: each problem is one line on stderr and
the exit status is 2. Each rank writes ``<out-dir>/rank<r>.json`` at the end (losses, the last
held-out loss and perplexity, achieved FLOP/s and MFU, a digest of the full weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import GPT, GPTConfig

import torchloom
from torchloom.batchsize import budget_probe, find_max_batch_size, oom_probe, peak_step_bytes
from torchloom.checkpoint import Checkpointer
from torchloom.launch import relaunch_under_torchrun
from torchloom.memory import MemoryGuard
from torchloom.mfu import mfu, peak_flops
from torchloom.seeding import seed_everything

CORPUS = Path(__file__).resolve().parents[1] / "data" / "kjv-genesis.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--job-id", default=os.environ.get("TORCHLOOM_JOB") or "gpt")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                    help="ddp (default: the model fits on every rank) or fsdp (FSDP2, sharded)")  # fmt: skip
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50, help="steps; 0: only at the end")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                    help="bf16: autocast on CUDA (the MFU table's peaks are bf16); "
                    "default: bf16 on CUDA, fp32 on a CPU")  # fmt: skip
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/gpt"))
    ap.add_argument("--ft", action="store_true",
                    help="run under torchft, one replica group per torchrun (torchloom run "
                    "--replicas N): gradients averaged across the groups every step, a group "
                    "that fails heals from a peer; with --parallel fsdp that is HSDP (sharded "
                    "within a group, replicated across groups)")  # fmt: skip
    ap.add_argument("--checkpoint-dir", default=None,
                    help="save the checkpoints the Weaver orders here (DCP, asynchronously; a "
                    "directory or fsspec URL) and resume from its choice")  # fmt: skip
    ap.add_argument("--step-delay-ms", type=float, default=0.0, help="tests: time to steer")
    ap.add_argument(
        "--find-batch-size",
        action="store_true",
        help="before training, find the largest micro-batch that fits (CUDA: until "
        "out of memory; CPU: within --memory-budget-gb) and make it max_batch_size",
    )
    ap.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="the CPU budget of the finder, GB of live tensors per rank",
    )
    ap.add_argument("--nproc", type=int, default=None,
                    help="processes on this host (run directly with python: re-executed under "
                    "torchrun); default: one per visible GPU, 1 on a CPU machine")  # fmt: skip
    return ap.parse_args(argv)


def problems(args: argparse.Namespace, config: GPTConfig) -> list[str]:
    """Everything wrong with the run's config, one line each, found before training starts."""
    out = [f"model: {p}" for p in config.problems()]
    for name in ("batch_size", "max_steps", "eval_batches"):
        if getattr(args, name) < 1:
            out.append(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.lr <= 0:
        out.append(f"--lr={args.lr} must be > 0")
    if args.find_batch_size and not torch.cuda.is_available() and not args.memory_budget_gb:
        out.append(
            "--find-batch-size on a CPU needs --memory-budget-gb (no allocator limit to hit)"
        )
    if args.nproc is not None and args.nproc < 1:
        out.append(f"--nproc={args.nproc} must be at least 1")
    if not args.corpus.is_file():
        out.append(f"--corpus {args.corpus}: no such file")
    elif args.corpus.stat().st_size // 10 < config.context + 1:
        out.append(
            f"--corpus {args.corpus}: {args.corpus.stat().st_size} bytes; the held-out tenth "
            f"must hold a window of --context {config.context} + 1"
        )
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        probe = args.out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        out.append(f"--out-dir {args.out_dir}: not writable ({exc.strerror or exc})")
    return out


def windows(
    data: torch.Tensor, starts: torch.Tensor, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, context]`` inputs and their next-byte targets from start offsets ``[B]``."""
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def autocast(device: torch.device, precision: str) -> Any:
    """The forward's autocast context: bf16 on CUDA when asked, else none."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def evaluate(model: torch.nn.Module, held_out: torch.Tensor, args: argparse.Namespace) -> float:
    """Mean held-out loss (nats per byte) over fixed windows, averaged over the ranks, on the
    model's device (``args.precision``: bf16 autocast there on CUDA)."""
    device = next(model.parameters()).device
    model.eval()
    g = torch.Generator().manual_seed(12345)  # the same windows at every evaluation
    total = torch.zeros((), device=device)
    for _ in range(args.eval_batches):
        starts = torch.randint(0, len(held_out) - args.context - 1, (args.batch_size,), generator=g)
        x, y = windows(held_out, starts, args.context)
        with torch.no_grad(), autocast(device, getattr(args, "precision", None) or "fp32"):
            logits = model(x.to(device))
        total += torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.to(device).flatten()
        )
    model.train()
    mean = total / args.eval_batches
    if dist.is_initialized():
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return float(mean)


def full_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the full weights (FSDP2's shards gathered), the same on every rank."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        h.update(name.encode())
        h.update(full.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def probe(
    config: GPTConfig, args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[int], None], tuple[Any, ...]]:
    """A training step of a copy of the model on ``b`` random samples, and what it keeps alive
    (the copy and its optimizer): what the batch-size finder and the memory guard measure —
    the run's own weights and optimizer state stay untouched, and no collective runs."""
    probe_model = GPT(config).to(device)
    probe_opt = torch.optim.AdamW(probe_model.parameters(), lr=args.lr)

    def step(b: int) -> None:
        x = torch.randint(0, config.vocab, (b, config.context), device=device)
        probe_model.loss(x, x).backward()
        probe_opt.step()
        probe_opt.zero_grad(set_to_none=True)

    return step, (probe_model, probe_opt)


def find_micro_batch(config: GPTConfig, args: argparse.Namespace, device: torch.device) -> int:
    """The largest micro-batch a training step of this model fits (every rank finds the same
    answer on its own)."""
    step, track = probe(config, args, device)
    if device.type == "cuda":
        fits = oom_probe(step)
    else:
        budget = int(args.memory_budget_gb * 1e9)
        fits = budget_probe(step, budget_bytes=budget, track=track)
    return find_max_batch_size(fits, limit=4096)


def _local(value: Any) -> Any:
    """A DTensor's shard on this rank (FSDP2), anything else as it is."""
    return value.to_local() if isinstance(value, DTensor) else value


def local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's training state as plain tensors (its FSDP2 shards): what torchft sends a
    healing replica group's rank of the same local rank (HSDP: the same shard)."""
    sd = optimizer.state_dict()
    state = {i: {k: _local(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return {
        "model": {k: _local(v) for k, v in model.state_dict().items()},
        "optim": {"state": state, "param_groups": sd["param_groups"]},
    }


def load_local_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]
) -> None:
    """Put :func:`local_state` from a peer in place (shards into this rank's shards)."""
    with torch.no_grad():
        for name, target in model.state_dict().items():
            _local(target).copy_(sd["model"][name])
    optimizer.load_state_dict(sd["optim"])
    for group in optimizer.param_groups:  # FSDP2: the state's shards become DTensors again
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if (
                    torch.is_tensor(v)
                    and not isinstance(v, DTensor)
                    and v.shape == p.to_local().shape
                ):
                    st[k] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape,
                                               stride=p.stride(), run_check=False)  # fmt: skip


def wrap(model: GPT, parallel: str) -> torch.nn.Module:
    if not dist.is_initialized():
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # the embeddings and the tied head: the root's unit
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = GPTConfig(layers=args.layers, heads=args.heads, d_model=args.d_model,
                       context=args.context)  # fmt: skip
    wrong = problems(args, config)
    if wrong:
        for line in wrong:
            print(f"gpt: {line}", file=sys.stderr)
        sys.exit(2)
    relaunch_under_torchrun(nproc=args.nproc)  # python train.py: torchrun when > 1 process

    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:  # under torchrun (with one process too: NCCL, FSDP2 on one)
        if device.type == "cuda":  # NCCL bound to this rank's GPU
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    seed_everything(args.seed)  # the same initial weights on every rank

    text = torch.frombuffer(bytearray(args.corpus.read_bytes()), dtype=torch.uint8).long()
    split = len(text) * 9 // 10
    train_data, held_out = text[:split], text[split:]
    base = GPT(config)
    flops_per_token = base.flops_per_token()
    model = wrap(base.to(device), args.parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)

    knobs: dict[str, Any] = {"lr": args.lr, "batch_size": args.batch_size,
                             "grad_clip": args.grad_clip}  # fmt: skip
    manager, opt = None, optimizer
    if args.ft:  # this torchrun is one replica group; the Manager averages across the groups
        from torchft import Optimizer as FTOptimizer

        from torchloom.examples.mnist.train import ft_manager

        manager = ft_manager(
            partial(local_state, model, optimizer),
            partial(load_local_state, model, optimizer),
            job_id=args.job_id,
            use_cuda=device.type == "cuda",
            sync_quorum=False,
            timeout_s=30.0,
            quorum_timeout_s=60.0,
        )
        opt = FTOptimizer(manager, optimizer)  # zero_grad: the quorum; step: the commit
        knobs.update(collective_timeout_s=30.0, quorum_timeout_s=60.0)
    found = find_micro_batch(config, args, device) if args.find_batch_size else None
    if found is not None:
        knobs["max_batch_size"] = found  # micro-batches of at most this; the batch unchanged
    run = torchloom.init(job_id=args.job_id, knobs=knobs, max_steps=args.max_steps)
    if found is not None:
        where = (
            "before out of memory" if device.type == "cuda" else f"in {args.memory_budget_gb} GB"
        )
        run.emit("batch_size_found", max_batch_size=found,
                 reason=f"max_batch_size={found}: the largest micro-batch that fits {where}")  # fmt: skip
    run.bind_optimizer(optimizer)
    if device.type == "cpu":  # the peak of a micro-batch, measured once per size on a copy
        probe_step, track = probe(config, args, device)
        peak_bytes: Callable[[int], int] | None = partial(peak_step_bytes, probe_step, track=track)
    else:
        peak_bytes = None  # CUDA: the allocator's own peak and limit
    # FSDP: every micro-batch is a collective, so no rank splits on its own (the memory policy
    # shrinks max_batch_size for all ranks at one step)
    guard = MemoryGuard(run, device=device, peak_bytes=peak_bytes, retry=args.parallel != "fsdp")
    ckpt = None
    if args.checkpoint_dir:  # orders by `torchloom checkpoint save` or the checkpoint policy
        ft_state = {"torchft": manager} if manager is not None else {}  # its committed step
        ckpt = Checkpointer(run, state={"model": model, "optim": optimizer, **ft_state},
                            storage=args.checkpoint_dir)  # fmt: skip
        ckpt.resume()  # the Weaver's choice, if any: run.steps() starts at its step
    if manager is not None:
        from torchloom.integrations.torchft import attach, follow_timeouts

        attach(run, manager)  # quorum, heal and commit facts to the Weaver
        follow_timeouts(run, manager)
    replica = int(os.environ.get("REPLICA_GROUP_ID", "0"))
    # each rank of each replica group its own training windows
    sampler = torch.Generator().manual_seed(args.seed * 1000 + replica * 100 + rank)
    losses: list[torch.Tensor] = []  # on the device: no sync per step (read at the end)
    samples: list[int] = []
    evals: list[tuple[int, float]] = []
    flops_per_s = mfu_now = None
    timed: deque[tuple[float, int]] = deque(maxlen=21)  # (time s, tokens) of the last steps

    def train_step(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Gradient accumulation over micro-batches of ``sizes`` (they add up to ``len(x)``)."""
        bs = len(x)
        loss = torch.zeros((), device=device)
        at = 0
        for i, m in enumerate(sizes):
            guard.check(m)  # CPU: a micro-batch over max_memory_gb is refused, as CUDA would
            xm, ym = x[at : at + m].to(device), y[at : at + m].to(device)
            at += m
            last = i == len(sizes) - 1
            sync = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()
            with sync:
                with autocast(device, args.precision):
                    logits = model(xm)
                part = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ym.flatten())
                (part * (m / bs)).backward()
            loss += part.detach() * (m / bs)
        return loss

    committed = 0
    for step in run.steps(current_step=manager.current_step if manager is not None else None):
        opt.zero_grad(set_to_none=True)  # torchft: starts this step's quorum
        if manager is not None:  # a healing group takes part; it mirrors rank 0's share
            participants, replica_rank = manager.num_participants(), manager.participating_rank()
            run.mark("comm")  # waiting for the quorum is waiting for peers, not own work
        plan = run.batch_plan(  # batch_size in micro-batches of at most max_batch_size
            **({"participants": participants, "replica_rank": replica_rank or 0}
               if manager is not None else {})
        )  # fmt: skip
        bs = plan.local_samples
        starts = torch.randint(0, len(train_data) - args.context - 1, (bs,), generator=sampler)
        x, y = windows(train_data, starts, args.context)
        run.mark("data")
        loss = guard.run_step(
            plan.micro_batches,
            partial(train_step, x, y),
            reset=lambda: optimizer.zero_grad(set_to_none=True),
        )
        run.mark("compute")
        if manager is not None:  # the mean over the replica groups (HSDP: of this shard)
            works = [manager.allreduce(_local(p.grad)) for p in model.parameters()
                     if p.grad is not None]  # fmt: skip
            for work in works:
                work.wait()
            run.mark("comm")
        run.clip_grad_norm_(model.parameters())
        before = manager.current_step() if manager is not None else step
        opt.step()  # torchft: commits the step only if every participant finished it
        committed += manager is None or manager.current_step() > before
        if args.step_delay_ms:
            time.sleep(args.step_delay_ms / 1000)
        # this rank's tokens/s over its last 20 steps (no sync: on CUDA a single step's wall
        # time is the host's, which runs ahead of the device; over a window they agree)
        timed.append((time.perf_counter(), bs * args.context))
        if len(timed) > 1:
            tokens_per_s = sum(n for _, n in list(timed)[1:]) / (timed[-1][0] - timed[0][0])
            flops_per_s = tokens_per_s * flops_per_token
            mfu_now = mfu(tokens_per_s=tokens_per_s, flops_per_token=flops_per_token, peak=peak)
        losses.append(loss.detach())
        samples.append(bs)
        metrics: dict[str, Any] = {"loss": loss,
                                   "micro_batches": len(guard.micro_batches(plan.micro_batches))}  # fmt: skip
        if flops_per_s is not None:
            metrics["flops_per_s"] = flops_per_s
        if mfu_now is not None:
            metrics["mfu"] = mfu_now
        if args.eval_every and (step + 1) % args.eval_every == 0:
            ev = evaluate(model, held_out, args)
            evals.append((step, ev))
            metrics.update(eval_loss=ev, eval_perplexity=math.exp(ev))
            timed.clear()  # evaluation is not a training step's time
        run.log(**metrics)

    if ckpt is not None:
        ckpt.close()  # the last save in flight ends first
    final_eval = evaluate(model, held_out, args)
    summary = {
        "rank": rank,
        "parallel": args.parallel,
        "step": run.step,
        "stop_reason": run.stop_reason,
        "lr": optimizer.param_groups[0]["lr"],
        "batch_size": run["batch_size"],
        "max_batch_size": run.config.get("max_batch_size"),
        "micro_batches": len(guard.micro_batches(plan.micro_batches)),
        "oom_retries": guard.retries,
        "committed": committed,
        "replica": replica,
        "samples": samples,
        "losses": torch.stack(losses).tolist() if losses else [],
        "evals": evals,
        "eval_loss": final_eval,
        "eval_perplexity": math.exp(final_eval),
        "flops_per_token": flops_per_token,
        "flops_per_s": flops_per_s,
        "mfu": mfu_now,
        "params_sha256": full_digest(model),
        "sharded": type(next(model.parameters())).__name__ == "DTensor",
    }
    name = f"replica{replica}-rank{rank}.json" if manager is not None else f"rank{rank}.json"
    (args.out_dir / name).write_text(json.dumps(summary))
    print(
        f"gpt: rank {rank} done at step {run.step}: held-out loss {final_eval:.3f} "
        f"(perplexity {math.exp(final_eval):.2f}), {flops_per_s or 0:.3g} FLOP/s"
        + (f", MFU {mfu_now:.1%}" if mfu_now is not None else "")
    )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
