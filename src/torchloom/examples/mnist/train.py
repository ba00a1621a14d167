"""MNIST on a small CNN, data parallel with DDP, steered live by torchloom.

Launch 2 ranks with torchrun (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc-per-node 2 -m torchloom.examples.mnist.train

(``examples/mnist/train.py`` in a checkout runs this module too) or let ``torchloom demo`` do
it. MNIST is read from ``--data-dir``, else found or downloaded as
:func:`~torchloom.examples.mnist.mnist_data.default_data_dir` says. The Threadlet finds the Weaver through
``TORCHLOOM_NATS_URL`` or the endpoint of ``torchloom up``. Batches come from
``torchloom.data.ElasticLoader``, so ``batch_size``, ``global_batch_size`` and the
transforms ``augment`` / ``noise_std`` change exactly at their effective step even
with worker processes; lr, momentum, weight decay and grad clipping follow the
config through the Run.

Under torchft (``torchloom run --replicas N [--nproc-per-group K] -- python -m
torchloom.examples.mnist.train --ft``)
each torchrun is one replica group: torchft's DDP (``--algo ddp``) or LocalSGD / DiLoCo
(``--algo localsgd|diloco --sync-every S``, with ``sync_every`` live).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchloom
from torchloom.chaos import failure_steps, maybe_fail, nan_steps, slowdown
from torchloom.comm import GradCompression
from torchloom.data import Batch, ElasticLoader, Transforms
from torchloom.examples.mnist import mnist_data
from torchloom.integrations.torchft import last_quorum, sync_every_knob
from torchloom.optim import OPTIMIZERS, SwitchableOptimizer
from torchloom.protocol import KnobSpec
from torchloom.protocol.compression import parse_codec

MEAN, STD = 0.1307, 0.3081
Sample = tuple[torch.Tensor, torch.Tensor]  # (image [1,28,28] float32, label int64 scalar)


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
        out: torch.Tensor = self.fc2(F.relu(self.fc1(x.flatten(1))))
        return out


class MnistTrain(torch.utils.data.Dataset[Sample]):
    """The training set as normalised CPU tensors: sample ``i`` is ``(image [1,28,28] float32, label int64)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        xs, ys = self.x[idx], self.y[idx]  # one gather, not one per sample
        return list(zip(xs, ys, strict=True))


def random_shift(on: bool) -> Callable[[Sample], Sample] | None:
    """``augment=on``: shift each image by up to 2 pixels in x and y (wrapping around)."""
    if not on:
        return None

    def shift(sample: Sample) -> Sample:
        x, y = sample
        dx, dy = torch.randint(-2, 3, (2,)).tolist()
        return torch.roll(x, shifts=(dy, dx), dims=(1, 2)), y

    return shift


def gaussian_noise(std: float | None) -> Callable[[Sample], Sample] | None:
    """``noise_std=S``: add N(0, S²) noise to each (normalised) image; off or 0 removes it."""
    if not std:
        return None

    def noise(sample: Sample) -> Sample:
        x, y = sample
        return x + std * torch.randn_like(x), y

    return noise


def data_transforms() -> Transforms:
    """The job's runtime-switchable transforms: ``torchloom set augment=on noise_std=0.2``."""
    t = Transforms()
    t.register(KnobSpec(name="augment", type="bool", doc="random ±2 px shifts"), random_shift)
    t.register(
        KnobSpec(
            name="noise_std",
            type="float",
            min=0.0,
            max=2.0,
            allow_off=True,
            doc="std of Gaussian noise added to each image",
        ),
        gaussian_noise,
    )
    return t


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


