"""torchft integration: report each step's quorum facts and follow torchft's committed step.

Needs the ``torchft`` extra (``torchft-nightly==2026.10.26``, the build tested here).
Usage, with a ``torchft.Manager`` named ``manager``::

    from torchloom.integrations.torchft import attach
    attach(run, manager)
    for step in run.steps(current_step=manager.current_step):
        optimizer.zero_grad()        # torchft's OptimizerWrapper starts the quorum here
        ...
        optimizer.step()             # … and commits (or skips) the step here

At every step boundary (on the training thread, a few attribute reads) the hook
publishes ``run.quorum`` — ``quorum_id``, ``participants`` (replica groups in the
quorum), ``ft_step`` (torchft's committed step), ``healing``, ``commit_failures``,
``heals`` — which rides on the next telemetry flush, and queues history events
when the quorum changes (``quorum_changed``), when this replica group healed from
a peer (``healed``, with the step it jumped from and to and the duration of the
step that healed), and when a step was not committed (``commit_failed``).

The facts are read from the Manager's attributes (``_quorum_id``, ``_healing``,
``_participating_replica_world_size``, ``_commit_failures``, ``_step``) because its
public accessors block on the pending quorum; they are read after the step's
``should_commit``, when the quorum is complete.
"""

from __future__ import annotations

import time
from typing import Any

from torchloom.threadlet import Run


class TorchftReporter:
    """The step hook that turns a ``torchft.Manager``'s state into quorum facts and events."""

    def __init__(self, run: Run, manager: Any) -> None:
        self._run = run
        self._manager = manager
        self._quorum_id = -1
        self._participants = 0
        self._failures = 0
        self._step = int(getattr(manager, "_step", 0))
        self._heals = 0
        self._last_boundary = time.perf_counter()
        self._facts: tuple[Any, ...] = ()

    def __call__(self) -> None:
        m = self._manager
        now = time.perf_counter()
        step_s, self._last_boundary = now - self._last_boundary, now
        quorum_id = int(getattr(m, "_quorum_id", -1))
        participants = int(getattr(m, "_participating_replica_world_size", 0) or 0)
        healing = bool(getattr(m, "_healing", False))
        failures = int(getattr(m, "_commit_failures", 0))
        ft_step = int(getattr(m, "_step", 0))
        run = self._run
        if quorum_id >= 0 and quorum_id != self._quorum_id:
            run.emit(
                "quorum_changed",
                step=ft_step,
                quorum_id=quorum_id,
                participants=participants,
                previous_participants=self._participants,
            )
            self._quorum_id, self._participants = quorum_id, participants
        elif participants != self._participants and participants > 0:
            self._participants = participants
        if healing:
            self._heals += 1
            run.emit(
                "healed",
                step=ft_step,
                from_step=self._step,
                to_step=ft_step,
                heal_s=round(step_s, 4),
            )
        if failures > self._failures:
            run.emit("commit_failed", step=ft_step, commit_failures=failures)
        self._failures = failures
        self._step = ft_step
        facts = (quorum_id, participants, ft_step, healing, failures, self._heals)
        if facts != self._facts:
            self._facts = facts
            run.quorum = {
                "quorum_id": quorum_id,
                "participants": participants,
                "ft_step": ft_step,
                "healing": healing,
                "commit_failures": failures,
                "heals": self._heals,
            }


def attach(run: Run, manager: Any) -> TorchftReporter:
    """Report ``manager``'s quorum facts through ``run`` at every step boundary.

    Args:
        run: this rank's :class:`~torchloom.threadlet.Run`.
        manager: a ``torchft.Manager``.

    Returns:
        The hook (already registered with :meth:`Run.add_step_hook`).
    """
    reporter = TorchftReporter(run, manager)
    run.add_step_hook(reporter)
    return reporter
