"""The batch-size finder: the largest per-rank micro-batch that fits, found by trial.

Doubling from ``start`` until a size does not fit, then bisecting between the last size that
fit and the first that did not (the search of Lightning's ``BatchSizeFinder`` in its
``binsearch`` mode). Whether a size fits is a probe:

* on CUDA, :func:`oom_probe` runs a training step and catches ``torch.OutOfMemoryError``
  (then frees the allocator's cache, so the next try starts clean);
* on a CPU, which has no allocator limit to hit, :func:`budget_probe` measures the step's peak
  of live tensor bytes (torch's ``MemTracker``, a dispatch mode that follows every tensor's
  storage: parameters, gradients, optimizer state, activations) against a budget.

The answer becomes the job's ``max_batch_size`` (:func:`set_max_batch_size`): every rank then
splits its share of the batch into micro-batches of at most that size (gradient accumulation,
:meth:`torchloom.threadlet.Run.batch_plan`), from one effective step on — the global batch, and
so the optimisation, unchanged.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import torch

from torchloom.errors import NothingFitsError, TorchloomError

log = logging.getLogger("torchloom.batchsize")

Probe = Callable[[int], bool]
"""``probe(batch_size)``: whether a training step of that many samples fits."""


def find_max_batch_size(fits: Probe, *, start: int = 1, limit: int = 1 << 16) -> int:
    """The largest batch size in ``[start, limit]`` for which ``fits`` holds (``fits`` is
    assumed monotone: what fits, fits with fewer samples too).

    Args:
        fits: the probe.
        start: the first size tried.
        limit: the largest size tried.

    Raises:
        ValueError: ``start`` < 1 or ``limit`` < ``start``.
        NothingFitsError: ``start`` does not fit.
    """
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if not fits(start):
        raise NothingFitsError(f"a batch of {start} does not fit")
    good = start
    bad: int | None = None
    while bad is None and good < limit:  # doubling
        size = min(good * 2, limit)
        if fits(size):
            good = size
        else:
            bad = size
    while bad is not None and bad - good > 1:  # bisecting
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    log.info("batch-size finder: %d fits%s", good, f", {bad} does not" if bad else "")
    return good


def peak_step_bytes(
    step: Callable[[int], Any], batch_size: int, *, track: tuple[Any, ...] = ()
) -> int:
    """Peak bytes of live tensors, summed over devices, while ``step(batch_size)`` runs.

    Args:
        step: one training step (forward, backward, optimizer step) on a batch of that size.
        batch_size: its size.
        track: modules and optimizers whose tensors existed before (parameters, gradients,
            optimizer state), counted from the start.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    if track:
        tracker.track_external(*track)
    with tracker:
        step(batch_size)
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(per_device.get("Total", 0) for per_device in peak.values()))


def budget_probe(
    step: Callable[[int], Any], *, budget_bytes: int, track: tuple[Any, ...] = ()
) -> Probe:
    """A probe for a CPU: a size fits when the step's :func:`peak_step_bytes` ≤ ``budget_bytes``."""

    def fits(batch_size: int) -> bool:
        return peak_step_bytes(step, batch_size, track=track) <= budget_bytes

    return fits


def oom_probe(step: Callable[[int], Any]) -> Probe:
    """A probe for CUDA: a size fits when ``step`` raises no ``torch.OutOfMemoryError``."""

    def fits(batch_size: int) -> bool:
        try:
            step(batch_size)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return fits


def set_max_batch_size(
    job_id: str, size: int, *, reason: str, timeout_s: float = 10.0
) -> int | None:
    """Ask the Weaver to make ``size`` the job's ``max_batch_size`` (one rank does, once).

    Returns:
        The version's effective step, or None when no Weaver answered (the caller goes on with
        its own knob: torchloom fails open).
    """
    from torchloom.client import WeaverClient

    try:
        reply = WeaverClient(timeout_s=timeout_s).control(
            "set", job_id, values={"max_batch_size": size}, reason=reason
        )
    except TorchloomError as exc:
        log.warning("batch-size finder: could not set max_batch_size=%d: %s", size, exc)
        return None
    return reply.effective_step
