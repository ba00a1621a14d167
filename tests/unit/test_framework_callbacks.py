"""The Lightning and Hugging Face callbacks in one process with no NATS session: real
trainers on tiny models, desired configs offered by hand at a chosen step."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchloom.protocol import ConfigSnapshot, DesiredConfig, KnobSpec
from torchloom.threadlet.identity import default_job_id


def offer(run: Any, *snaps: dict[str, Any]) -> None:
    run.shared.offer(
        DesiredConfig(
            job_id=run.identity.job_id,
            snapshots=[ConfigSnapshot(issued_ts=time.time(), **s) for s in snaps],
        ),
        time.time(),
    )


def test_default_job_id(monkeypatch):
    monkeypatch.delenv("TORCHLOOM_JOB", raising=False)
    assert default_job_id("/x/y/train_lm.py") == "train_lm"
    assert default_job_id("/x/pkg/__main__.py") == "pkg"
    assert default_job_id("my job.v2.py") == "my-job-v2"
    assert default_job_id("-c") == "python" and default_job_id("") == "python"
    assert len(default_job_id("a" * 100 + ".py")) == 64
    monkeypatch.setenv("TORCHLOOM_JOB", "other")
    assert default_job_id("/x/train_lm.py") == "other"


# ---- Lightning -------------------------------------------------------------------------


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.dropout_p = 0.0  # a custom knob lands here
        self.batches: list[tuple[int, int, float]] = []  # (global_step, batch len, dropout_p)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        self.batches.append((self.global_step, len(x), self.dropout_p))
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss)
        self.log("twice", loss * 2, on_step=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.ds = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))

    def train_dataloader(self) -> Any:
        return DataLoader(self.ds, batch_size=self.batch_size)


class OfferAt(L.Callback):
    """Offers desired configs to the torchloom callback's run at given steps."""

    def __init__(self, tl: Any, at: dict[int, list[dict[str, Any]]]) -> None:
        self.tl, self.at = tl, at

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        snaps = self.at.pop(trainer.global_step, None)
        if snaps:
            offer(self.tl.run, *snaps)


def lightning_fit(tl: Any, at: dict[int, list[dict[str, Any]]], **trainer_kw: Any) -> tuple:
    module, data = Tiny(), TinyData(batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[OfferAt(tl, at), tl],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kw,
    )
    trainer.fit(module, datamodule=data)
    return trainer, module, data


def test_lightning_applies_knobs_at_the_effective_step():
    from torchloom.integrations.lightning import TorchloomCallback

    knob = KnobSpec(name="dropout_p", type="float", min=0.0, max=1.0)
    tl = TorchloomCallback(job_id="t", connect=False, custom_knobs=[knob])
    new = {"lr": 0.01, "grad_clip": 0.25, "dropout_p": 0.5, "batch_size": 16, "max_steps": 30}
    trainer, module, data = lightning_fit(
        tl,
        {3: [dict(version=2, effective_step=5, values=new)]},
        max_steps=100,
    )
    run = tl.run
    # read off the trainer at the start, then the version's values from step 5 on
    assert trainer.global_step == 30 and run.stop_reason == "finished"
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.01
    assert trainer.gradient_clip_val == 0.25 and data.batch_size == 16
    assert [p for s, _, p in module.batches if s < 5] == [0.0] * 5
    assert {p for s, _, p in module.batches if s >= 5} == {0.5}
    # batch_size: this epoch's loader (8 per batch, 8 batches) runs out; the next one has 16
    assert [n for s, n, _ in module.batches if s < 8] == [8] * 8
    assert {n for s, n, _ in module.batches if s >= 8} == {16}
    kinds = [e.kind for e in run.shared.events.drain()]
    assert "batch_size_deferred" in kinds
    # what self.log logged on step, each value once per step
    names = [set(v) for _, _, v in run.shared.points.drain()]
    assert all(n == {"loss", "twice"} for n in names) and len(names) == 30


def test_lightning_stop_and_a_bad_knob_fail_open():
    from torchloom.integrations.lightning import TorchloomCallback

    knob = KnobSpec(name="missing_attr", type="int", min=0, max=10)
    tl = TorchloomCallback(job_id="t", connect=False, custom_knobs=[knob])

    class Refuses(Tiny):
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "missing_attr":
                raise RuntimeError("no such attribute here")
            super().__setattr__(name, value)

    module, data = Refuses(), TinyData(batch_size=8)
    snaps = [
        dict(version=2, effective_step=4, values={"missing_attr": 3}),
        dict(version=3, effective_step=6, values={"missing_attr": 3}, run_state="stopped"),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[OfferAt(tl, {2: snaps}), tl],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        max_steps=100,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 6 and tl.run.stop_reason == "stopped"
    failed = [e for e in tl.run.shared.events.drain() if e.kind == "config_not_applied"]
    assert failed and "no such attribute here" in failed[0].reason


# ---- Hugging Face Trainer --------------------------------------------------------------


class HFModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.layer(x), labels)}


