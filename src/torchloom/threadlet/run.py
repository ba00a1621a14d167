"""The training-side API: a :class:`Run` follows the job's desired config at step boundaries.

Typical use (see :mod:`torchloom.examples.mnist.train`)::

    run = torchloom.init(knobs={"lr": 0.05, "batch_size": 64}, max_steps=2000)
    run.bind_optimizer(optimizer)
    for step in run.steps():
        ...
        run.log(loss=loss)

Hot-path contract: :meth:`Run.steps` (per iteration) and :meth:`Run.log` do no
I/O, take no lock, and force no device sync; they read a few attributes that
the Threadlet's I/O thread (:mod:`~torchloom.threadlet.agent`) replaces
atomically, and append to bounded buffers that drop their oldest entry when full.
``bench/threadlet_overhead.py`` measures the cost.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torchloom.protocol import (
    BUILTIN_KNOBS,
    DesiredConfig,
    KnobSpec,
    coerce_all,
    resolve_values,
    select_snapshot,
)
from torchloom.protocol.batching import BatchPlan, plan_step
from torchloom.protocol.compression import OPTIMIZER_KNOBS
from torchloom.protocol.knobs import check_spec
from torchloom.protocol.messages import CheckpointOrder, RankState, RollbackOrder
from torchloom.threadlet.agent import Agent
from torchloom.threadlet.identity import Identity, default_job_id, resolve_identity
from torchloom.threadlet.shared import PendingEvent, Shared

log = logging.getLogger("torchloom.threadlet")

ConfigCallback = Callable[[Mapping[str, Any], Mapping[str, Any]], None]
CheckpointHandler = Callable[[CheckpointOrder, int], None]
"""``handler(order, step)``: save checkpoint ``order.id`` as the state before ``step``."""
RollbackHandler = Callable[[RollbackOrder], int]
"""``handler(order)``: load checkpoint ``order.id`` in place; return the step to go on at."""
"""``callback(config, changed)``: the full config now in force, and the knobs that changed."""

_NEVER = 1 << 62


class Run:
    """One rank's handle on its job. Create it with :func:`torchloom.init`.

    Attributes:
        identity: job, replica group, rank, host, pid and device of this process.
        config: the knob values in force now (a new dict object at every change;
            read it at will, do not mutate it).
        shared: what this training thread shares with the Threadlet's I/O thread
            (:class:`~torchloom.threadlet.shared.Shared`; its ``step``, ``applied_version``,
            ``state`` and ``quorum`` are also this object's).
    """

    def __init__(
        self,
        *,
        identity: Identity,
        initial: dict[str, Any],
        custom_knobs: list[KnobSpec],
        nats_url: str | None,
        state_dir: Path | None,
        interval_ms: float,
        buffer_points: int,
        start_step: int,
        connect: bool,
    ) -> None:
        self.identity = identity
        self.shared = Shared(
            identity, initial_values=initial, custom_knobs=custom_knobs, buffer_points=buffer_points
        )
        self.config: dict[str, Any] = dict(initial)
        self.start_step = start_step
        self.stop_reason: str | None = None
        self._phase_t = 0.0  # perf_counter of the last mark or step boundary
        self._grad_norm: Any = None
        self._step_hooks: list[Callable[[], None]] = []
        self._callbacks: list[ConfigCallback] = []
        self._checkpoint_handler: CheckpointHandler | None = None
        self._rollback_handler: RollbackHandler | None = None
        self._jump_to: int | None = None
        self._doc_used: DesiredConfig | None = None
        self._next_check = 0  # the next step at which a known snapshot takes effect
        self._closed = False
        self.agent = Agent(
            self.shared, nats_url=nats_url, state_dir=state_dir, interval_s=interval_ms / 1000.0
        )
        if connect:
            self.agent.start()
            atexit.register(self.close, reason="exited without finishing steps()")

    # ---- what the training thread shares with the I/O thread ----------------------

    @property
    def step(self) -> int:
        """The step running now (-1 before the first)."""
        return self.shared.step

    @property
    def applied_version(self) -> int:
        """The desired-config version in force (0: the initial knobs)."""
        return self.shared.applied_version

    @property
    def state(self) -> RankState:
        """``joining``, ``training``, ``paused`` or ``exited``."""
        return self.shared.state

    @property
    def quorum(self) -> dict[str, Any] | None:
        """Fault-tolerance facts an integration reports (torchft's quorum), or None."""
        return self.shared.quorum

    @quorum.setter
    def quorum(self, value: dict[str, Any] | None) -> None:
        self.shared.quorum = value

    @property
    def phase_totals(self) -> dict[str, float]:
        """Seconds spent in each marked phase since the start."""
        return self.shared.phase_totals

    # ---- hot path ------------------------------------------------------------------

    def steps(self, *, current_step: Callable[[], int] | None = None) -> Iterator[int]:
        """Yield step indices until ``max_steps``, a stop, or a drain.

        Before yielding step ``s`` it runs the step hooks (:meth:`add_step_hook`),
        applies the config version in force at ``s`` and, while the job is paused
        at ``s``, blocks (on this thread, outside any collective) until it is resumed.

        Args:
            current_step: where the step index comes from, e.g. torchft's
                ``manager.current_step`` (it stays put when a step is not committed
                and jumps when a replica group heals, so every group applies a
                config at the same committed step). Default: ``start_step``, +1 per step.
        """
        step = self.start_step if current_step is None else current_step()
        try:
            while self.begin_step(step):
                yield self.shared.step
                step = self.shared.step + 1 if current_step is None else current_step()
        finally:
            self.close(reason=self.stop_reason or "left the step loop early")

    def begin_step(self, step: int) -> bool:
        """The step boundary before ``step``, for a loop that torchloom does not drive.

        :meth:`steps` calls it before every step; a framework integration
        (:mod:`torchloom.integrations.lightning`, :mod:`~torchloom.integrations.transformers`)
        calls it from its trainer's hook that runs between two optimizer steps. It runs the
        step hooks, applies the config version in force at ``step``, blocks while the job is
        paused there (on this thread, outside any collective), and tells whether ``step`` may
        run. After a rollback the step goes on from the checkpoint's: read it from :attr:`step`.

        Args:
            step: the index of the step about to run (the trainer's global step).

        Returns:
            False when the loop must end before ``step``: the job was stopped, this replica
            group drained, or ``max_steps`` reached (:attr:`stop_reason` says which).
        """
        shared = self.shared
        if shared.state == "joining":
            shared.state = "training"
        for hook in self._step_hooks:
            hook()
        if shared.doc is not self._doc_used or step >= self._next_check:
            self._boundary(step)
        if self._jump_to is not None:  # rolled back: the step counter goes back too
            step, self._jump_to = self._jump_to, None
            shared.step = step
            self._boundary(step)
        if self.stop_reason is not None:
            return False
        if step >= self.config.get("max_steps", _NEVER):
            self.stop_reason = "finished"
            return False
        shared.step = step
        shared.steps_run += 1
        shared.samples += self.config.get("batch_size", 0) or 0
        if shared.phase_totals:  # the loop marks its phases: the rest is "other"
            self.mark("other")
        else:
            self._phase_t = time.perf_counter()
        return True

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` on the training thread at every step boundary (keep it to microseconds)."""
        self._step_hooks.append(hook)

    def mark(self, phase: str) -> None:
        """Attribute the wall time since the previous mark (or the step's start) to ``phase``.

        Call it after each part of the step — ``data`` (waiting for the batch),
        ``compute`` (forward and backward), ``comm`` (gradient allreduce, the commit)
        — and the Threadlet reports the mean seconds per step of each phase
        (``Telemetry.phases_s``; time between the last mark and the next step is
        ``other``). The straggler policy compares ranks on ``data + compute``: the time
        a rank is busy on its own, not waiting for its peers. Host wall time (about
        0.2 µs, no device sync): on a GPU, mark after an op that waits for the device
        anyway (the allreduce's wait, ``.item()``), or the device time lands in a later phase.
        """
        t = time.perf_counter()
        totals = self.shared.phase_totals
        totals[phase] = totals.get(phase, 0.0) + (t - self._phase_t)
        self._phase_t = t

    def emit(self, kind: str, *, step: int | None = None, **data: Any) -> None:
        """Queue a lifecycle event for the Weaver's history (no I/O here; sent by the Threadlet)."""
        reason = str(data.pop("reason", ""))
        shared = self.shared
        shared.events.append(
            PendingEvent(
                kind,
                time.time(),
                shared.step if step is None else step,
                shared.applied_version,
                reason,
                data,
            )
        )

    def _boundary(self, step: int) -> None:
        shared = self.shared
        while True:
            doc = shared.doc
            self._doc_used = doc
            snap = select_snapshot(doc.snapshots, step) if doc is not None else None
            if snap is not None and snap.version > shared.applied_version:
                mine = snap.version > shared.join_version  # not an order for an earlier process
                if snap.checkpoint is not None and mine:
                    # the state before this step, under the config before this version (a
                    # version that switches the optimizer saves the state it switches from)
                    self._order_checkpoint(snap.checkpoint, snap.effective_step, step)
                self._apply(snap.version, resolve_values(snap, self.identity.replica_id), step)
                if snap.rollback is not None and mine:
                    self._order_rollback(snap.rollback, snap.effective_step, step)
                    if self._jump_to is not None:
                        return  # steps() goes on from the checkpoint's step
            later = (
                [s.effective_step for s in doc.snapshots if s.effective_step > step] if doc else []
            )
            self._next_check = min(later, default=_NEVER)
            run_state = snap.run_state if snap is not None else "running"
            if snap is not None and self.identity.replica_id in snap.drained:
                self.stop_reason = "drained"
                return
            if run_state == "stopped":
                self.stop_reason = "stopped"
                return
            if run_state != "paused":
                if shared.state == "paused":
                    log.info("torchloom: resumed at step %d", step)
                shared.state = "training"
                return
            if shared.state != "paused":
                log.info("torchloom: paused at step %d", step)
                shared.step = step
                shared.state = "paused"
            shared.wake.wait(0.5)
            shared.wake.clear()

    def _apply(self, version: int, values: dict[str, Any], step: int) -> None:
        new = {**self.config, **values}
        changed = {k: v for k, v in new.items() if self.config.get(k, _MISSING) != v}
        self.config = new
        self.shared.applied_version = version
        self.shared.events.append(PendingEvent("config_applied", time.time(), step, version))
        if changed:
            for cb in self._callbacks:
                cb(new, changed)
            log.info(
                "torchloom: v%d applied at step %d: %s",
                version,
                step,
                ", ".join(f"{k}={v}" for k, v in changed.items()),
            )

    def on_checkpoint(self, handler: CheckpointHandler) -> None:
        """Have ``handler(order, step)`` save a checkpoint the Weaver ordered (the
        :class:`~torchloom.checkpoint.Checkpointer` registers itself). It runs on the training
        thread at the step boundary, before step ``step``; it reports ``checkpoint_saved`` or
        ``checkpoint_failed`` itself (:meth:`emit`)."""
        self._checkpoint_handler = handler

    def on_rollback(self, handler: RollbackHandler) -> None:
        """Have ``handler(order)`` load the checkpoint a rollback names (the
        :class:`~torchloom.checkpoint.Checkpointer` registers itself); :meth:`steps` then
        goes on from the step it returns."""
        self._rollback_handler = handler

    @staticmethod
    def _cannot_act(handler: object, effective_step: int, step: int) -> str:
        """Why this rank cannot carry out a checkpoint or rollback order now ("": it can)."""
        if step != effective_step:  # heard late: this rank's state is not that step's
            return f"the order reached this rank at step {step}, after step {effective_step}"
        return "no Checkpointer in this process" if handler is None else ""

    def _order_rollback(self, order: RollbackOrder, effective_step: int, step: int) -> None:
        why = self._cannot_act(self._rollback_handler, effective_step, step)
        if not why and self._rollback_handler is not None:
            try:
                self._jump_to = self._rollback_handler(order)
            except Exception as exc:  # the training goes on where it is; said in the history
                why = f"{type(exc).__name__}: {exc}"
        if why:
            log.error("torchloom: rollback to %s not done: %s", order.id, why)
            self.emit("rollback_failed", step=step, id=order.id, reason=why)

    def _order_checkpoint(self, order: CheckpointOrder, effective_step: int, step: int) -> None:
        if order.writers and self.identity.replica_id not in order.writers:
            return  # another replica group writes it
        why = self._cannot_act(self._checkpoint_handler, effective_step, step)
        if why or self._checkpoint_handler is None:
            self.emit("checkpoint_failed", step=step, id=order.id, reason=why)
        else:
            self._checkpoint_handler(order, step)

    def log(self, *, samples: int | None = None, **metrics: Any) -> None:
        """Record numbers for this step (loss, accuracy, …): floats, ints or 0-d tensors.

        Tensors are kept detached and turned into floats on the Threadlet's
        thread, so this never forces a device sync. ``samples`` overrides the
        sample count of this step (default: the ``batch_size`` knob).
        """
        shared = self.shared
        if samples is not None:
            shared.samples += samples - (self.config.get("batch_size", 0) or 0)
        if self._grad_norm is not None:
            metrics.setdefault("grad_norm", self._grad_norm)
            self._grad_norm = None
        for name, value in metrics.items():
            detach = getattr(value, "detach", None)
            if detach is not None:
                metrics[name] = detach()
        shared.points.append((shared.step, time.time(), metrics))

    # ---- helpers bound to the config -----------------------------------------------

    def on_config_change(self, callback: ConfigCallback) -> None:
        """Call ``callback(config, changed)`` on the training thread at every applied change."""
        self._callbacks.append(callback)

    def bind_optimizer(self, optimizer: Any, *, skip: tuple[str, ...] = ()) -> None:
        """Make the optimizer's ``lr`` (and ``weight_decay``, ``momentum``/``betas[0]``,
        ``beta2``/``betas[1]`` when those knobs are set) follow the config, now and at every
        applied change.

        A :class:`~torchloom.optim.SwitchableOptimizer` (also inside torchft's
        ``OptimizerWrapper``) follows the ``optimizer`` knob too: it is rebuilt as the new
        kind at the effective step, its state mapped, then given the knobs' values.

        Args:
            optimizer: a torch optimizer (anything with ``param_groups``).
            skip: knobs this binding leaves alone (an integration whose learning-rate
                scheduler owns ``lr`` passes ``("lr",)`` and rescales the schedule itself).
        """
        target = getattr(optimizer, "optim", optimizer)  # torchft's OptimizerWrapper
        switch = getattr(target, "switch", None)

        def _set(config: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
            if skip:
                changed = {k: v for k, v in changed.items() if k not in skip}
            if switch is not None:
                if changed.get("optimizer") is not None:
                    switch(changed["optimizer"])
                    # a rebuilt optimizer takes every knob
                    changed = {k: v for k, v in config.items() if k not in skip}
                target.set_hyper(**{k: config.get(k) for k in OPTIMIZER_KNOBS if k in changed})
                return
            for group in optimizer.param_groups:
                if "lr" in changed and config.get("lr") is not None:
                    group["lr"] = config["lr"]
                if (
                    "weight_decay" in changed
                    and "weight_decay" in group
                    and config.get("weight_decay") is not None
                ):
                    group["weight_decay"] = config["weight_decay"]
                betas = tuple(group["betas"]) if "betas" in group else None
                if "momentum" in changed and config.get("momentum") is not None:
                    if "momentum" in group:
                        group["momentum"] = config["momentum"]
                    elif betas is not None:
                        betas = (config["momentum"], *betas[1:])
                if "beta2" in changed and config.get("beta2") is not None and betas is not None:
                    betas = (betas[0], config["beta2"], *betas[2:])
                if betas is not None:
                    group["betas"] = betas

        _set(self.config, self.config)
        self._callbacks.append(_set)

    def clip_grad_norm_(self, parameters: Any) -> Any:
        """``torch.nn.utils.clip_grad_norm_`` with the ``grad_clip`` knob; no-op when it is off.

        Returns:
            The total gradient norm (a 0-d tensor, not synced), or None when clipping is off.
        """
        max_norm = self.config.get("grad_clip")
        if max_norm is None:
            return None
        import torch

        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def guard_gradients(self, parameters: Any) -> Any:
        """Clip by the ``grad_clip`` knob and, with ``skip_nonfinite`` on, zero the step's
        gradients when their total norm is NaN or Inf — on the device, without a host sync.

        The zeroed step changes no weight through the gradient (an optimizer with momentum
        still moves by its momentum buffer, and Adam-like ones by their moments), so one
        bad batch does not poison the weights; the norm goes out as ``grad_norm`` with the
        step's next :meth:`log` (None in telemetry when it was not finite) for the divergence guard.

        Args:
            parameters: the model's parameters (an iterable of tensors with ``.grad``).

        Returns:
            The total gradient norm before clipping: a 0-d float tensor, not synced.
        """
        import torch

        params = [p for p in parameters if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        max_norm = self.config.get("grad_clip")
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        if self.config.get("skip_nonfinite"):
            keep = torch.isfinite(norm)  # a 0-d bool on the device: no sync
            zero = norm.new_zeros(())
            for g in grads:
                torch.where(keep, g, zero, out=g)  # one kernel per gradient
        self._grad_norm = norm  # rides on the step's next log() point
        return norm

    def batch_plan(
        self,
        *,
        participants: int = 1,
        replica_rank: int = 0,
        group_world_size: int = 1,
        group_rank: int = 0,
        participant_ids: tuple[str, ...] | None = None,
    ) -> BatchPlan:
        """This rank's share of the step, from the config in force and the step's quorum.

        With ``global_batch_size`` set, the share of ``global_batch_size`` among
        ``participants`` replica groups and the ``group_world_size`` ranks of each;
        otherwise ``batch_size``. Either way split into micro-batches of at most
        ``max_batch_size`` (gradient accumulation). Pure
        (:func:`~torchloom.protocol.batching.plan_step`): every rank of a quorum gets
        shares that add up to the global batch, at consecutive offsets.

        Args:
            participants: replica groups committing this step (torchft: ``manager.num_participants()``).
            replica_rank: this group's rank among them (``manager.participating_rank()``).
            group_world_size: ranks in this replica group (torchrun's ``WORLD_SIZE``).
            group_rank: this rank within its group (torchrun's ``RANK``).
            participant_ids: the participants' replica ids in quorum order, for uneven
                shares by ``batch_weights`` (torchft: ``participant_ids(manager, job_id=…)``).
        """
        return plan_step(
            self.config,
            participants=participants,
            replica_rank=replica_rank,
            group_world_size=group_world_size,
            group_rank=group_rank,
            participant_ids=participant_ids,
        )

    def config_at(self, step: int) -> Mapping[str, Any]:
        """The knob values that the newest desired config known here puts in force at ``step``.

        A forecast for a step not yet run (a data loader preparing batches ahead,
        :mod:`torchloom.data`): a version issued later may still change it. For a
        step already reached it is :attr:`config`. Pure read; no I/O.
        """
        doc = self.shared.doc
        snap = select_snapshot(doc.snapshots, step) if doc is not None else None
        if snap is None or snap.version <= self.shared.applied_version:
            return self.config
        return {**self.config, **resolve_values(snap, self.identity.replica_id)}

    def __getitem__(self, knob: str) -> Any:
        return self.config[knob]

    # ---- end -----------------------------------------------------------------------

    def close(self, *, reason: str = "closed", timeout_s: float = 2.0) -> None:
        """Tell the Weaver this rank exits (with ``reason``) and stop the Threadlet thread.

        Idempotent; called by :meth:`steps` when it ends and at interpreter exit.
        """
        if self._closed:
            return
        self._closed = True
        shared = self.shared
        shared.state = "exited"
        shared.events.append(
            PendingEvent("exited", time.time(), max(shared.step, 0), shared.applied_version, reason)
        )
        self.agent.stop(timeout_s=timeout_s)


_MISSING = object()


def init(
    *,
    job_id: str | None = None,
    knobs: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    custom_knobs: list[KnobSpec] | None = None,
    replica_id: str | None = None,
    rank: int | None = None,
    group_world_size: int | None = None,
    device: str | None = None,
    nats_url: str | None = None,
    state_dir: str | Path | None = None,
    interval_ms: float = 200.0,
    buffer_points: int = 10_000,
    start_step: int = 0,
    connect: bool = True,
) -> Run:
    """Start the Threadlet of this training process and return its :class:`Run`.

    Args:
        job_id: the job this process belongs to (``[A-Za-z0-9_-]``, ≤ 64 chars); default
            ``$TORCHLOOM_JOB``, else the script's file name without its suffix
            (:func:`~torchloom.threadlet.identity.default_job_id`).
        knobs: initial values of knobs (built-in or from ``custom_knobs``), validated now.
        max_steps: the ``max_steps`` knob: :meth:`Run.steps` ends there.
        custom_knobs: the script's own knobs with types and bounds.
        replica_id: this process's replica group; default ``$TORCHLOOM_REPLICA_ID``, else
            ``$REPLICA_GROUP_ID`` (torchft), else ``"0"``.
        rank: rank within the replica group; default ``$RANK`` (torchrun), else 0.
        group_world_size: ranks in the replica group; default ``$WORLD_SIZE``, else 1.
        device: device id; default the NVML UUID of this rank's GPU, else ``cpu:<host>``.
        nats_url: NATS server; default ``$TORCHLOOM_NATS_URL``, then ``torchloom up``'s endpoint.
        state_dir: where ``torchloom up`` wrote its endpoint (default ``$TORCHLOOM_STATE_DIR``).
        interval_ms: telemetry flush and heartbeat period, in milliseconds.
        buffer_points: bound of the logged-metrics buffer (oldest dropped first, counted).
        start_step: the first step index (e.g. after loading a checkpoint).
        connect: False runs with no NATS session at all (a plain loop; for tests and baselines).

    Raises:
        InvalidKnobError: an initial value or a custom knob breaks its rules.
        InvalidRequestError: ``job_id`` or ``replica_id`` is not a valid id.

    Training never waits for NATS or the Weaver: with neither reachable it runs
    on its initial knobs, and the Threadlet keeps trying in the background.
    """
    from torchloom.protocol.names import check_id

    if job_id is None:
        job_id = default_job_id()
    check_id("job id", job_id)
    registry = dict(BUILTIN_KNOBS)
    for spec in custom_knobs or []:
        registry[spec.name] = check_spec(spec)
    raw = dict(knobs or {})
    if max_steps is not None:
        raw["max_steps"] = max_steps
    initial = coerce_all(registry, raw)
    identity = resolve_identity(
        job_id=job_id,
        replica_id=replica_id,
        rank=rank,
        group_world_size=group_world_size,
        device=device,
    )
    check_id("replica id", identity.replica_id)
    return Run(
        identity=identity,
        initial=initial,
        custom_knobs=list(custom_knobs or []),
        nats_url=nats_url,
        state_dir=Path(state_dir) if state_dir else None,
        interval_ms=interval_ms,
        buffer_points=buffer_points,
        start_step=start_step,
        connect=connect,
    )
