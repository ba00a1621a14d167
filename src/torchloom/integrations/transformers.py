"""Hugging Face ``transformers``: a ``TrainerCallback`` lets the Weaver steer a ``Trainer``.

Needs the ``transformers`` extra (``transformers==5.24.0``, ``accelerate==1.15.0``). One line
in the script::

    from torchloom.integrations.transformers import TorchloomCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[TorchloomCallback()])

What it does, on every rank (on the training thread, in the Trainer's callback events):

* **Starts the Threadlet** at ``on_train_begin``: job id from ``job_id=``, else
  ``$TORCHLOOM_JOB``, else the script's name; rank ``args.process_index`` among
  ``args.world_size``; replica group from ``$TORCHLOOM_REPLICA_ID`` / ``$REPLICA_GROUP_ID``.
  Initial knobs from the Trainer: ``lr`` = ``args.learning_rate``, ``grad_clip`` =
  ``args.max_grad_norm`` (when > 0), ``max_steps`` = the steps the Trainer planned;
  ``knobs=`` override them and are put in force at the start.
* **Applies each version at its effective step.** The step boundary is ``on_step_end``
  (the Trainer has counted the step in ``state.global_step``, stepped its scheduler and
  zeroed the gradients), so version *v* with effective step *S* is in force for step *S* on
  every rank. ``lr`` is the schedule's peak (``args.learning_rate``): a change **rescales** the
  scheduler — its ``base_lrs`` and every param group's current ``lr`` are multiplied by
  new/old — so warm-up and decay go on in the same shape, around the new peak; without a
  scheduler with ``base_lrs`` the groups' ``lr`` is set. ``weight_decay``, ``momentum``,
  ``beta2`` go to every param group. ``grad_clip`` sets ``args.max_grad_norm`` (the Trainer
  reads it before each optimizer step; ``None`` turns clipping off). ``max_steps`` can end
  the run earlier than planned; the Trainer's loop length is fixed when it starts, so a
  ``max_steps`` above that plan ends at the plan (a ``max_steps_capped`` event says so).
* **Logs what the Trainer logs** (``on_log``: loss, learning_rate, grad_norm, …, already
  Python numbers there), and reports the phases ``data``, ``compute`` (forward, backward and
  clipping, until ``on_pre_optimizer_step``) and ``other``.
* **Pause, stop, drain** at one step on every rank: a pause blocks in ``on_step_end``
  (outside any collective); a stop, a drain of this replica group or ``max_steps`` set
  ``control.should_training_stop``, so the Trainer leaves its loop before the same step on
  every rank (it still saves and logs as it does at any end).
* **Fails open**: with NATS or the Weaver down training runs on its knobs; an error applying a
  knob is logged and sent as a ``config_not_applied`` event.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

from torchloom.integrations._trainer import RunOptions, apply_failing_open
from torchloom.protocol import KnobSpec
from torchloom.threadlet import Run

log = logging.getLogger("torchloom.integrations.transformers")


class TorchloomCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that puts the Trainer under the Weaver's control.

    Args:
        job_id: the job's id; default ``$TORCHLOOM_JOB``, else the script's name.
        knobs: initial knob values overriding what is read off the Trainer (validated at
            ``on_train_begin``; :class:`~torchloom.errors.InvalidKnobError` there).
        custom_knobs: the script's own knobs (read them with ``callback.run[name]``).
        nats_url: NATS server; default ``$TORCHLOOM_NATS_URL``, then ``torchloom up``'s endpoint.
        interval_ms: telemetry flush and heartbeat period, in milliseconds.
        connect: False runs with no NATS session (a baseline; for tests).

    Attributes:
        run: the :class:`~torchloom.threadlet.Run` once training began, else None.
    """

    def __init__(
        self,
        *,
        job_id: str | None = None,
        knobs: Mapping[str, Any] | None = None,
        custom_knobs: Sequence[KnobSpec] = (),
        nats_url: str | None = None,
        interval_ms: float = 200.0,
        connect: bool = True,
    ) -> None:
        self._options = RunOptions(
            job_id=job_id,
            knobs=dict(knobs or {}),
            custom_knobs=list(custom_knobs),
            nats_url=nats_url,
            interval_ms=interval_ms,
            connect=connect,
        )
        self.run: Run | None = None
        self._args: Any = None
        self._state: Any = None
        self._control: Any = None
        self._optimizer: Any = None
        self._scheduler: Any = None
        self._lr: float | None = None  # the peak lr in force (what a change rescales from)
        self._samples_per_step = 0

    # ---- start and end -----------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._args, self._state, self._control = args, state, control
        self._optimizer = kwargs.get("optimizer")
        self._scheduler = kwargs.get("lr_scheduler")
        initial: dict[str, Any] = {"lr": float(args.learning_rate)}
        if args.max_grad_norm and args.max_grad_norm > 0:
            initial["grad_clip"] = float(args.max_grad_norm)
        if state.max_steps and state.max_steps > 0:
            initial["max_steps"] = int(state.max_steps)
        run = self._options.start(
            initial=initial,
            rank=int(args.process_index),
            group_world_size=int(args.world_size),
            start_step=int(state.global_step),
        )
        self.run = run
        self._lr = float(args.learning_rate)
        self._samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if self._optimizer is not None:
            run.bind_optimizer(self._optimizer, skip=("lr",))
        run.on_config_change(self._apply)
        self._apply(run.config, run.config)
        self._boundary(int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.close(reason=self.run.stop_reason or "finished")

    # ---- per step (the hot path: microseconds) -----------------------------------------

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.mark("data")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.mark("compute")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.shared.samples += self._samples_per_step  # this rank's, for goodput
            self._control = control
            self._boundary(int(state.global_step))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any
    ) -> None:
        if self.run is not None and logs:
            numbers: dict[str, Any] = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            if numbers:
                self.run.log(**numbers)

    def _boundary(self, step: int) -> None:
        assert self.run is not None
        if not self.run.begin_step(step):
            self._control.should_training_stop = True

    # ---- applying the config to the Trainer --------------------------------------------

    def _apply(self, config: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        assert self.run is not None
        apply_failing_open(self.run, log, self._apply_to_trainer, config, changed)

    def _apply_to_trainer(self, config: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        """Put the changed knobs in force on the Trainer (the optimizer's others are bound)."""
        if "lr" in changed and config.get("lr") is not None:
            self._set_lr(float(config["lr"]))
        if "grad_clip" in changed:
            self._args.max_grad_norm = float(config.get("grad_clip") or 0.0)
        planned = int(self._state.max_steps or 0)
        new_max = config.get("max_steps")
        if "max_steps" in changed and new_max is not None and 0 < planned < new_max:
            assert self.run is not None
            self.run.emit(
                "max_steps_capped",
                max_steps=planned,
                reason=f"the Trainer planned {planned} steps when it started: "
                f"max_steps={new_max} ends there",
            )

    def _set_lr(self, lr: float) -> None:
        """Make ``lr`` the schedule's peak: rescale the scheduler around it (see the module)."""
        old, self._lr = self._lr, lr
        self._args.learning_rate = lr
        groups = self._optimizer.param_groups if self._optimizer is not None else []
        base = getattr(self._scheduler, "base_lrs", None)
        if base is not None and old:
            ratio = lr / old
            self._scheduler.base_lrs = [b * ratio for b in base]
            for group in groups:
                group["lr"] *= ratio
            if hasattr(self._scheduler, "_last_lr"):
                self._scheduler._last_lr = [g["lr"] for g in groups]
        else:
            for group in groups:
                group["lr"] = lr
