"""MNIST with PyTorch Lightning, steered live by torchloom: the one added line is the callback.

    pip install -e '.[lightning]'
    torchloom up &                                   # NATS + the Weaver + the dashboard
    torchrun --nproc-per-node=2 examples/lightning_mnist.py --max-steps 1500
    torchloom set lr=0.01 grad_clip=0.5              # applied at one step on both ranks

The job id is ``$TORCHLOOM_JOB``, else the script's name (``lightning_mnist``). Each rank
writes ``<out-dir>/rank<r>.json`` at the end: what its own Lightning objects ran with (the
optimizer's ``lr`` and ``trainer.gradient_clip_val`` at every change, seen from the module),
the last step and a digest of the weights; rank 0's ``CSVLogger`` writes Lightning's own
``metrics.csv`` under ``<out-dir>/lightning``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from torchloom.examples.mnist.mnist_data import default_data_dir, load
from torchloom.examples.mnist.train import MEAN, STD, Net, params_digest
from torchloom.integrations.lightning import TorchloomCallback


class MnistModule(L.LightningModule):
    """The reference job's CNN; logs its loss, and the ``lr`` and clip it runs with."""

    def __init__(self, *, lr: float, step_delay_ms: float = 0.0) -> None:
        super().__init__()
        self.model = Net()
        self.lr = lr
        self.step_delay_ms = step_delay_ms
        self.seen: list[tuple[int, float, float | None]] = []  # (step, lr, clip) at each change

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        lr = self.optimizers().param_groups[0]["lr"]
        clip = self.trainer.gradient_clip_val
        if not self.seen or self.seen[-1][1:] != (lr, clip):
            self.seen.append((self.global_step, lr, clip))
        self.log("loss", loss, prog_bar=True)
        self.log("lr", lr)
        self.log("grad_clip", float(clip or 0.0))
        if self.step_delay_ms:
            time.sleep(self.step_delay_ms / 1000)  # tests: time to steer a short run
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class MnistData(L.LightningDataModule):
    """MNIST's 60k training images, normalised; ``batch_size`` is a knob the callback follows."""

    def __init__(self, data_dir: Path, *, batch_size: int) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.train: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        x, y, _, _ = load(self.data_dir)
        images = (torch.from_numpy(x).float().div_(255).sub_(MEAN).div_(STD)).unsqueeze(1)
        self.train = TensorDataset(images, torch.from_numpy(y).long())

    def train_dataloader(self) -> DataLoader[Any]:
        assert self.train is not None
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--grad-clip", type=float, default=None)
    ap.add_argument("--data-dir", type=Path, default=None, help="default: the repo's MNIST")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/lightning_mnist"))
    ap.add_argument("--step-delay-ms", type=float, default=0.0)
    ap.add_argument("--no-torchloom", action="store_true", help="the same run without the callback")
    args = ap.parse_args()

    torch.manual_seed(0)
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    callbacks = [] if args.no_torchloom else [TorchloomCallback()]  # the one added line
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=args.max_steps,
        gradient_clip_val=args.grad_clip,
        callbacks=callbacks,
        logger=CSVLogger(args.out_dir, name="lightning"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    module = MnistModule(lr=args.lr, step_delay_ms=args.step_delay_ms)
    data = MnistData(args.data_dir or default_data_dir(), batch_size=args.batch_size)
    trainer.fit(module, datamodule=data)

    summary = {
        "rank": trainer.global_rank,
        "step": trainer.global_step,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "grad_clip": trainer.gradient_clip_val,
        "batch_size": data.batch_size,
        "seen": module.seen,
        "params_sha256": params_digest(module.model),
        "stop_reason": callbacks[0].run.stop_reason if callbacks and callbacks[0].run else None,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(summary))
    if torch.distributed.is_initialized():  # Lightning leaves the process group it started
        torch.distributed.barrier()  # no rank tears down while another is in a collective
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
