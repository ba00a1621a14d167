"""Hugging Face ``accelerate``: a :class:`~torchloom.threadlet.Run` for a loop around an
``Accelerator``, in two lines.

An ``accelerate`` script keeps its own loop, so it uses :meth:`Run.steps` like any loop; this
helper only fills in what the ``Accelerator`` knows (rank, world size, device) and binds the
prepared optimizer::

    from torchloom.integrations.accelerate import init_run
    run = init_run(accelerator, optimizer, knobs={"lr": 3e-4, "grad_clip": 1.0}, max_steps=1000)
    for step in run.steps():
        with accelerator.accumulate(model):
            loss = model(**next(batches)).loss
            accelerator.backward(loss)
            if run["grad_clip"] is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), run["grad_clip"])
            optimizer.step(); optimizer.zero_grad()
        run.log(loss=loss.detach())

It imports nothing from ``accelerate`` (it reads the ``Accelerator``'s attributes), so it
costs nothing to import; the ``transformers`` extra installs ``accelerate``.
"""

from __future__ import annotations

from typing import Any

from torchloom.threadlet import Run, init


def init_run(accelerator: Any, optimizer: Any = None, **options: Any) -> Run:
    """Start the Threadlet for this process of an ``accelerate`` launch and return its Run.

    Args:
        accelerator: the script's ``accelerate.Accelerator``: its ``process_index`` is the
            rank, ``num_processes`` the replica group's world size (the device id is
            read as for any rank: the GPU's NVML UUID, else ``cpu:<host>``).
        optimizer: the (prepared) optimizer whose ``lr``, ``weight_decay``, ``momentum``,
            ``beta2`` follow the knobs (:meth:`Run.bind_optimizer`); None binds nothing.
        **options: the keyword options of :func:`torchloom.init` (``job_id`` — default
            ``$TORCHLOOM_JOB``, else the script's name —, ``knobs``, ``max_steps``, …);
            ``rank`` and ``group_world_size`` default to the Accelerator's.

    Raises:
        InvalidKnobError: an initial knob value breaks its rules (from :func:`torchloom.init`).
    """
    options.setdefault("rank", int(accelerator.process_index))
    options.setdefault("group_world_size", int(accelerator.num_processes))
    run = init(**options)
    if optimizer is not None:
        run.bind_optimizer(optimizer)
    return run