class HFData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(256, 4, generator=g), torch.randn(256, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def hf_train(tmp_path, at: dict[int, list[dict[str, Any]]], **kw: Any) -> tuple:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from torchloom.integrations.transformers import TorchloomCallback

    tl = TorchloomCallback(job_id="t", connect=False)
    lrs: dict[int, float] = {}

    class Offer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            snaps = at.pop(state.global_step, None)
            if snaps:
                offer(tl.run, *snaps)

        def on_step_begin(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            lrs[state.global_step] = k["optimizer"].param_groups[0]["lr"]

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=4,
        learning_rate=0.01, lr_scheduler_type="linear", warmup_steps=10, max_grad_norm=1.0,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, **kw,
    )  # fmt: skip
    trainer = Trainer(model=HFModel(), args=args, train_dataset=HFData(), callbacks=[Offer(), tl])
    trainer.train()
    return trainer, tl, lrs


def test_transformers_rescales_the_schedule_and_sets_clipping_at_the_step(tmp_path):
    new = {"lr": 0.005, "grad_clip": 0.5}
    trainer, tl, lrs = hf_train(tmp_path, {12: [dict(version=2, effective_step=15, values=new)]})
    linear = lambda s: min(s / 10, (40 - s) / 30)  # noqa: E731 - warm-up 10, decay to 40
    for step, lr in lrs.items():
        peak = 0.01 if step < 15 else 0.005
        assert lr == pytest.approx(peak * linear(step)), step
    assert trainer.args.max_grad_norm == 0.5 and set(trainer.lr_scheduler.base_lrs) == {0.005}
    assert trainer.state.global_step == 40 and tl.run.stop_reason == "finished"
    logged = [v for _, _, v in tl.run.shared.points.drain()]
    assert logged and all("loss" in v or "train_runtime" in v for v in logged)


def test_transformers_stops_and_caps_max_steps(tmp_path):
    snaps = [
        dict(version=2, effective_step=8, values={"max_steps": 500}),
        dict(version=3, effective_step=20, values={"max_steps": 500}, run_state="stopped"),
    ]
    trainer, tl, _ = hf_train(tmp_path, {5: snaps})
    assert trainer.state.global_step == 20 and tl.run.stop_reason == "stopped"
    capped = [e for e in tl.run.shared.events.drain() if e.kind == "max_steps_capped"]
    assert capped and capped[0].data["max_steps"] == 40


# ---- accelerate ------------------------------------------------------------------------


def test_accelerate_init_run_takes_the_accelerators_identity_and_binds_the_optimizer():
    from accelerate import Accelerator

    from torchloom.integrations.accelerate import init_run

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = init_run(accelerator, optimizer, job_id="acc", connect=False, knobs={"lr": 0.02})
    assert (run.identity.rank, run.identity.group_world_size) == (0, 1)
    assert optimizer.param_groups[0]["lr"] == 0.02  # the knob, not the constructor's value
    lrs = {}
    for step in run.steps():
        if step == 2:
            offer(run, dict(version=2, effective_step=5, values={"lr": 0.001, "beta2": 0.95}))
        lrs[step] = optimizer.optimizer.param_groups[0]["lr"]
        loss = model(torch.randn(8, 4)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step == 9:
            break
    assert [lrs[s] for s in range(10)] == [0.02] * 5 + [0.001] * 5
    assert optimizer.param_groups[0]["betas"][1] == 0.95


def test_lightning_drain_of_this_replica_group_ends_the_fit_at_the_step():
    from torchloom.integrations.lightning import TorchloomCallback

    tl = TorchloomCallback(job_id="t", connect=False)
    snaps = [dict(version=2, effective_step=7, values={}, drained=["0"])]
    trainer, _, _ = lightning_fit(tl, {1: snaps}, max_steps=100)
    assert trainer.global_step == 7 and tl.run.stop_reason == "drained"
    assert tl.run.state == "exited"  # closed: the Weaver hears the rank leave