def save_checkpoint(folder: Path, state: dict[str, Any], step: int) -> None:
    """The training state before ``step`` (atomic rename), for the checkpoint-restart baseline."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "checkpoint.pt.tmp"
    torch.save({"step": step, **state}, tmp)
    tmp.replace(folder / "checkpoint.pt")


def resume_checkpoint(folder: Path | None) -> tuple[int, dict[str, Any] | None]:
    """The latest checkpoint if there is one: ``(step to start at, state)``; ``(0, None)`` without."""
    path = folder / "checkpoint.pt" if folder else None
    if path is None or not path.exists():
        return 0, None
    state = torch.load(path, map_location="cpu")
    return int(state.pop("step")), state


def params_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ft_manager(
    state_dict: Callable[[], dict[str, Any]],
    load_state_dict: Callable[[dict[str, Any]], None],
    *,
    job_id: str,
    use_cuda: bool,
    sync_quorum: bool,
    timeout_s: float,
    quorum_timeout_s: float,
) -> Any:
    """torchft's Manager for this replica group: a step (DDP) or an outer step (LocalSGD/DiLoCo)
    is committed only if every participant finished it, and a group that (re)joins heals from a
    peer's training state (model, optimizer, data cursor). ``sync_quorum``: DiLoCo needs the
    quorum before the sync."""
    from datetime import timedelta

    from torchft import Manager, ProcessGroupBabyNCCL, ProcessGroupGloo

    pg = (
        ProcessGroupBabyNCCL(timeout=timedelta(seconds=timeout_s))
        if use_cuda
        else ProcessGroupGloo(timeout=timedelta(seconds=timeout_s))
    )
    return Manager(
        pg=pg,
        min_replica_size=1,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=f"{job_id}_{os.environ.get('REPLICA_GROUP_ID', '0')}",
        timeout=timedelta(seconds=timeout_s),
        quorum_timeout=timedelta(seconds=quorum_timeout_s),
        use_async_quorum=not sync_quorum,
        # every rank starts from the same seed, so no step-0 heal: with it, torchft picks a
        # source group per local rank, and in a group of several ranks some heal (their
        # gradients zeroed) while the others do not: the group's ranks then step with different
        # gradients and their weights part (seen: 1 start in ~15 with 2 groups x 2 ranks)
        init_sync=False,
    )


def outer_algorithm(
    name: str, manager: Any, model: nn.Module, inner: Any, *, sync_every: int
) -> Any:
    """torchft's LocalSGD (average the weights every ``sync_every`` inner steps) or DiLoCo (an outer
    Nesterov SGD step on the averaged pseudo-gradient, lr 0.7 as in the paper; momentum 0.5, as
    the paper's 0.9 diverged on this small CNN with an SGD inner optimizer)."""
    from torchft.local_sgd import DiLoCo, LocalSGD

    if name == "localsgd":
        return LocalSGD(manager, model, inner, sync_every=sync_every)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.5, nesterov=True)
    return DiLoCo(
        manager, [model], inner, outer, sync_every=sync_every, pin_memory=torch.cuda.is_available()
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job-id", default=os.environ.get("TORCHLOOM_JOB", "mnist"))
    ap.add_argument("--max-steps", type=int, default=2000, help="steps (outer steps with --algo)")
    ap.add_argument("--batch-size", type=int, default=64, help="per rank")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, β1 of the others")
    ap.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="the optimizer to start with (the `optimizer` knob switches it live)",
    )
    ap.add_argument(
        "--grad-compression",
        default="none",
        help="gradient codec to start with: none, bf16, fp16, powersgd:R, topk:F "
        "(the `grad_compression` knob switches it live)",
    )
    ap.add_argument("--eval-every", type=int, default=250, help="steps between test evaluations")
    ap.add_argument(
        "--log-every", type=int, default=50, help="steps between progress lines (rank 0)"
    )
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="MNIST (mnist.npz or the IDX files) [default: $TORCHLOOM_MNIST_DIR, a checkout's "
        "examples/mnist/data, else ~/.cache/torchloom/mnist, downloaded there once]",
    )
    ap.add_argument(
        "--num-workers", type=int, default=1, help="data-loader worker processes per rank"
    )
    ap.add_argument(
        "--out-dir", type=Path, default=None, help="write each rank's final summary here"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--checksum-every",
        type=int,
        default=0,
        help="log the sum of the weights (float64) every N steps: equal on ranks with equal weights",
    )
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
        "--checkpoint-dir",
        default=None,
        help="checkpoints the Weaver orders are written here, a directory or a URL such as "
        "s3://bucket/prefix (DCP; under --ft by one replica group), and the job resumes from "
        "the one the Weaver chooses (--algo ddp)",
    )
    ap.add_argument(
        "--from-scratch", action="store_true", help="with --checkpoint-dir: do not resume"
    )
    ap.add_argument(
        "--checkpoint-compress", action="store_true", help="zstd-compress the checkpoint files"
    )
    ap.add_argument(
        "--checkpoint-backup",
        default=None,
        help="copy every complete checkpoint here too (a directory or URL), with retention:",
    )
    ap.add_argument("--backup-keep-last", type=int, default=3, help="… the newest N")
    ap.add_argument("--backup-keep-every", type=int, default=0, help="… every N-th (0: none)")
    ap.add_argument("--backup-keep-best", action="store_true", help="… the lowest-loss one")
    ap.add_argument(
        "--backup-every", type=int, default=1, help="copy every N-th complete checkpoint"
    )
    ap.add_argument(
        "--baseline-checkpoint-dir",
        type=Path,
        default=None,
        help="bench baseline: rank 0 torch.saves here every --baseline-checkpoint-every steps "
        "and a restart resumes from it (no Weaver involved)",
    )
    ap.add_argument(
        "--baseline-checkpoint-every", type=int, default=100, help="bench baseline: steps"
    )
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
    ap.add_argument(
        "--algo",
        choices=("ddp", "localsgd", "diloco"),
        default="ddp",
        help="with --ft: average gradients every step (ddp), or weights (localsgd) / "
        "pseudo-gradients (diloco) every --sync-every inner steps",
    )
    ap.add_argument(
        "--collective-timeout-s",
        type=float,
        default=10.0,
        help="with --ft: torchft's collective/commit timeout (the `collective_timeout_s` knob)",
    )
    ap.add_argument(
        "--quorum-timeout-s",
        type=float,
        default=10.0,
        help="with --ft: torchft's quorum timeout (the `quorum_timeout_s` knob)",
    )
    ap.add_argument(
        "--sync-every", type=int, default=10, help="inner steps per outer step (localsgd, diloco)"
    )
    args = ap.parse_args()
    if args.algo != "ddp" and not args.ft:
        ap.error("--algo localsgd/diloco needs --ft")
    try:
        parse_codec(args.grad_compression)
    except ValueError as exc:
        ap.error(f"--grad-compression: {exc}")
    if args.algo != "ddp" and args.global_batch_size is not None:
        ap.error("--global-batch-size is for --algo ddp (localsgd/diloco take --batch-size)")
    return args


