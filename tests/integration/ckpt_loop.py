"""A small DDP job with a Checkpointer, for the checkpoint tests (run under torchrun).

python ckpt_loop.py URL JOB STORAGE OUT_DIR MAX_STEPS [--load ID | --resume] [--slow-save N]
    [--backup DIR --keep-last N]

A linear model on a fixed random stream (each step's batch is seeded by the step), ~6 ms a
step; at the end each rank writes ``OUT_DIR/rank<R>.json`` with its step, the SHA-256 of its
weights (and of those it started with), the loss per step and the ``(step, loss)`` trace in the order the steps ran.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import torchloom
from torchloom.checkpoint import Checkpointer

url, job, storage, out_dir, max_steps = sys.argv[1:6]
load = sys.argv[sys.argv.index("--load") + 1] if "--load" in sys.argv else None
dist.init_process_group("gloo")
rank = dist.get_rank()
if "--slow-save" in sys.argv and rank == 1:
    # a slow disk: rank 1's N-th save writes for a minute, after saying so in OUT_DIR/slow
    from torch.distributed.checkpoint import FileSystemWriter

    import torchloom.checkpoint as tc

    nth, saves = int(sys.argv[sys.argv.index("--slow-save") + 1]), []

    class SlowWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            Path(out_dir, "slow").write_text("writing")
            time.sleep(60)
            return super().write_data(plan, planner)

    real_save = tc.dcp_async_save

    def async_save(sd, **kw):
        saves.append(kw["storage_writer"].path)
        if len(saves) == nth:
            kw["storage_writer"] = SlowWriter(kw["storage_writer"].path)
        return real_save(sd, **kw)

    tc.dcp_async_save = async_save
torch.manual_seed(0)
model = torch.nn.Linear(32, 1)
ddp = DDP(model)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
run = torchloom.init(
    job_id=job, knobs={"lr": 0.05}, max_steps=int(max_steps), nats_url=url, interval_ms=100
)
run.bind_optimizer(opt)
backup = sys.argv[sys.argv.index("--backup") + 1] if "--backup" in sys.argv else None
keep_last = int(sys.argv[sys.argv.index("--keep-last") + 1]) if "--keep-last" in sys.argv else 3
ckpt = Checkpointer(
    run, state={"model": ddp, "optim": opt}, storage=storage, backup=backup, keep_last=keep_last
)
if "--resume" in sys.argv:
    ckpt.resume()  # the Weaver's choice: sets run.start_step
elif load:
    run.start_step = ckpt.load(load)
start = run.start_step


def weights_digest():
    return hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    ).hexdigest()


start_weights = weights_digest()
losses = {}
trace = []  # (step, loss) in the order run: a rollback makes steps repeat
for step in run.steps():
    g = torch.Generator().manual_seed(step * 2 + rank)
    x = torch.randn(16, 32, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(16, 1, generator=g)  # loss stays ~0.01
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses[step] = loss.item()
    trace.append((step, losses[step]))
    run.log(loss=loss)
    time.sleep(0.005)
ckpt.close()
Path(out_dir).mkdir(parents=True, exist_ok=True)
Path(out_dir, f"rank{rank}.json").write_text(
    json.dumps(
        {
            "start": start,
            "step": run.step,
            "weights": weights_digest(),
            "start_weights": start_weights,
            "losses": losses,
            "trace": trace,
        }
    )
)
dist.destroy_process_group()
