"""Memory-aware batching on a rank: micro-batches kept within ``max_memory_gb``, and a step that
runs out of memory retried with smaller ones instead of ending the process.

The job's batch is fixed by its knobs (``batch_size`` or ``global_batch_size``); how a rank
splits its share into gradient-accumulation micro-batches is not part of the optimisation
(:meth:`torchloom.threadlet.Run.batch_plan`). So when memory runs short, the micro-batches
shrink and their number grows — the step's samples, loss and update stay what they were:

* :class:`MemoryGuard` splits the plan's micro-batches further when this rank had to shrink,
  and runs a step through :meth:`MemoryGuard.run_step`: an out-of-memory error (CUDA's
  ``torch.OutOfMemoryError``; on a CPU, :class:`~torchloom.errors.MemoryBudgetError` from the
  budget check) drops the step's partial gradients, halves this rank's largest micro-batch and
  runs the step again (``oom_retried`` event). It logs ``mem_peak_gb`` and ``micro_batch``
  every step (host-side counters only: no I/O, no device sync on the training thread), which the Weaver's ``memory`` policy reads to make the smaller micro-batch
  job-wide (``max_batch_size``), so every rank splits alike from one effective step on.
* The budget: on CUDA, ``max_memory_gb`` caps the caching allocator
  (``torch.cuda.set_per_process_memory_fraction``), which then raises a real out-of-memory
  error at the budget, and the peak is the allocator's (``max_memory_allocated``). A CPU has no
  allocator limit; there the peak of a micro-batch of ``b`` samples is measured once per size
  (``peak_bytes(b)``, e.g. :func:`torchloom.batchsize.peak_step_bytes` on a copy of the model:
  live tensor bytes — parameters, gradients, optimizer state, activations) and a micro-batch
  whose peak is above the budget is refused before it runs, as the allocator would.

Under DDP a retried step is safe when the error comes before the step's last backward (whose
buckets start the allreduce); the CPU check always does. Under FSDP every micro-batch is a
collective (all-gather, reduce-scatter), so a rank must not split differently from the others:
pass ``retry=False`` there and let the ``memory`` policy shrink ``max_batch_size`` job-wide.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from torchloom.errors import MemoryBudgetError

if TYPE_CHECKING:
    from torchloom.threadlet.run import Run

log = logging.getLogger("torchloom.memory")

T = TypeVar("T")

GB = 1e9
"""``max_memory_gb`` is in gigabytes of 10⁹ bytes."""


def split(sizes: Sequence[int], cap: int | None) -> list[int]:
    """``sizes`` with each micro-batch larger than ``cap`` cut into pieces of at most ``cap``
    (as even as possible; the total is unchanged). Pure."""
    if cap is None:
        return list(sizes)
    out: list[int] = []
    for m in sizes:
        n = -(-m // cap)
        out += [m // n + (1 if i < m % n else 0) for i in range(n)]
    return out


class MemoryGuard:
    """One rank's micro-batches kept within the job's ``max_memory_gb`` knob.

    Args:
        run: the rank's Run (the knob, the events and the logged values go through it).
        device: the device the step runs on.
        peak_bytes: on a CPU, ``peak_bytes(b)``: the peak bytes of a step on a micro-batch of
            ``b`` samples (measured once per size and kept); None: no budget check on a CPU
            (and no peak logged there).
        retry: retry a step that ran out of memory with smaller micro-batches (False under
            FSDP, see the module's text).
        max_retries: retries of one step before the error is raised.
    """

    def __init__(
        self,
        run: Run,
        *,
        device: torch.device,
        peak_bytes: Callable[[int], int] | None = None,
        retry: bool = True,
        max_retries: int = 8,
    ) -> None:
        self.run = run
        self.device = device
        self._measure = peak_bytes
        self._peaks: dict[int, int] = {}
        self.retry = retry
        self.max_retries = max_retries
        self.cap: int | None = None
        """This rank's own micro-batch cap after an out-of-memory error (None: the plan's)."""
        self._cap_version = -1
        self._budget: float | None = None
        self.retries = 0
        """Out-of-memory retries so far."""

    def budget_bytes(self) -> int | None:
        """The budget in force (bytes), or None; on CUDA, the allocator is capped to it."""
        gb = self.run.config.get("max_memory_gb")
        if gb != self._budget:
            self._budget = gb
            if self.device.type == "cuda":
                total = torch.cuda.get_device_properties(self.device).total_memory
                fraction = 1.0 if gb is None else min(1.0, gb * GB / total)
                torch.cuda.set_per_process_memory_fraction(fraction, self.device)
                # the cap applies to new allocations only: blocks the caching allocator holds
                # already would go on serving a step over the budget (seen on an H200: a 24 GB
                # step ran on under a 17 GB cap). Released once, when the budget changes.
                torch.cuda.empty_cache()
        return None if gb is None else int(gb * GB)

    def micro_batches(self, planned: Sequence[int]) -> list[int]:
        """The plan's micro-batches (``BatchPlan.micro_batches``) split by this rank's cap. A new
        config version (a smaller ``max_batch_size`` from the ``memory`` policy, a new budget)
        drops the cap: the plan speaks for the job again."""
        version = self.run.applied_version
        if version != self._cap_version:
            self._cap_version = version
            if self.cap is not None and max(planned, default=0) <= self.cap:
                self.cap = None
        return split(planned, self.cap)

    def peak_of(self, size: int) -> int | None:
        """The measured peak bytes of a micro-batch of ``size`` on a CPU (None on CUDA, or
        without ``peak_bytes``)."""
        if self.device.type == "cuda" or self._measure is None:
            return None
        if size not in self._peaks:
            self._peaks[size] = self._measure(size)
        return self._peaks[size]

    def check(self, size: int) -> None:
        """Before a micro-batch of ``size`` runs: on a CPU with a budget, raise
        :class:`~torchloom.errors.MemoryBudgetError` when its peak is above the budget."""
        budget = self.budget_bytes()
        if budget is None:
            return
        peak = self.peak_of(size)
        if peak is not None and peak > budget:
            raise MemoryBudgetError(
                f"a micro-batch of {size} needs {peak / GB:.3f} GB, over max_memory_gb="
                f"{budget / GB:g}"
            )

    def run_step(
        self,
        planned: Sequence[int],
        step: Callable[[list[int]], T],
        *,
        reset: Callable[[], None],
    ) -> T:
        """Run ``step(sizes)`` (it runs the micro-batches of ``sizes``, calling :meth:`check`
        before each), retrying on out-of-memory with this rank's largest micro-batch halved.

        Args:
            planned: the plan's micro-batches.
            step: the step; returns what :meth:`run_step` returns.
            reset: drops what a failed try left (``optimizer.zero_grad(set_to_none=True)``).

        Raises:
            torch.OutOfMemoryError, MemoryBudgetError: with ``retry=False``, after
                ``max_retries`` retries, or when a micro-batch of one sample does not fit.
        """
        sizes = self.micro_batches(planned)
        tries = 0
        while True:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                out = step(sizes)
            except (torch.OutOfMemoryError, MemoryBudgetError) as exc:
                largest = max(sizes)
                if not self.retry or tries >= self.max_retries or largest <= 1:
                    raise
                tries += 1
                self.retries += 1
                reset()
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.cap = largest // 2
                sizes = split(planned, self.cap)
                why = str(exc).splitlines()[0][:200]
                log.warning("torchloom: out of memory (%s): step retried in micro-batches of "
                            "at most %d", why, self.cap)  # fmt: skip
                self.run.emit("oom_retried", micro_batch=self.cap, reason=why)
                continue
            self._log(sizes)
            return out

    def _log(self, sizes: list[int]) -> None:
        """``micro_batch``, ``micro_cap`` and the step's peak (``mem_peak_gb``: CUDA's allocator
        — host-side counters, no device sync —, or on a CPU with a budget the measured peak of
        the largest micro-batch; a CPU without one logs none: the Threadlet's host sampling
        reports the process's memory off this thread)."""
        largest = max(sizes, default=0)
        if self.device.type == "cuda":
            peak: int | None = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self.peak_of(largest) if self._budget is not None else None
        values: dict[str, Any] = {"micro_batch": largest, "micro_cap": self.cap or 0}
        if peak:
            values["mem_peak_gb"] = peak / GB
        self.run.log(**values)
