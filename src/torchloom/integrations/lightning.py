"""PyTorch Lightning: one callback lets the Weaver steer a ``Trainer`` at the step it chooses.

Needs the ``lightning`` extra (``lightning==2.6.6``; ``pytorch-lightning`` 2.6 works too).
One line in the script::

    from torchloom.integrations.lightning import TorchloomCallback
    trainer = L.Trainer(max_steps=2000, callbacks=[TorchloomCallback()])

What it does, on every rank (all on the training thread, at Lightning's hooks):

* **Starts the Threadlet** at ``on_fit_start`` with the trainer's identity: job id from
  ``job_id=``, else ``$TORCHLOOM_JOB``, else the script's name; rank ``trainer.global_rank``
  among ``trainer.world_size``; replica group from ``$TORCHLOOM_REPLICA_ID`` /
  ``$REPLICA_GROUP_ID``, else ``"0"``. The initial knobs are read off the trainer — ``lr``
  (the first optimizer's first param group), ``grad_clip`` (``gradient_clip_val`` when the
  algorithm is ``norm``), ``max_steps``, ``batch_size`` (see below) — and ``knobs=`` given to
  the callback override them (and are put in force at the start).
* **Applies each config version at its effective step**: the step boundary is
  ``on_train_batch_end`` of the batch that completed an optimizer step (Lightning has
  already counted it in ``trainer.global_step``), so version *v* with effective step *S* is in
  force for step *S* on every rank. ``lr``, ``weight_decay``, ``momentum``/``beta2`` go to
  every param group of every optimizer (a learning-rate scheduler that sets ``lr`` itself
  overrides the knob at its next step: steer ``lr`` with no scheduler, or a custom knob the
  scheduler reads); ``grad_clip`` to ``trainer.gradient_clip_val`` (Lightning clips with it
  before each optimizer step; ``None`` turns clipping off); ``max_steps`` to the fit loop;
  the script's custom knobs (``custom_knobs=``) to attributes of the ``LightningModule``
  with the knob's name.
* ``batch_size``: where the ``LightningDataModule`` (else the ``LightningModule``) has a
  ``batch_size`` attribute it is a knob; a change sets the attribute at the effective step and
  Lightning builds the train ``DataLoader`` again — at the start of the next epoch, the only
  point where Lightning rebuilds it (a ``batch_size_deferred`` event says so).
* **Logs what ``self.log`` logs** on step (the values of this step, as tensors: turned into
  floats on the Threadlet's thread, never here), and reports the phases ``data`` (until
  ``on_train_batch_start``), ``compute`` (forward and backward, until
  ``on_before_optimizer_step``; under DDP the gradient allreduce overlaps the backward and
  is counted here) and ``other``.
* **Pause, stop, drain** at one step on every rank: a pause blocks in the boundary (outside
  any collective); a stop, a drain of this replica group or ``max_steps`` set
  ``trainer.should_stop``, so every rank ends before the same step. It never calls Lightning's
  ``reduce_boolean_decision`` (no collective, no device sync): the effective step already
  makes the decision the same on every rank.
* **Fails open**: with NATS or the Weaver down training runs on its knobs; an error applying
  a knob is logged and sent as a ``config_not_applied`` event, and training goes on.

Lightning's own ``Trainer`` runs one replica group (DDP/FSDP within it); torchft's quorum
across groups is not wired into Lightning's loops here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torchloom.integrations._trainer import RunOptions, apply_failing_open
from torchloom.protocol import KnobSpec
from torchloom.threadlet import Run


def _lightning() -> Any:
    """``lightning.pytorch``, or ``pytorch_lightning`` when only that one is installed or it is
    the one the script already imported (their ``Callback`` classes differ)."""
    if "pytorch_lightning" in sys.modules and "lightning.pytorch" not in sys.modules:
        import pytorch_lightning

        return pytorch_lightning
    try:
        import lightning.pytorch

        return lightning.pytorch
    except ImportError:
        import pytorch_lightning

        return pytorch_lightning


_Callback: Any = _lightning().Callback
log = logging.getLogger("torchloom.integrations.lightning")

_TRAINER_KNOBS = ("grad_clip", "max_steps", "batch_size")


class TorchloomCallback(_Callback):  # type: ignore[misc]
    """A Lightning ``Callback`` that puts the trainer under the Weaver's control.

    Args:
        job_id: the job's id; default ``$TORCHLOOM_JOB``, else the script's name.
        knobs: initial knob values that override what is read off the trainer (validated at
            ``on_fit_start``; raise :class:`~torchloom.errors.InvalidKnobError` there).
        custom_knobs: the script's own knobs; each is applied to the ``LightningModule``
            attribute of the same name (initial value: that attribute, when it exists).
        nats_url: NATS server; default ``$TORCHLOOM_NATS_URL``, then ``torchloom up``'s endpoint.
        interval_ms: telemetry flush and heartbeat period, in milliseconds.
        log_metrics: send what ``self.log`` logs on step (default True).
        connect: False runs with no NATS session (a baseline; for tests).

    Attributes:
        run: the :class:`~torchloom.threadlet.Run` once the fit started, else None.
    """

    def __init__(
        self,
        *,
        job_id: str | None = None,
        knobs: Mapping[str, Any] | None = None,
        custom_knobs: Sequence[KnobSpec] = (),
        nats_url: str | None = None,
        interval_ms: float = 200.0,
        log_metrics: bool = True,
        connect: bool = True,
    ) -> None:
        super().__init__()
        self._options = RunOptions(
            job_id=job_id,
            knobs=dict(knobs or {}),
            custom_knobs=list(custom_knobs),
            nats_url=nats_url,
            interval_ms=interval_ms,
            connect=connect,
        )
        self._log_metrics = log_metrics
        self.run: Run | None = None
        self._trainer: Any = None
        self._module: Any = None
        self._boundary_step = -1
        self._sent: dict[str, Any] = {}  # name -> the last tensor sent (Lightning clones per log)

    # ---- start and end -----------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer, self._module = trainer, pl_module
        run = self._options.start(
            initial=self._read_trainer(trainer, pl_module),
            rank=int(trainer.global_rank),
            group_world_size=int(trainer.world_size),
            start_step=int(trainer.global_step),
        )
        self.run = run
        for optimizer in trainer.optimizers:
            run.bind_optimizer(optimizer)
        run.on_config_change(self._apply)
        self._apply(run.config, run.config)
        self._boundary(int(trainer.global_step))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.run is not None:
            self.run.close(reason=f"{type(exception).__name__}: {exception}")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # (after every fit, finished or not; on_exception has closed with its reason first)
        if self.run is not None and stage == "fit":
            self.run.close(reason=self.run.stop_reason or "finished")

    # ---- per step (the hot path: microseconds) -----------------------------------------

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.run is not None:
            self.run.mark("data")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.run is not None:
            self.run.mark("compute")

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        run = self.run
        if run is None:
            return
        if "batch_size" not in run.config:  # count this rank's samples for goodput
            run.shared.samples += _batch_len(batch)
        if self._log_metrics:
            metrics = self._step_metrics(trainer)
            if metrics:
                run.log(**metrics)
        step = trainer.global_step
        if step != self._boundary_step:  # an optimizer step completed: the next one's boundary
            self._boundary(step)

    def _boundary(self, step: int) -> None:
        assert self.run is not None
        self._boundary_step = step
        if not self.run.begin_step(step):
            self._trainer.should_stop = True

    def _step_metrics(self, trainer: Any) -> dict[str, Any]:
        """The values ``self.log`` logged on this step (tensors, not synced), by name.

        Read from the trainer's result collection (what ``trainer.callback_metrics`` reads,
        without its conversion of progress-bar values to Python numbers, a device sync).
        """
        results = trainer._results
        out: dict[str, Any] = {}
        if results is None:
            return out
        sent = self._sent
        for metric in results.values():  # what valid_items() yields, without its generator
            value = metric._forward_cache
            if value is None or metric.has_reset:
                continue
            meta = metric.meta
            if meta.on_step and sent.get(meta.name) is not value:  # logged again on this step
                sent[meta.name] = out[meta.name] = value
        return out

    # ---- applying the config to the trainer --------------------------------------------

    def _read_trainer(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The knob values the trainer runs with now."""
        values: dict[str, Any] = {}
        if trainer.optimizers:
            group = trainer.optimizers[0].param_groups[0]
            if isinstance(group.get("lr"), (int, float)):
                values["lr"] = float(group["lr"])
        clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        if clip and (algorithm is None or "norm" in str(algorithm).lower()):
            values["grad_clip"] = float(clip)
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            values["max_steps"] = int(trainer.max_steps)
        holder = self._batch_size_holder(trainer, pl_module)
        if holder is not None:
            values["batch_size"] = int(holder.batch_size)
        for spec in self._options.custom_knobs:
            if hasattr(pl_module, spec.name):
                values[spec.name] = getattr(pl_module, spec.name)
        return values

    @staticmethod
    def _batch_size_holder(trainer: Any, pl_module: Any) -> Any:
        for holder in (getattr(trainer, "datamodule", None), pl_module):
            if isinstance(getattr(holder, "batch_size", None), int):
                return holder
        return None

    def _apply(self, config: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        assert self.run is not None
        apply_failing_open(self.run, log, self._apply_to_trainer, config, changed)

    def _apply_to_trainer(self, config: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        """Put the changed knobs in force on the trainer (the optimizer's are bound apart)."""
        trainer = self._trainer
        if "grad_clip" in changed:
            trainer.gradient_clip_val = config.get("grad_clip")
            if config.get("grad_clip") is not None:
                trainer.gradient_clip_algorithm = "norm"
        if "max_steps" in changed and config.get("max_steps") is not None:
            trainer.fit_loop.epoch_loop.max_steps = int(config["max_steps"])
        if "batch_size" in changed and changed is not config:
            self._set_batch_size(int(config["batch_size"]))
        for spec in self._options.custom_knobs:
            if spec.name in changed:
                setattr(self._module, spec.name, config[spec.name])

    def _set_batch_size(self, value: int) -> None:
        holder = self._batch_size_holder(self._trainer, self._module)
        if holder is None or holder.batch_size == value:
            return
        holder.batch_size = value
        # Lightning rebuilds the train loader at the next epoch start when it has none
        # (what its own BatchSizeFinder does): a loader cannot change mid-epoch.
        self._trainer.fit_loop._combined_loader = None
        assert self.run is not None
        self.run.emit(
            "batch_size_deferred",
            batch_size=value,
            reason="Lightning builds the train DataLoader again at the next epoch start",
        )


def _batch_len(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (a tensor, a sequence or a mapping
    of them), 0 when there is none."""
    while isinstance(batch, (list, tuple, dict)) and batch:
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape else 0
