"""Gradient compression switched live: one DDP comm hook and one cross-group allreduce that
follow the ``grad_compression`` knob, the same codec on every rank from the same step.

torch's DDP takes one communication hook, registered once, and torchft fixes its choices
when its objects are built; :class:`GradCompression` is registered once and dispatches to
the codec in force at the step (:mod:`torchloom.comm.codecs`; the grammar and the papers in
:mod:`torchloom.protocol.compression`)::

    run = torchloom.init(job_id="mnist", knobs={"grad_compression": "none", ...})
    compression = GradCompression(run, manager=manager)   # manager: torchft's, or None
    compression.register(ddp)                              # within the replica group
    for step in run.steps(current_step=manager.current_step):
        ...; loss.backward()                               # DDP's buckets go through the hook
        compression.allreduce_across([p.grad for p in model.parameters()])  # across groups

The codec changes in :meth:`Run.steps`'s step boundary (a config callback on the training
thread), before the step's backward: every rank of every group takes the new codec at the
effective step the Weaver chose. A switch drops the old codec's state — its error-feedback
residual (at most about one step's gradient mass not yet sent) and PowerSGD's warm-started
``Q`` — and the new codec starts from zero error; switching back later starts afresh too.

Bytes are counted as they are handed to collectives (this rank's payload, not the wire's
framing) and reported per step in telemetry (``Telemetry.comm_bytes``: ``sent``, and
``dense``, what float32 without compression would send), for the network policy.

Hot path: the hook reads one attribute; the switch happens only at a changed config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from torchloom.comm.codecs import Codec, make
from torchloom.protocol.compression import parse_codec
from torchloom.threadlet import Run

__all__ = ["GradCompression"]


def _hook(state: GradCompression, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """The one DDP comm hook: the bucket goes through the codec in force at this step."""
    codec: Codec = state._within
    return codec.within(bucket, state.process_group, state._count)


# DDP checks the hook's annotations as objects (this module's are strings)
_hook.__annotations__ = {
    "state": object,
    "bucket": torch.distributed.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[torch.Tensor],
}

log = logging.getLogger("torchloom.comm")


class GradCompression:
    """The ``grad_compression`` knob's dispatcher for one rank.

    Args:
        run: this rank's :class:`~torchloom.threadlet.Run` (its config holds the knob;
            absent means ``none``).
        manager: the replica group's ``torchft.Manager`` for :meth:`allreduce_across`, or None.
        process_group: the DDP group the hook averages over (None: the default group).
        seed: seeds PowerSGD's initial ``Q`` — the same on every rank, as it must be.

    Raises:
        ValueError: the knob's value in ``run.config`` is not a codec (the Weaver refuses
            such values first).
    """

    def __init__(
        self, run: Run, *, manager: Any = None, process_group: Any = None, seed: int = 0
    ) -> None:
        self.run = run
        self.manager = manager
        self.process_group = process_group
        self.seed = seed
        self.registered = False
        spec = parse_codec(run.config.get("grad_compression") or "none")
        self._within, self._across = make(spec, seed=seed), make(spec, seed=seed)
        self._totals = run.shared.comm_totals
        run.on_config_change(self._follow)

    @property
    def codec(self) -> str:
        """The codec in force (``grad_compression``'s value)."""
        return self._within.spec.text

    def _follow(self, config: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        if "grad_compression" not in changed:
            return
        spec = parse_codec(changed["grad_compression"] or "none")
        if spec == self._within.spec:
            return
        log.info(
            "torchloom: grad_compression %s → %s at step %d",
            self._within.spec.text,
            spec.text,
            self.run.step,
        )
        self._within, self._across = make(spec, seed=self.seed), make(spec, seed=self.seed)

    def _count(self, sent: int, dense: int) -> None:
        totals = self._totals
        totals["sent"] = totals.get("sent", 0.0) + sent
        totals["dense"] = totals.get("dense", 0.0) + dense

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        """Register the one hook on ``ddp`` (DDP allows one, before its first backward).

        Raises:
            RuntimeError: registered already (here or another hook on ``ddp``).
        """
        if self.registered:
            raise RuntimeError("GradCompression is registered on a DDP module already")
        ddp.register_comm_hook(self, _hook)
        self.registered = True

    def allreduce_across(self, grads: list[torch.Tensor]) -> None:
        """Average ``grads`` (float32 tensors, e.g. every parameter's ``.grad``) in place over
        the replica groups with the codec in force, through the torchft Manager; waits.

        A collective that fails is reported to the Manager, which then does not commit the
        step (torchft's contract); nothing is raised.

        Raises:
            RuntimeError: this object was made without a ``manager``.
        """
        if self.manager is None:
            raise RuntimeError("allreduce_across needs the torchft Manager (manager=...)")
        grads = [g for g in grads if g is not None]
        if grads:
            self._across.across(grads, self.manager, self._count)
