"""MNIST on a small CNN, data parallel with DDP, steered live by torchloom.

Launch 2 ranks with torchrun (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc-per-node 2 examples/mnist/train.py

or let ``torchloom demo`` do it. The Threadlet finds the Weaver through
``TORCHLOOM_NATS_URL`` or the endpoint of ``torchloom up``. ``batch_size`` is
read at every step, so a change takes effect exactly at its effective step; lr,
momentum, weight decay and grad clipping follow the config through the Run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mnist_data

import torchloom
from torchloom.chaos import failure_steps, maybe_fail

MEAN, STD = 0.1307, 0.3081


class Net(nn.Module):
    """Two conv layers and two linear layers: ``[N,1,28,28] float32 -> [N,10]`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class IndexStream:
    """This rank's share of the training set, epoch after epoch (DistributedSampler),
    cut into batches of whatever size is asked for at each step."""

    def __init__(self, n: int, *, world_size: int, rank: int, seed: int) -> None:
        self.sampler = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.epoch = 0
        self._buf = torch.empty(0, dtype=torch.long)

    def take(self, k: int) -> torch.Tensor:
        while self._buf.numel() < k:
            self.sampler.set_epoch(self.epoch)
            self.epoch += 1
            self._buf = torch.cat(
                [self._buf, torch.tensor(list(iter(self.sampler)), dtype=torch.long)]
            )
        out, self._buf = self._buf[:k], self._buf[k:]
        return out


def to_tensors(
    x: np.ndarray, y: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    xt = (torch.from_numpy(x).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    return xt.to(device), torch.from_numpy(y.astype(np.int64)).to(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, rank: int, world: int) -> float:
    """Test accuracy over the whole test set, each rank scoring its shard (summed with all_reduce)."""
    model.eval()
    xs, ys = x[rank::world], y[rank::world]
    correct = torch.zeros(2, dtype=torch.float64, device=x.device)
    for i in range(0, xs.shape[0], 1000):
        pred = model(xs[i : i + 1000]).argmax(1)
        correct[0] += (pred == ys[i : i + 1000]).sum()
    correct[1] = xs.shape[0]
    if world > 1:
        dist.all_reduce(correct)
    model.train()
    return float(correct[0] / correct[1])


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> None:
    """Model and optimizer before ``step`` (atomic rename), for the checkpoint-restart baseline."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "checkpoint.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optim": optimizer.state_dict()}, tmp)
    tmp.replace(folder / "checkpoint.pt")


def resume_checkpoint(
    folder: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer
) -> int:
    """Load the latest checkpoint if there is one; returns the step to start at (0 without one)."""
    path = folder / "checkpoint.pt" if folder else None
    if path is None or not path.exists():
        return 0
    state = torch.load(path, map_location="cpu")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return int(state["step"])


def params_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ft_wrap(model: nn.Module, optimizer: torch.optim.Optimizer, *, job_id: str, use_cuda: bool):
    """Wrap model and optimizer for torchft: gradients are averaged across the replica groups in
    the quorum, a step is committed only if every participant finished it, and a group that
    (re)joins heals from a peer's model and optimizer state."""
    from datetime import timedelta

    from torchft import DistributedDataParallel as FTDDP
    from torchft import Manager, ProcessGroupBabyNCCL, ProcessGroupGloo
    from torchft import Optimizer as FTOptimizer

    def state_dict():
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def load_state_dict(sd):
        model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optim"])

    pg = (
        ProcessGroupBabyNCCL(timeout=timedelta(seconds=10))
        if use_cuda
        else ProcessGroupGloo(timeout=timedelta(seconds=10))
    )
    manager = Manager(
        pg=pg,
        min_replica_size=1,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=f"{job_id}_{os.environ.get('REPLICA_GROUP_ID', '0')}",
        timeout=timedelta(seconds=10),
    )
    return FTDDP(manager, model), FTOptimizer(manager, optimizer), manager


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job-id", default=os.environ.get("TORCHLOOM_JOB", "mnist"))
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64, help="per rank")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--eval-every", type=int, default=250, help="steps between test evaluations")
    ap.add_argument(
        "--log-every", type=int, default=50, help="steps between progress lines (rank 0)"
    )
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent / "data")
    ap.add_argument(
        "--out-dir", type=Path, default=None, help="write each rank's final summary here"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--step-delay-ms", type=float, default=0.0, help="sleep per step (to slow a run for tests)"
    )
    ap.add_argument(
        "--hang-at-step",
        type=int,
        default=-1,
        help="test aid: stop stepping at this step, stay alive",
    )
    ap.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="save/resume checkpoints here (rank 0)"
    )
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ap.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="samples per step over all replica groups, held constant as groups come and go",
    )
    ap.add_argument(
        "--ft",
        action="store_true",
        help="run under torchft: one replica group per torchrun (see `torchloom run`)",
    )
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    torch.manual_seed(args.seed)

    x_tr, y_tr, x_te, y_te = mnist_data.load(args.data_dir)
    x_train, y_train = to_tensors(x_tr, y_tr, device)
    x_test, y_test = to_tensors(x_te, y_te, device)

    model = Net().to(device)
    base_opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    manager = None
    if args.ft:
        # torchft: this torchrun is one replica group; the Manager allreduces across groups
        if world > 1:
            raise SystemExit(
                "--ft runs one rank per replica group (torchloom run --nproc-per-group 1)"
            )
        ddp, opt, manager = ft_wrap(model, base_opt, job_id=args.job_id, use_cuda=use_cuda)
        groups = int(os.environ.get("NUM_REPLICA_GROUPS", "1"))
        # a replacement group (drain --replace) has a new replica id but its predecessor's shard
        shard = os.environ.get("TORCHLOOM_SHARD_INDEX", os.environ.get("REPLICA_GROUP_ID", "0"))
        shard_world, shard_rank = groups, int(shard)
    else:
        ddp = DDP(model) if world > 1 else model
        opt = base_opt
        shard_world, shard_rank = world, rank

    run = torchloom.init(
        job_id=args.job_id,
        knobs={
            "lr": args.lr,
            "batch_size": args.batch_size,
            "momentum": args.momentum,
            "global_batch_size": args.global_batch_size,
        },
        max_steps=args.max_steps,
        start_step=resume_checkpoint(args.checkpoint_dir, model, base_opt),
    )
    run.bind_optimizer(opt)
    if manager is not None:
        from torchloom.integrations.torchft import attach

        attach(run, manager)
    stream = IndexStream(x_train.shape[0], world_size=shard_world, rank=shard_rank, seed=args.seed)
    t0 = time.time()
    acc = None
    longest_step_s, t_step = 0.0, time.perf_counter()
    step_times: list[float] = []
    crash_steps = failure_steps(run.identity.replica_id)
    for step in run.steps(current_step=manager.current_step if manager is not None else None):
        now = time.perf_counter()
        step_times.append(now - t_step)
        longest_step_s, t_step = max(longest_step_s, now - t_step), now
        if (
            args.checkpoint_dir
            and rank == 0
            and step > run.start_step
            and step % args.checkpoint_every == 0
        ):
            save_checkpoint(args.checkpoint_dir, model, base_opt, step)
        maybe_fail(step, crash_steps)  # test aid: torchloom.chaos.FailurePlan
        if step == args.hang_at_step:
            print(f"[rank {rank}] hanging at step {step} (test aid)", flush=True)
            while True:
                time.sleep(1)
        opt.zero_grad(set_to_none=True)  # torchft: starts this step's quorum
        if manager is not None:  # this step's replica groups (waits for the quorum)
            participants, replica_rank = manager.num_participants(), manager.participating_rank()
        else:
            participants, replica_rank = 1, 0
        plan = run.batch_plan(participants=participants, replica_rank=replica_rank or 0)
        for i, micro in enumerate(plan.micro_batches):  # > 1: gradient accumulation, one allreduce
            idx = stream.take(micro)
            last = i == len(plan.micro_batches) - 1
            with contextlib.nullcontext() if last or not hasattr(ddp, "no_sync") else ddp.no_sync():
                loss = F.cross_entropy(ddp(x_train[idx]), y_train[idx])
                (loss * (micro / plan.local_samples)).backward()
        run.clip_grad_norm_(model.parameters())
        ft_step = manager.current_step() if manager is not None else step
        opt.step()  # torchft: commits the step only if every participant finished it
        committed = manager is None or manager.current_step() > ft_step
        run.log(
            loss=loss,
            samples=plan.local_samples if committed else 0,
            batch=plan.local_samples,
            participants=participants,
            participating=float(replica_rank is not None),
            committed=float(committed),
            ft_step=ft_step,
        )
        if args.step_delay_ms:
            time.sleep(args.step_delay_ms / 1000.0)
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            acc = evaluate(model, x_test, y_test, rank=rank, world=world)
            run.log(test_acc=acc)
        if rank == 0 and args.log_every and step % args.log_every == 0:
            print(
                f"step {step}: loss {loss.item():.4f} test_acc {acc if acc is None else round(acc, 4)} "
                f"lr {run['lr']} batch_size {run['batch_size']} v{run.applied_version} ({time.time() - t0:.1f} s)",
                flush=True,
            )
    final_step = run.step
    if manager is not None and run.stop_reason == "drained":
        manager.shutdown(wait=False)  # leave the quorum now; the other groups go on
    if run.stop_reason in ("finished", "stopped"):
        acc = evaluate(model, x_test, y_test, rank=rank, world=world)
        run.log(test_acc=acc)
    if rank == 0:
        print(
            f"done at step {final_step} ({run.stop_reason}): test accuracy {acc} in {time.time() - t0:.1f} s",
            flush=True,
        )
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        name = (
            f"replica{os.environ.get('REPLICA_GROUP_ID', '0')}-rank{rank}.json"
            if args.ft
            else f"rank{rank}.json"
        )
        (args.out_dir / name).write_text(
            json.dumps(
                {
                    "replica_id": os.environ.get("REPLICA_GROUP_ID", "0"),
                    "rank": rank,
                    "step": final_step,
                    "applied_version": run.applied_version,
                    "test_acc": acc,
                    "params_sha256": params_digest(model),
                    "longest_step_s": round(longest_step_s, 4),
                    "median_step_s": round(sorted(step_times)[len(step_times) // 2], 5)
                    if step_times
                    else None,
                    "start_step": run.start_step,
                    "lr": opt.param_groups[0]["lr"],
                    "batch_size": run["batch_size"],
                    "stop_reason": run.stop_reason,
                }
            )
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
