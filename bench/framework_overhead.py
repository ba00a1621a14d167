"""Benchmark: what the Lightning and Hugging Face callbacks cost a training step.

Run:  python bench/framework_overhead.py [--steps 1500] [--rounds 5]

The same trainer (one process, CPU, a small MLP on random data so that the framework's own
per-step work is a large part of the step) runs alternately without the torchloom callback and
with it, connected to a live ``torchloom up`` (NATS and the Weaver in their own processes) and
flushing telemetry every 200 ms. Per round: the wall time per step over the steps after the
first 50 (the trainer's start-up is outside), and — with the callback — the time spent inside
its per-step hooks (each hook wrapped with ``time.perf_counter``), which is the callback's own
cost without the round-to-round noise of the whole step. Medians over rounds.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from up_process import UpProcess  # bench/ is on sys.path when run as a script

WARMUP = 50
LIGHTNING_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
HF_HOOKS = ("on_step_begin", "on_pre_optimizer_step", "on_step_end", "on_log")


def timed_hooks(callback: Any, hooks: tuple[str, ...], spent: list[float]) -> None:
    """Wrap the callback's per-step hooks so that the seconds spent in them add up in ``spent[0]``."""
    for name in hooks:
        fn = getattr(callback, name)

        def wrapper(*a: Any, _fn: Callable[..., Any] = fn, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        setattr(callback, name, wrapper)


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 128, generator=g), torch.randint(0, 10, (n,), generator=g))


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


def lightning_round(steps: int, with_cb: bool, url: str) -> tuple[float, float]:
    """(seconds per step, seconds per step inside the callback's hooks) of one fit."""
    import lightning as L

    from torchloom.integrations.lightning import TorchloomCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: Any, i: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer: Any, *a: Any) -> None:
            if trainer.global_step == WARMUP:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer: Any, *a: Any) -> None:
            self.t1 = time.perf_counter()

    clock, spent = Clock(), [0.0]
    callbacks: list[Any] = [clock]
    if with_cb:
        cb = TorchloomCallback(job_id="bench-lightning", nats_url=url)
        timed_hooks(cb, LIGHTNING_HOOKS, spent)
        callbacks.append(cb)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    loader = DataLoader(data(64 * steps), batch_size=64)
    trainer.fit(Module(), train_dataloaders=loader)
    n = steps - WARMUP
    return (clock.t1 - clock.t0) / n, spent[0] / steps


def hf_round(steps: int, with_cb: bool, url: str, out: Path) -> tuple[float, float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from torchloom.integrations.transformers import TorchloomCallback

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}

    class Dicts(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self) -> None:
            self.ds = data(64 * steps)

        def __len__(self) -> int:
            return len(self.ds)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x, y = self.ds[i]
            return {"x": x, "labels": y}

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            if state.global_step == WARMUP:
                self.t0 = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            self.t1 = time.perf_counter()

    clock, spent = Clock(), [0.0]
    callbacks: list[Any] = [clock]
    if with_cb:
        cb = TorchloomCallback(job_id="bench-hf", nats_url=url)
        timed_hooks(cb, HF_HOOKS, spent)
        callbacks.append(cb)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=64, learning_rate=0.01,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    Trainer(model=Model(), args=args, train_dataset=Dicts(), callbacks=callbacks).train()
    n = steps - WARMUP
    return (clock.t1 - clock.t0) / n, spent[0] / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        up = UpProcess(Path(tmp) / "state")
        try:
            rows = []
            for name, fn in (
                ("Lightning 2.6.6", lambda w: lightning_round(args.steps, w, up.nats_url)),
                ("transformers 5.24.0", lambda w: hf_round(args.steps, w, up.nats_url, Path(tmp))),
            ):
                plain, with_cb, hooks = [], [], []
                for _ in range(args.rounds):  # alternate, so drift hits both alike
                    plain.append(fn(False)[0])
                    step_s, hook_s = fn(True)
                    with_cb.append(step_s)
                    hooks.append(hook_s)
                rows.append((name, plain, with_cb, hooks))
        finally:
            up.stop()
    print(
        f"python bench/framework_overhead.py --steps {args.steps} --rounds {args.rounds} — "
        f"{date.today()}, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, 1 process, 1 torch thread; medians of {args.rounds} rounds\n"
    )
    print(
        "| trainer | without µs/step | with the callback µs/step | ratio | inside the callback's "
        "hooks µs/step | spread of the plain step between rounds |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, plain, with_cb, hooks in rows:
        p, w, h = (statistics.median(v) * 1e6 for v in (plain, with_cb, hooks))
        spread = (max(plain) - min(plain)) / p * 1e6 * 100
        print(f"| {name} | {p:.1f} | {w:.1f} | {w / p:.3f} | {h:.1f} | {spread:.1f} % |")


if __name__ == "__main__":
    main()
