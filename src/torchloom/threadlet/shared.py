"""The seam between a rank's two threads: what the training thread and the Threadlet's I/O
thread share, and the rules that keep the training step free of waits.

:class:`~torchloom.threadlet.run.Run` owns one :class:`Shared`; the I/O thread
(:class:`~torchloom.threadlet.agent.Agent`) is given it and touches nothing else. Every
field has **one writer**:

* the training thread writes ``step``, ``steps_run``, ``applied_version``, ``state``,
  ``samples``, ``phase_totals``, ``comm_totals`` and ``quorum`` (plain attribute stores), and appends to
  ``points`` and
  ``events`` (bounded buffers that drop their oldest entry when full, and count it);
* the I/O thread writes ``doc`` and ``config_lag_s`` through :meth:`Shared.offer` (one
  reference assignment each), ``join_version`` once joined, and sets ``wake``; it drains the
  buffers;
* a question for the Weaver (:meth:`Shared.ask`, at start-up, never in the step loop) is
  appended by the asking thread and answered through its future by the I/O thread.

No lock is taken on the training thread: each store is one attribute assignment, atomic
under the GIL, and a reader sees either the old or the new object, never a torn one. The
I/O thread reads ``step`` before ``applied_version`` because the training thread writes them
in the other order (a flush never reports a version ahead of its step).
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Any, NamedTuple

from torchloom.protocol import ControlReply, ControlRequest, DesiredConfig, KnobSpec
from torchloom.protocol.messages import RankState
from torchloom.threadlet.buffer import DropOldestBuffer
from torchloom.threadlet.identity import Identity

EVENTS_KEPT = 4096
"""Lifecycle events waiting for a flush (oldest dropped beyond it)."""


class PendingEvent(NamedTuple):
    """A lifecycle event waiting for the Threadlet's next flush (becomes a RankEvent)."""

    kind: str
    ts: float
    step: int
    version: int
    reason: str = ""
    data: dict[str, Any] = {}  # noqa: RUF012 - never mutated


class Shared:
    """What one rank's training thread and its I/O thread share (see the module docstring).

    Args:
        identity: job, replica group, rank, host, pid and device of this process.
        initial_values: the knob values the process started with (sent with its join).
        custom_knobs: the script's own knobs (registered with its join).
        buffer_points: bound of the logged-metrics buffer.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        initial_values: dict[str, Any],
        custom_knobs: list[KnobSpec],
        buffer_points: int,
    ) -> None:
        self.identity = identity
        self.initial_values = initial_values
        self.custom_knobs = custom_knobs
        # written by the training thread
        self.step = -1
        """The step running now (-1 before the first)."""
        self.steps_run = 0
        """Steps this process ran (the step rate counts these: the step index jumps on a
        resume, a heal or a rollback)."""
        self.applied_version = 0
        """The desired-config version in force (0: the initial knobs)."""
        self.state: RankState = "joining"
        self.samples = 0
        """Samples processed since the start (the ``batch_size`` knob per step, or as logged)."""
        self.phase_totals: dict[str, float] = {}
        """Seconds spent in each marked phase since the start."""
        self.comm_totals: dict[str, float] = {}
        """Bytes handed to gradient collectives since the start: ``sent``, and ``dense`` (what
        float32 without compression would have sent); counted by :mod:`torchloom.comm`."""
        self.quorum: dict[str, Any] | None = None
        """Fault-tolerance facts set by an integration (torchft's quorum), or None."""
        self.points: DropOldestBuffer[tuple[int, float, dict[str, Any]]] = DropOldestBuffer(
            buffer_points
        )
        """``(step, ts, {name: value})`` logged and not yet flushed."""
        self.events: DropOldestBuffer[PendingEvent] = DropOldestBuffer(EVENTS_KEPT)
        # written by the I/O thread
        self.doc: DesiredConfig | None = None
        """The newest desired config heard of (replaced whole, never mutated)."""
        self.config_lag_s = 0.0
        """How long the newest desired config took to arrive after the Weaver issued it, s."""
        self.join_version = 0
        """The newest config version when this process joined: the checkpoint and rollback
        orders of that version and older were for the processes before it (a restarted rank
        must not save or roll back again at an old order's step)."""
        self.wake = threading.Event()
        """Set when a new config arrives (wakes a paused training loop)."""
        self.asks: collections.deque[tuple[ControlRequest, Future[ControlReply]]] = (
            collections.deque()
        )
        """Questions for the Weaver the I/O thread has not sent yet (see :meth:`ask`)."""

    def ask(self, req: ControlRequest) -> Future[ControlReply]:
        """Any thread: have the I/O thread send ``req`` to the Weaver (on the job's join
        subject, the one a job's credentials may ask on: a ``join`` or a ``checkpoints``
        listing); the future gets the reply. Nothing answers while NATS is unreachable: wait
        on the future with a timeout."""
        fut: Future[ControlReply] = Future()
        self.asks.append((req, fut))
        return fut

    def offer(self, doc: DesiredConfig, received_ts: float | None) -> None:
        """I/O thread: keep ``doc`` if it is this job's and newer than the one held.

        Args:
            doc: a desired config as read from the KV bucket or a join reply.
            received_ts: when a pushed version arrived (wall clock, s), for ``config_lag_s``;
                None for one this process read itself (its join, a read after a reconnect):
                how long ago such a version was made says nothing of how fast changes reach
                this rank (a process started after it would report the whole gap, and the
                Weaver would plan its next change that many seconds ahead).
        """
        latest = doc.latest()
        if latest is None or doc.job_id != self.identity.job_id:
            return
        current = self.doc.latest() if self.doc is not None else None
        if current is not None and latest.version <= current.version:
            return
        if received_ts is not None:
            self.config_lag_s = max(0.0, received_ts - latest.issued_ts)
        self.doc = doc  # one reference assignment: atomic for the training thread
        self.wake.set()
