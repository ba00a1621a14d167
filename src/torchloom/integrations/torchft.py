"""torchft integration: report each step's quorum facts, follow torchft's committed step,
and make LocalSGD / DiLoCo follow the ``sync_every`` knob.

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
a peer (``healed``, with the source replica group, the step it jumped from and
to, and the duration of the step that healed), and when a step was not committed (``commit_failed``).

The facts are read from the Manager's attributes (``_quorum_id``, ``_healing``,
``_participating_replica_world_size``, ``_commit_failures``, ``_step``) because its
public accessors block on the pending quorum; they are read after the step's
``should_commit``, when the quorum is complete.

LocalSGD and DiLoCo (torchft.local_sgd; DiLoCo: Douillard et al. 2023,
arXiv:2311.08105; Streaming DiLoCo: arXiv:2501.18512) count *outer* steps in
``manager.current_step()``: one per synchronisation. Iterate ``run.steps()``
once per outer step and run ``run["sync_every"]`` inner steps inside it;
:func:`follow_sync_every` then changes the algorithm's period only between two
outer steps, at the committed outer step the Weaver chose — the same on every
replica group, so no group can enter an outer allreduce that another does not::

    algo = DiLoCo(manager, [model], inner_opt, outer_opt, sync_every=10, ...)
    run = torchloom.init(..., knobs={"sync_every": 10}, custom_knobs=[sync_every_knob(algo)])
    follow_sync_every(run, algo)
    with algo:
        for outer_step in run.steps(current_step=manager.current_step):
            for _ in range(run["sync_every"]):
                ...; inner_opt.step()   # the algorithm syncs after the last one
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from torchloom.protocol import BUILTIN_KNOBS, KnobSpec
from torchloom.threadlet import Run


class _QuorumTap:
    """Stands in for the Manager's ``_client`` and keeps the last quorum it returned (the
    Manager keeps only some of its fields; the heal source is not among them)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.last: Any = None

    def _quorum(self, *args: Any, **kwargs: Any) -> Any:
        quorum = self._client._quorum(*args, **kwargs)
        self.last = quorum  # one reference assignment, read on the training thread
        return quorum

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def heal_source(quorum: Any, *, job_id: str) -> str | None:
    """The replica group a healing group recovered from, from a torchft ``QuorumResult``.

    torchft names a group ``<its replica_id>:<uuid>``; with the MNIST job's convention
    ``replica_id=f"{job_id}_{REPLICA_GROUP_ID}"`` this returns torchloom's replica id
    (``"0"``), otherwise torchft's own id. None when the quorum names no source.
    """
    src = getattr(quorum, "recover_src_replica_rank", None)
    ids = list(getattr(quorum, "replica_ids", None) or [])
    if src is None or not 0 <= src < len(ids):
        return None
    return _torchloom_id(ids[src], job_id=job_id)


def _torchloom_id(torchft_id: object, *, job_id: str) -> str:
    """``"mnist_1:<uuid>"`` → ``"1"`` (torchft's id when it does not follow the convention)."""
    name = str(torchft_id).split(":", 1)[0]
    prefix = f"{job_id}_"
    return name[len(prefix) :] if name.startswith(prefix) else name