def main() -> None:
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        # every rank of every replica group on this machine shares its cores
        procs = world * int(os.environ.get("NUM_REPLICA_GROUPS", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    torch.manual_seed(args.seed)

    x_tr, y_tr, x_te, y_te = mnist_data.load(args.data_dir or mnist_data.default_data_dir())
    train_set = MnistTrain(*to_tensors(x_tr, y_tr, torch.device("cpu")))  # loader workers: CPU
    x_test, y_test = to_tensors(x_te, y_te, device)

    model = Net().to(device)
    # the `optimizer` knob rebuilds it live (SGD, AdamW, Lion, Muon) with its state mapped
    base_opt = SwitchableOptimizer(model, kind=args.optimizer, lr=args.lr, momentum=args.momentum)
    transforms = data_transforms()
    custom_knobs = transforms.knobs()
    if args.checkpoint_dir and args.algo != "ddp":
        raise SystemExit("--checkpoint-dir is for --algo ddp (LocalSGD/DiLoCo state is not saved)")
    start_step, checkpoint = resume_checkpoint(args.baseline_checkpoint_dir)
    manager: Any = None
    algo: Any = None
    ddp: nn.Module = DDP(model) if world > 1 else model  # averages within the replica group
    opt = base_opt

    def state_dict() -> dict[str, Any]:
        """The training state a peer heals from and a checkpoint holds: model, optimizer, data."""
        return {
            "model": model.state_dict(),
            "optim": base_opt.state_dict(),
            "data": loader.state_dict(),
        }

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        base_opt.load_state_dict(sd["optim"])
        loader.load_state_dict(sd["data"])

    if args.ft:
        # torchft: this torchrun is one replica group; its Manager averages across the groups
        from torchft import Optimizer as FTOptimizer

        manager = ft_manager(
            state_dict,
            load_state_dict,
            job_id=args.job_id,
            use_cuda=use_cuda,
            sync_quorum=args.algo != "ddp",
            timeout_s=args.collective_timeout_s,
            quorum_timeout_s=args.quorum_timeout_s,
        )
        groups = int(os.environ.get("NUM_REPLICA_GROUPS", "1"))
        # a replacement group (drain --replace) has a new replica id but its predecessor's place
        shard = int(
            os.environ.get("TORCHLOOM_SHARD_INDEX", os.environ.get("REPLICA_GROUP_ID", "0"))
        )
        shard = min(shard, groups - 1)
        if args.algo == "ddp":
            # gradients are averaged across the groups after backward (local_step), so that the
            # time a group computes and the time it waits for its peers are told apart
            opt = FTOptimizer(manager, base_opt)
        else:
            algo = outer_algorithm(args.algo, manager, model, base_opt, sync_every=args.sync_every)
            custom_knobs.append(sync_every_knob(algo))

    run = torchloom.init(
        job_id=args.job_id,
        knobs={
            "lr": args.lr,
            "batch_size": args.batch_size,
            "momentum": args.momentum,
            "optimizer": args.optimizer,
            "grad_compression": args.grad_compression,
            "global_batch_size": args.global_batch_size,
            "skip_nonfinite": True,  # a NaN step is zeroed on the device, not applied
            **({"sync_every": args.sync_every} if algo is not None else {}),
            **(
                {
                    "collective_timeout_s": args.collective_timeout_s,
                    "quorum_timeout_s": args.quorum_timeout_s,
                }
                if manager is not None
                else {}
            ),
        },
        custom_knobs=custom_knobs,
        max_steps=args.max_steps,
        start_step=start_step,
    )
    run.bind_optimizer(opt)
    # one DDP comm hook (within the group) and the allreduce across groups, both following
    # the `grad_compression` knob from the step it takes effect
    compression = GradCompression(run, manager=manager, seed=args.seed)
    if isinstance(ddp, DDP):
        compression.register(ddp)
    loader = ElasticLoader(
        train_set,
        run=run,
        transforms=transforms,
        group_world_size=world,
        group_rank=rank,
        num_workers=args.num_workers,
        seed=args.seed,
        pin_memory=use_cuda,
    )
    if checkpoint is not None:
        load_state_dict(checkpoint)
    ckpt = None
    if args.checkpoint_dir:
        from torchloom.checkpoint import Checkpointer

        # under torchft the Manager's committed step goes with it: run.steps() counts it
        ft_state = {"torchft": manager} if manager is not None else {}
        ckpt = Checkpointer(
            run,
            state={"model": model, "optim": base_opt, "data": loader, **ft_state},
            storage=args.checkpoint_dir,
            compress=args.checkpoint_compress,
            backup=args.checkpoint_backup,
            keep_last=args.backup_keep_last,
            keep_every=args.backup_keep_every,
            keep_best=args.backup_keep_best,
            backup_every=args.backup_every,
        )
        ckpt.resume(from_scratch=args.from_scratch)  # the Weaver's choice: sets run.start_step
    if manager is not None:
        from torchloom.integrations.torchft import (
            attach,
            follow_sync_every,
            follow_timeouts,
            participant_ids,
        )

        attach(run, manager)
        follow_timeouts(run, manager)
        if algo is not None:
            follow_sync_every(run, algo)

    def quorum() -> tuple[int, int, tuple[str, ...] | None]:
        """This step's replica groups, our rank among them and their ids (waits for the quorum)."""
        if manager is None:
            return 1, 0, None
        # a group that is healing does not take part in the step: it mirrors rank 0's share
        n, rank_in = manager.num_participants(), manager.participating_rank() or 0
        return n, rank_in, participant_ids(manager, job_id=args.job_id)

    slow = slowdown(run.identity.replica_id)  # test aid: torchloom.chaos.FailurePlan.slow
    poison = nan_steps(run.identity.replica_id)  # test aid: FailurePlan.nan_at

    def local_step(
        step: int, participants: int, replica_rank: int, ids: tuple[str, ...] | None = None
    ) -> tuple[torch.Tensor, Batch]:
        """Forward and backward of this rank's share, in micro-batches (gradient accumulation);
        marks the time spent waiting for data and computing."""
        batch = loader.next(
            step=step, participants=participants, replica_rank=replica_rank, participant_ids=ids
        )
        x, y = (t.to(device, non_blocking=True) for t in batch.data)
        run.mark("data")
        t_compute = time.perf_counter()
        plan, first = batch.plan, 0
        for i, micro in enumerate(plan.micro_batches):
            last = i == len(plan.micro_batches) - 1
            with ddp.no_sync() if isinstance(ddp, DDP) and not last else contextlib.nullcontext():
                loss = F.cross_entropy(ddp(x[first : first + micro]), y[first : first + micro])
                if step in poison:
                    loss = loss * float("nan")
                # uneven shares (batch_weights): weigh each group by its samples
                torch.autograd.backward(loss * (micro / plan.local_samples) * plan.loss_scale)
            first += micro
        if slow is not None and step >= slow[0]:  # a slower device: compute takes factor × as long
            time.sleep((slow[1] - 1.0) * (time.perf_counter() - t_compute))
        run.mark("compute")
        if manager is not None and algo is None:
            # DDP averaged within the group (several ranks); now across the groups
            compression.allreduce_across([p.grad for p in model.parameters() if p.grad is not None])
        run.guard_gradients(model.parameters())
        return loss, batch

    t0 = time.time()
    acc = None
    longest_step_s, t_step = 0.0, time.perf_counter()
    step_times: list[float] = []
    crash_steps = failure_steps(run.identity.replica_id)
    with algo if algo is not None else contextlib.nullcontext():
        for step in run.steps(current_step=manager.current_step if manager is not None else None):
            now = time.perf_counter()
            step_times.append(now - t_step)
            longest_step_s, t_step = max(longest_step_s, now - t_step), now
            if (
                args.baseline_checkpoint_dir
                and rank == 0
                and step > run.start_step
                and step % args.baseline_checkpoint_every == 0
            ):
                save_checkpoint(args.baseline_checkpoint_dir, state_dict(), step)
            maybe_fail(step, crash_steps)  # test aid: torchloom.chaos.FailurePlan
            if step == args.hang_at_step:
                print(f"[rank {rank}] hanging at step {step} (test aid)", flush=True)
                while True:
                    time.sleep(1)
            ft_step = manager.current_step() if manager is not None else step
            if algo is None:
                opt.zero_grad(set_to_none=True)  # torchft: starts this step's quorum
                participants, replica_rank, ids = quorum()
                if manager is not None:
                    # waiting for the quorum is waiting for the peers, not this rank's own work
                    run.mark("comm")
                loss, batch = local_step(step, participants, replica_rank, ids)
                opt.step()  # torchft: commits the step only if every participant finished it
                run.mark("comm")
                inner = 1
            else:  # one outer step: sync_every inner steps, then the algorithm's sync
                inner = run["sync_every"]
                # the groups split each inner step's data as in the last outer sync's quorum
                participants, replica_rank = last_quorum(manager) or (groups, shard)
                for i in range(inner):
                    opt.zero_grad(set_to_none=True)
                    loss, batch = local_step(step, participants, replica_rank)
                    # every inner step moves the shared cursor on every group, before the sync
                    # (where a joining group heals, cursor included)
                    loader.advance()
                    opt.step()  # after the last inner step: quorum, average, commit
                    run.mark("comm" if i == inner - 1 else "compute")
            committed = manager is None or manager.current_step() > ft_step
            if algo is None:
                loader.advance(committed=committed)
            run.log(
                loss=loss,
                samples=inner * batch.plan.local_samples if committed else 0,
                batch=batch.plan.local_samples,
                cursor=batch.start - batch.plan.offset,
                participants=participants,
                participating=float(manager is None or manager.is_participating()),
                committed=float(committed),
                ft_step=ft_step,
                inner_steps=inner,
                outer_syncs=manager.current_step() - ft_step if algo is not None else 0,
                from_workers=float(batch.source == "worker"),
                # the transform settings the batch was made with (not merely the config)
                **{f"data_{name}": float(value or 0) for name, value in batch.settings},
            )
            if args.checksum_every and step % args.checksum_every == 0:
                run.log(weights_sum=sum(p.detach().double().sum() for p in model.parameters()))
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
    loader.close()
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
                    "lr": base_opt.param_groups[0]["lr"],
                    "optimizer": base_opt.kind,
                    "grad_compression": compression.codec,
                    "comm_bytes": dict(run.shared.comm_totals),
                    "steps_run": run.shared.steps_run,
                    "batch_size": run["batch_size"],
                    "sync_every": run.config.get("sync_every"),
                    "data_cursor": loader.stream.cursor,
                    "batches": dict(loader.stats),
                    "stop_reason": run.stop_reason,
                    "ft_step": manager.current_step() if manager is not None else None,
                    "quorum": run.quorum,
                }
            )
        )
    if ckpt is not None:
        ckpt.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