class TorchftReporter:
    """The step hook that turns a ``torchft.Manager``'s state into quorum facts and events."""

    def __init__(self, run: Run, manager: Any) -> None:
        self._run = run
        self._manager = manager
        self._tap: _QuorumTap | None = None
        if hasattr(manager, "_client") and not isinstance(manager._client, _QuorumTap):
            self._tap = manager._client = _QuorumTap(manager._client)
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
            source = heal_source(self._tap.last, job_id=run.identity.job_id) if self._tap else None
            run.emit(
                "healed",
                step=ft_step,
                from_step=self._step,
                to_step=ft_step,
                heal_s=round(step_s, 4),
                source=source,
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


def last_quorum(manager: Any) -> tuple[int, int] | None:
    """``(participating replica groups, this group's rank among them)`` of the last quorum, or
    None before the first one or while this group does not take part. Non-blocking (unlike the
    Manager's accessors, which wait for a pending quorum): LocalSGD/DiLoCo use it to split the
    inner steps' data between two outer syncs."""
    world = int(getattr(manager, "_participating_replica_world_size", 0) or 0)
    rank = getattr(manager, "_participating_replica_rank", None)
    if world < 1 or rank is None:
        return None
    return world, int(rank)


def participant_ids(manager: Any, *, job_id: str) -> tuple[str, ...] | None:
    """torchloom replica ids of the last quorum's participants in replica-rank order, for
    uneven batch shares (``batch_weights``); None when unknown.

    Read from the quorum that :func:`attach` taps (torchft names a group
    ``<replica_id>:<uuid>``; the MNIST job's ``replica_id=f"{job_id}_{REPLICA_GROUP_ID}"``
    maps back to torchloom's id). Only when every member of the quorum takes part
    (none is healing) are the quorum's ids the participants; otherwise None, and the
    step's shares are even on every group alike. Non-blocking.
    """
    tap = getattr(manager, "_client", None)
    quorum = tap.last if isinstance(tap, _QuorumTap) else None
    ids = list(getattr(quorum, "replica_ids", None) or [])
    participants = int(getattr(manager, "_participating_replica_world_size", 0) or 0)
    if not ids or len(ids) != participants:
        return None
    return tuple(_torchloom_id(i, job_id=job_id) for i in ids)


def _fragments(algorithm: Any) -> int:
    """1 for LocalSGD, the number of model fragments for (Streaming) DiLoCo."""
    return len(getattr(algorithm, "_fragments", None) or [None])


def sync_every_knob(algorithm: Any) -> KnobSpec:
    """The ``sync_every`` knob narrowed to what ``algorithm`` accepts, for ``custom_knobs``.

    DiLoCo with ``n`` fragments needs a multiple of ``n`` with more than
    ``fragment_sync_delay`` inner steps per fragment; LocalSGD takes any value ≥ 1.
    With it, ``torchloom set sync_every=7`` is refused by the Weaver (exit 2, the
    rule in the message) instead of reaching the training processes.

    Args:
        algorithm: a ``torchft.local_sgd.LocalSGD`` or ``DiLoCo``.
    """
    n = _fragments(algorithm)
    delay = int(getattr(algorithm, "_fragment_sync_delay", 0))
    return msgspec.structs.replace(
        BUILTIN_KNOBS["sync_every"],
        min=float(n * (delay + 1)),
        multiple_of=n if n > 1 else None,
    )


def set_sync_every(algorithm: Any, value: int) -> None:
    """Set ``algorithm``'s outer period to ``value`` inner steps, between two outer steps.

    Args:
        algorithm: a ``torchft.local_sgd.LocalSGD`` or ``DiLoCo``.
        value: inner steps per outer step (DiLoCo: over all fragments, as its ``sync_every``).

    Raises:
        RuntimeError: called in the middle of an outer step (the algorithm has
            run inner steps since its last sync): the training loop must iterate
            ``run.steps()`` once per outer step.
        ValueError: ``value`` breaks the algorithm's rules (see :func:`sync_every_knob`).
    """
    local = int(getattr(algorithm, "_local_step", 0))
    if local != 0:
        raise RuntimeError(
            f"sync_every changed {local} inner step(s) into an outer step; iterate "
            "run.steps() once per outer step and run run['sync_every'] inner steps in it"
        )
    n = _fragments(algorithm)
    delay = int(getattr(algorithm, "_fragment_sync_delay", 0))
    if value < n * (delay + 1) or value % n:
        raise ValueError(
            f"sync_every={value} does not suit {n} fragment(s) with fragment_sync_delay={delay}"
        )
    if not hasattr(algorithm, "_fragments"):  # LocalSGD
        algorithm._sync_every = value
        return
    algorithm._sync_every = value // n
    for i, fragment in enumerate(algorithm._fragments):  # kept in step with DiLoCo's constructor
        fragment._sync_every = value
        fragment._fragment_sync_offset = math.floor(value / n * (i + 1))


def follow_sync_every(run: Run, algorithm: Any) -> None:
    """Make ``algorithm`` (LocalSGD or DiLoCo) follow the ``sync_every`` knob, now and live.

    The change is made on the training thread at the step boundary where the
    config version takes effect — between two outer steps when ``run.steps()``
    is iterated once per outer step with ``current_step=manager.current_step``.

    Raises:
        RuntimeError, ValueError: as :func:`set_sync_every` (at a change that
            cannot be made safely; the Weaver refuses bad values first when the
            job registered :func:`sync_every_knob`).
    """

    def _follow(config: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        if changed.get("sync_every") is not None:
            set_sync_every(algorithm, int(changed["sync_every"]))

    _follow(run.config, run.config)
    run.on_config_change(_follow)


def set_timeouts(
    manager: Any, *, collective_timeout_s: float | None, quorum_timeout_s: float | None
) -> None:
    """Set ``manager``'s timeouts (None: unchanged), between two steps.

    ``collective_timeout_s`` is the Manager's ``timeout`` (a collective's future, the heal,
    ``should_commit``) and its process group's (``set_timeout``: a reconfigured group — every
    new quorum — takes it); ``quorum_timeout_s`` is the Manager's ``quorum_timeout``, the
    longest wait of ``start_quorum``. torchft reads them at each use, so a change holds from
    the next step on.
    """
    from datetime import timedelta

    if collective_timeout_s is not None:
        td = timedelta(seconds=collective_timeout_s)
        manager._timeout = td
        pg = getattr(manager, "_pg", None)
        if pg is not None and hasattr(pg, "set_timeout"):
            pg.set_timeout(td)
    if quorum_timeout_s is not None:
        manager._quorum_timeout = timedelta(seconds=quorum_timeout_s)


def follow_timeouts(run: Run, manager: Any) -> None:
    """Make ``manager`` follow the ``collective_timeout_s`` and ``quorum_timeout_s`` knobs, now
    and at the effective step of every change (on the training thread, at the step boundary:
    the same committed step on every replica group). The ``timeouts`` policy sets them from
    measured step and allreduce times, so a slow-but-alive group is not cut off by a fixed
    timeout while a dead one is still found by its closed connection at once."""

    def _follow(config: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        if "collective_timeout_s" in changed or "quorum_timeout_s" in changed:
            set_timeouts(
                manager,
                collective_timeout_s=changed.get("collective_timeout_s"),
                quorum_timeout_s=changed.get("quorum_timeout_s"),
            )

    _follow(run.config, run.config)
    run.on_config_change(_follow)
