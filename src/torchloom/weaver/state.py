"""The Weaver's model of the world: jobs, replica groups, ranks, the DR map.

Plain data and pure transitions, no I/O. Every function takes ``now`` (wall
clock, seconds since the epoch) so tests drive time without sleeping, and
returns the :class:`~torchloom.protocol.HistoryEvent` s it produced; the service
publishes them and persists the ranks listed in :attr:`WeaverState.dirty`.

Rank states: ``joining`` (known, no step yet) → ``training`` ⇄ ``paused``;
``suspect`` (heartbeat late by ``suspect_after_s``), ``failed`` (no heartbeat
for ``failure_timeout_s``), ``hung`` (heartbeats, but the step has not moved
for ``hang_timeout_s`` while it should be training), ``exited`` (said goodbye).
A heartbeat from a suspect, hung or failed rank brings it back to training.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from torchloom.protocol import (
    CheckpointRecord,
    DesiredConfig,
    HistoryEvent,
    RankEvent,
    RegistryEntry,
    Telemetry,
)
from torchloom.protocol.messages import RankState

RankKey = tuple[str, str, int]
"""``(job_id, replica_id, rank)``."""

PROGRESS_SAVE_S = 30.0
"""A training rank's progress (step, applied config version) is written to the registry at
most this often, in seconds; state changes and identity are written at once. A registry
entry is written whole, so the next write carries the newest progress, and a stale one
after a crash is older, which is the safe side (the Weaver keeps more snapshots)."""

LIVE_STATES: frozenset[str] = frozenset({"joining", "training", "paused", "suspect", "hung"})


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the DR map keeps ranks that are gone (``failed``, ``exited``).

    Attributes:
        dead_ttl_s: a gone rank is forgotten this long after it went, in seconds.
        max_dead_per_job: at most this many gone ranks per job (the longest gone go first).
    """

    dead_ttl_s: float = 3600.0
    max_dead_per_job: int = 1000


@dataclass(frozen=True, slots=True)
class LivenessConfig:
    """Thresholds of failure detection, in seconds.

    With the Threadlet's default heartbeat every 0.2 s, a ``kill -9`` is seen
    as *failed* after ``failure_timeout_s`` plus at most one Weaver tick.
    """

    failure_timeout_s: float = 0.8
    suspect_after_s: float = 0.5
    hang_timeout_s: float = 30.0


class Timing(msgspec.Struct, gc=False):
    """One telemetry flush's step timing: means per step since the previous flush, in seconds.

    ``busy_s`` is ``data + compute`` (the time the rank works on its own, not waiting
    for peers), None when the training loop marks no phases (:meth:`Run.mark`).

    Not tracked by Python's cyclic garbage collector (``gc=False``; it holds no containers):
    with 10,000 ranks × 64 of them, a full collection otherwise paused the Weaver's loop
    for hundreds of milliseconds.
    """

    ts: float
    step: int
    step_s: float
    busy_s: float | None
    comm_s: float | None
    sent_bytes: float | None = None
    """Bytes per step the rank handed to gradient collectives (``Telemetry.comm_bytes``)."""
    dense_bytes: float | None = None
    """What float32 without compression would have sent for the same gradients."""


SILENCE_NOTED_S = 0.35
"""A heartbeat gap this long (about two of the Threadlet's 0.2 s flushes) is kept in
:attr:`RankWindow.silences`."""


def _window(n: int) -> deque[Any]:
    return deque(maxlen=n)


@dataclass(slots=True)
class RankWindow:
    """The recent past of one rank that policies read: bounded, oldest dropped.

    Attributes:
        timing: step timings of the last flushes that saw progress (64 ≈ 13 s at 5 Hz).
        losses: ``(step, loss)`` of the last logged ``loss`` values; NaN when the rank
            logged a NaN or ±Inf.
        grad_norms: ``(step, norm)`` of the last logged ``grad_norm`` values, likewise.
        device: ``(ts, sample)`` device health samples (64 ≈ 1 min at 1 Hz).
        busy: the busy time per step (``Timing.busy_s``, else ``step_s``) of each entry of
            ``timing``, as plain floats (``min()`` over them runs in C).
        best_busy: the lowest of ``busy`` since the timing windows began (s; ``inf`` before).
        timing_ts, timing_step: each entry's ``ts`` and ``step``, in step with ``timing``:
            both ascend (a flush whose step goes back — a restarted process — starts the
            timing windows afresh), so a policy finds a time or step range by bisection.
        silences: ``(ts, gap_s)`` of heartbeats that came :data:`SILENCE_NOTED_S` or more
            after the previous one (a stopped or starved process; the timeouts policy reads it).
        nonfinite: ``(step, name)`` of the newest NaN/±Inf logged as ``loss`` or ``grad_norm``,
            or None: policies read it in O(1) instead of scanning the windows.
    """

    timing: deque[Timing] = field(default_factory=lambda: _window(64))
    busy: deque[float] = field(default_factory=lambda: _window(64))
    timing_ts: deque[float] = field(default_factory=lambda: _window(64))
    timing_step: deque[int] = field(default_factory=lambda: _window(64))
    best_busy: float = math.inf
    losses: deque[tuple[int, float]] = field(default_factory=lambda: _window(256))
    grad_norms: deque[tuple[int, float]] = field(default_factory=lambda: _window(64))
    device: deque[tuple[float, dict[str, float]]] = field(default_factory=lambda: _window(64))
    silences: deque[tuple[float, float]] = field(default_factory=lambda: _window(32))
    nonfinite: tuple[int, str] | None = None

    def restart(self) -> None:
        """Forget the step-ordered windows (timings, losses, gradient norms, the last NaN)."""
        for d in (self.timing, self.busy, self.timing_ts, self.timing_step):
            d.clear()
        self.losses.clear()
        self.grad_norms.clear()
        self.nonfinite = None
        self.best_busy = math.inf

    def observe(self, msg: Telemetry, now: float) -> None:
        """Fold one telemetry flush in. A rank whose step goes back (a process restarted, from
        scratch or from a checkpoint) starts every step-ordered window afresh: its earlier
        losses must not read as a spike or a plateau of the new run."""
        last_step = self.timing_step[-1] if self.timing_step else None
        if last_step is None and self.losses:
            last_step = self.losses[-1][0]
        if last_step is not None and (
            msg.step < last_step or (self.timing_ts and now < self.timing_ts[-1])
        ):
            self.restart()
        if msg.step_time_s:
            ph = msg.phases_s or {}
            busy = ph["data"] + ph["compute"] if "data" in ph and "compute" in ph else None
            cb = msg.comm_bytes or {}
            self.timing.append(
                Timing(
                    now,
                    msg.step,
                    msg.step_time_s,
                    busy,
                    ph.get("comm"),
                    cb.get("sent"),
                    cb.get("dense"),
                )
            )
            b = msg.step_time_s if busy is None else busy
            self.busy.append(b)
            self.best_busy = min(self.best_busy, b)
            self.timing_ts.append(now)
            self.timing_step.append(msg.step)
        for point in msg.points:
            for name, out in (("loss", self.losses), ("grad_norm", self.grad_norms)):
                if name in point.values:
                    v = point.values[name]
                    if v is None or not math.isfinite(v):
                        v = math.nan
                        if self.nonfinite is None or point.step >= self.nonfinite[0]:
                            self.nonfinite = (point.step, name)
                    out.append((point.step, v))
        if msg.device_stats:
            self.device.append((now, msg.device_stats))


@dataclass(slots=True)
class Rank:
    """One rank as the Weaver knows it: the persisted entry plus volatile figures."""

    entry: RegistryEntry
    steps_per_s: float = 0.0
    step_changed_ts: float = 0.0
    progress_saved_ts: float = 0.0
    """When its step was last marked for the registry (progress is saved every
    ``PROGRESS_SAVE_S``, not every flush: 10,000 ranks would be thousands of writes a second)."""
    samples_per_s: float | None = None
    step_time_s: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    metrics_step: int = -1
    dropped_points: int = 0
    config_lag_s: float = 0.0
    last_seq: int = -1
    quorum: dict[str, Any] | None = None
    window: RankWindow = field(default_factory=RankWindow)
    straggler: bool | None = None
    """Flagged by the straggler policy's scores at its last round (None: not judged)."""
    risk: float | None = None
    """Its device's failure risk in [0, 1] at the failure policy's last round (None: no sample)."""
    checkpointing: bool = False
    """Its process runs a Checkpointer (it said so with ``checkpoint_ready``)."""
    conn: str = ""
    """Its NATS connection as its last heartbeat named it (``<server id>/<client id>``)."""
    closed_ts: float | None = None
    """When it was failed because its connection closed (None: not so): a goodbye that comes
    within :data:`GOODBYE_GRACE_S` after turns the failure into an exit."""
    restored: bool = False
    """Loaded from the registry when this Weaver took over and not heard from since: its
    step is the last one saved there (up to ``PROGRESS_SAVE_S`` old), so no effective step
    is planned on it (see :func:`unheard_since_restore`)."""

    @property
    def key(self) -> RankKey:
        return (self.entry.job_id, self.entry.replica_id, self.entry.rank)

    @property
    def state(self) -> RankState:
        return self.entry.state

    @property
    def live(self) -> bool:
        return self.entry.state in LIVE_STATES


@dataclass(slots=True)
class ApplyTracking:
    """Who has applied config ``version`` and at which step.

    ``strict`` is False for a change of knobs that need no common step: ranks
    apply it at their next boundary, and a later step is not reported as late.
    """

    version: int
    effective_step: int
    issued_ts: float
    expected: set[RankKey]
    strict: bool = True
    applied: dict[RankKey, int] = field(default_factory=dict)
    flagged: set[RankKey] = field(default_factory=set)
    done: bool = False


@dataclass(slots=True)
class Job:
    job_id: str
    config: DesiredConfig | None = None
    ranks: dict[RankKey, Rank] = field(default_factory=dict)
    applies: dict[int, ApplyTracking] = field(default_factory=dict)
    departed: dict[RankKey, int] = field(default_factory=dict)
    """Drained ranks (key → pid): their late messages must not put them back in the DR map."""
    claimants: dict[tuple[RankKey, str, int], float] = field(default_factory=dict)
    """Second processes that claimed a live rank's identity, ``(key, host, pid)`` → last seen."""
    outliers: set[RankKey] = field(default_factory=set)
    """Live ranks flagged as far ahead of the job's position (:mod:`~torchloom.weaver.planning`):
    left out of effective-step planning until they are back in range."""
    checkpoints: dict[str, CheckpointRecord] = field(default_factory=dict)
    """The job's checkpoint registry by id (:mod:`~torchloom.weaver.checkpoints`)."""
    dirty_checkpoints: set[str] = field(default_factory=set)
    """Checkpoint ids changed since the registry bucket was last written."""
    backup_keep: dict[str, Any] | None = None
    """The backup retention its Checkpointers said (``keep_last``, ``keep_every``,
    ``keep_best``), or None: no backup (:func:`~torchloom.weaver.checkpoints.backup_drop`)."""
    failures: int = 0
    """Ranks marked failed since this Weaver started (the checkpoint policy's MTBF)."""
    ended_cleanly: bool | None = None
    """How the job's last run ended: True when every rank exited (finished, stopped,
    drained), False when one failed; None while this Weaver has not seen it end. A clean end
    is not resumed from a checkpoint: the next launch is a new run."""

    def live_ranks(self) -> list[Rank]:
        return [r for r in self.ranks.values() if r.live]

    @property
    def ended(self) -> bool:
        """True when no live rank has joined the job's current epoch (every rank
        exited or failed, or none is known).

        The next rank that joins an ended job starts a new epoch from its own
        initial knobs.
        """
        if self.config is None:
            return True
        return not any(r.live and r.entry.epoch == self.config.epoch for r in self.ranks.values())

    def replica_ids(self) -> set[str]:
        return {k[1] for k in self.ranks}


@dataclass(slots=True)
class WeaverState:
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    retention: Retention = field(default_factory=Retention)
    jobs: dict[str, Job] = field(default_factory=dict)
    dropped_messages: dict[str, int] = field(default_factory=dict)
    dirty: set[RankKey] = field(default_factory=set)
    removed: set[RankKey] = field(default_factory=set)
    heard: dict[RankKey, None] = field(default_factory=dict)
    """Ranks in the order they were last heard from, oldest first (insertion order of a
    dict, moved to the end by :func:`touch`): :func:`check_liveness` looks only at the
    front, where the silent ones are."""
    stepped: dict[RankKey, None] = field(default_factory=dict)
    """Ranks in the order their step last moved, oldest first (for the hang check)."""
    connections: dict[str, RankKey] = field(default_factory=dict)
    """Which rank each live NATS connection (``<server id>/<client id>``) belongs to."""
    updates: int = 0
    """Messages folded in so far (telemetry and rank events): a result worked out from the
    state at one ``(now, updates)`` is still valid while neither moved."""
    acted: dict[str, deque[float]] = field(default_factory=dict)
    """When policies acted on each decision key (newest last, 32 kept): their cooldowns
    and repeat counts are read from here."""

    def note_acted(self, key: str, now: float) -> None:
        self.acted.setdefault(key, deque(maxlen=32)).append(now)

    def last_acted(self, key: str) -> float | None:
        times = self.acted.get(key)
        return times[-1] if times else None

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Job(job_id)
        return job

    def count_dropped(self, kind: str) -> int:
        self.dropped_messages[kind] = self.dropped_messages.get(kind, 0) + 1
        return self.dropped_messages[kind]


def _event(kind: str, rank: Rank, now: float, message: str, **data: Any) -> HistoryEvent:
    e = rank.entry
    return HistoryEvent(
        job_id=e.job_id,
        kind=kind,
        ts=now,
        message=message,
        replica_id=e.replica_id,
        rank=e.rank,
        step=e.last_step,
        data=data,
    )


def touch(state: WeaverState, key: RankKey, *, stepped: bool = False) -> None:
    """Move ``key`` to the end of :attr:`WeaverState.heard` (it was just heard from) and,
    with ``stepped``, of :attr:`WeaverState.stepped`. O(1)."""
    heard = state.heard
    heard.pop(key, None)
    heard[key] = None
    if stepped:
        state.stepped.pop(key, None)
        state.stepped[key] = None


def set_rank_state(
    state: WeaverState, rank: Rank, new: RankState, now: float, why: str
) -> list[HistoryEvent]:
    """Move ``rank`` to ``new`` and return the history event for it (none if unchanged)."""
    old = rank.entry.state
    if old == new:
        return []
    rank.entry.state = new
    rank.entry.state_since_ts = now
    if new == "training":
        rank.step_changed_ts = now  # a resumed or recovered rank gets a fresh hang timer
        touch(state, rank.key, stepped=True)
    state.dirty.add(rank.key)
    e = rank.entry
    msg = f"rank {e.replica_id}/{e.rank} {old} -> {new}: {why}"
    events = [_event("rank_" + new, rank, now, msg, previous=old, reason=why)]
    if new in ("failed", "exited"):
        job = state.jobs[e.job_id]
        job.failures += new == "failed"
        if job.ended:
            job.ended_cleanly = not any(r.state == "failed" for r in job.ranks.values())
        for tracking in job.applies.values():
            if rank.key not in tracking.applied:  # one that applied it before it left counts
                tracking.expected.discard(rank.key)
        events += check_apply_done(job, now)
    return events


MAX_CLAIMANTS = 64
"""Duplicate claimants remembered per job (each reported once); beyond it the oldest go."""


def holds(rank: Rank, *, host: str, pid: int, now: float, failure_timeout_s: float) -> bool:
    """Whether the process ``(host, pid)`` may speak as ``rank``: it is the process the DR map
    knows, or that process is gone (failed, exited, or silent for ``failure_timeout_s``).

    The rule that fences a second process with a live identity (a stale worker that
    torchrun left behind, a copy started twice): **the first live claimant keeps it**. A
    process is ``(host, pid)``; a message without a pid (an old Threadlet) is not judged.
    """
    e = rank.entry
    same_host = not host or not e.host or host == e.host  # a side that does not say: pid only
    if not pid or not e.pid or (pid == e.pid and same_host):
        return True
    return not (rank.live and now - e.last_seen_ts < failure_timeout_s)


def duplicate_claim(
    state: WeaverState, rank: Rank, *, host: str, pid: int, now: float
) -> list[HistoryEvent]:
    """A second process claimed ``rank`` while its holder is live: a ``duplicate_rank``
    event the first time this claimant is seen, and a count of its dropped messages."""
    state.count_dropped("duplicate_rank")
    job = state.jobs[rank.entry.job_id]
    claim = (rank.key, host, pid)
    seen = claim in job.claimants
    job.claimants[claim] = now
    if seen:
        return []
    if len(job.claimants) > MAX_CLAIMANTS:
        del job.claimants[min(job.claimants, key=job.claimants.__getitem__)]
    e = rank.entry
    return [
        _event(
            "duplicate_rank",
            rank,
            now,
            f"rank {e.replica_id}/{e.rank} claimed by a second process (pid {pid} on "
            f"{host or '?'}) while pid {e.pid} on {e.host or '?'} holds it: refused; the first "
            "keeps the identity, the second trains without control until the first is gone",
            holder={"host": e.host, "pid": e.pid},
            claimant={"host": host, "pid": pid},
        )
    ]


def upsert_rank(
    state: WeaverState,
    *,
    job_id: str,
    replica_id: str,
    rank_no: int,
    now: float,
    group_world_size: int = 0,
    host: str = "",
    pid: int = 0,
    device: str = "",
) -> tuple[Rank | None, list[HistoryEvent]]:
    """Find the rank or add it to the DR map (state ``joining``); refresh its identity.

    A new process (another ``(host, pid)``) takes the rank's place only when the old one is
    gone (:func:`holds`); while it is live the newcomer is a duplicate: ``(None, events)``
    with a ``duplicate_rank`` event the first time, and its message is to be dropped.
    """
    job = state.job(job_id)
    key = (job_id, replica_id, rank_no)
    rank = job.ranks.get(key)
    events: list[HistoryEvent] = []
    if rank is not None and not holds(
        rank, host=host, pid=pid, now=now, failure_timeout_s=state.liveness.failure_timeout_s
    ):
        return None, duplicate_claim(state, rank, host=host, pid=pid, now=now)
    if rank is None or (pid and rank.entry.pid and pid != rank.entry.pid):
        restarted = rank is not None
        rank = Rank(
            RegistryEntry(
                job_id=job_id,
                replica_id=replica_id,
                rank=rank_no,
                joined_ts=now,
                last_seen_ts=now,
                state_since_ts=now,
            ),
            step_changed_ts=now,
        )
        job.ranks[key] = rank
        touch(state, key, stepped=True)
        job.outliers.discard(key)
        state.removed.discard(key)
        events.append(
            _event(
                "rank_joined",
                rank,
                now,
                f"rank {replica_id}/{rank_no} {'re' if restarted else ''}joined",
                host=host,
                pid=pid,
                device=device,
            )
        )
    e = rank.entry
    identity = (
        host or e.host,
        pid or e.pid,
        device or e.device,
        group_world_size or e.group_world_size,
    )
    if events or (e.host, e.pid, e.device, e.group_world_size) != identity:
        e.host, e.pid, e.device, e.group_world_size = identity
        state.dirty.add(key)
    return rank, events


def on_telemetry(state: WeaverState, msg: Telemetry, now: float) -> list[HistoryEvent]:
    """Fold one telemetry flush (a heartbeat) into the state."""
    state.updates += 1
    job = state.jobs.get(msg.job_id)
    if job is not None and job.departed.get((msg.job_id, msg.replica_id, msg.rank)) == msg.pid:
        return []  # the last flush of a drained rank
    rank, events = upsert_rank(
        state,
        job_id=msg.job_id,
        replica_id=msg.replica_id,
        rank_no=msg.rank,
        now=now,
        group_world_size=msg.group_world_size,
        host=msg.host,
        pid=msg.pid,
        device=msg.device,
    )
    if rank is None:
        return events  # from a second process with this identity: not taken
    e = rank.entry
    if msg.seq <= rank.last_seq and msg.seq != 0:
        return events  # a duplicate or reordered flush
    rank.last_seq = msg.seq
    rank.restored = False
    prev_step = e.last_step
    moved = msg.step != prev_step
    if moved:
        rank.step_changed_ts = now
        mark_progress(state, rank, now)
    e.last_step = msg.step
    if now - e.last_seen_ts >= SILENCE_NOTED_S and e.last_seen_ts > 0:
        rank.window.silences.append((now, now - e.last_seen_ts))
    e.last_seen_ts = now
    touch(state, rank.key, stepped=moved)
    if e.applied_version != msg.applied_version:
        e.applied_version = msg.applied_version
        mark_progress(state, rank, now)
    rank.samples_per_s = msg.samples_per_s
    rank.step_time_s = msg.step_time_s
    if msg.step_time_s:
        rank.steps_per_s = 1.0 / msg.step_time_s
    elif msg.state == "paused":
        rank.steps_per_s = 0.0
    rank.dropped_points = msg.dropped_points
    rank.quorum = msg.quorum
    rank.config_lag_s = min(max(msg.config_lag_s, 0.0), 5.0)
    for point in msg.points:
        if point.step >= rank.metrics_step:
            rank.metrics.update(point.values)
            rank.metrics_step = point.step
    rank.window.observe(msg, now)
    if msg.conn and msg.conn != rank.conn:  # joined, or reconnected (to another server)
        state.connections.pop(rank.conn, None)
        state.connections[msg.conn] = rank.key
        rank.conn = msg.conn
    # "exited" comes with its reason in the rank's exit event; a heartbeat only says alive or paused
    reported: RankState = (
        "paused" if msg.state == "paused" else ("joining" if msg.step < 0 else "training")
    )
    stays = (
        e.state == "exited"  # a late flush after goodbye does not revive a rank
        or msg.state == "exited"
        or (e.state == "hung" and reported == "training" and msg.step == prev_step)
    )
    if e.state != reported and not stays:
        events += set_rank_state(state, rank, reported, now, "heartbeat")
    job = state.jobs[msg.job_id]
    events += _check_missing_applies(job, rank, now)
    return events


def on_rank_event(state: WeaverState, msg: RankEvent, now: float) -> list[HistoryEvent]:
    """Fold a rank's lifecycle event (config applied, exited, or a fault-tolerance fact) into the state."""
    state.updates += 1
    key = (msg.job_id, msg.replica_id, msg.rank)
    job = state.jobs.get(msg.job_id)
    if job is not None and key in job.departed and key not in job.ranks:
        return []  # from a drained rank that has left the DR map
    rank, events = upsert_rank(
        state,
        job_id=msg.job_id,
        replica_id=msg.replica_id,
        rank_no=msg.rank,
        now=now,
        host=msg.host,
        pid=msg.pid,
    )
    if rank is None:
        return events  # from a second process with this identity: not taken
    rank.entry.last_seen_ts = max(rank.entry.last_seen_ts, now)
    touch(state, rank.key)
    if msg.kind == "exited":
        rank.entry.last_step = max(rank.entry.last_step, msg.step)
        if msg.reason == "drained":
            return events + remove_drained(state, rank, now)
        why = msg.reason or "exited"
        closed = rank.closed_ts
        if rank.state == "failed" and closed is not None and now - closed <= GOODBYE_GRACE_S:
            state.jobs[msg.job_id].failures -= 1  # it was no failure: its goodbye came late
            why += f" (its goodbye came {now - closed:.3f} s after its connection closed)"
        rank.closed_ts = None
        return events + set_rank_state(state, rank, "exited", now, why)
    if msg.kind in ("checkpoint_saved", "checkpoint_failed"):
        return events  # folded by weaver.checkpoints.on_report
    if msg.kind == "checkpoint_ready":
        rank.checkpointing = True
        keep = msg.data.get("backup")
        if isinstance(keep, dict):
            state.jobs[msg.job_id].backup_keep = keep
        return events
    if msg.kind != "config_applied":  # a fault-tolerance fact: history only
        return [*events, _ft_event(rank, msg, now)]
    job = state.jobs[msg.job_id]
    if msg.version > rank.entry.applied_version:
        rank.entry.applied_version = msg.version
        mark_progress(state, rank, now)
    for tracking in job.applies.values():
        if tracking.version <= msg.version and rank.key not in tracking.applied:
            tracking.applied[rank.key] = msg.step
            if (
                tracking.strict
                and rank.key in tracking.expected
                and msg.step != tracking.effective_step
            ):
                tracking.flagged.add(rank.key)
                events.append(
                    _event(
                        "apply_late",
                        rank,
                        now,
                        f"rank {msg.replica_id}/{msg.rank} applied v{tracking.version} at step {msg.step}, "
                        f"effective step was {tracking.effective_step}",
                        version=tracking.version,
                        applied_at_step=msg.step,
                        effective_step=tracking.effective_step,
                    )
                )
    return events + check_apply_done(job, now)


def mark_progress(state: WeaverState, rank: Rank, now: float) -> None:
    """The rank's step or applied version moved: mark it for the registry at most every
    ``PROGRESS_SAVE_S`` (10,000 ranks applying a change would be 10,000 writes at once)."""
    if now - rank.progress_saved_ts >= PROGRESS_SAVE_S:
        rank.progress_saved_ts = now
        state.dirty.add(rank.key)


def remove_drained(state: WeaverState, rank: Rank, now: float) -> list[HistoryEvent]:
    """A drained rank left: take it out of the DR map (and the KV registry), not "failed"."""
    job = state.jobs[rank.entry.job_id]
    key = rank.key
    job.ranks.pop(key, None)
    job.departed[key] = rank.entry.pid
    state.dirty.discard(key)
    state.removed.add(key)
    e = rank.entry
    events = [
        _event(
            "rank_drained",
            rank,
            now,
            f"rank {e.replica_id}/{e.rank} drained after step {e.last_step}",
        )
    ]
    if not any(k[1] == e.replica_id for k in job.ranks):
        events.append(
            HistoryEvent(
                job_id=e.job_id,
                kind="replica_drained",
                ts=now,
                replica_id=e.replica_id,
                step=e.last_step,
                message=f"replica group {e.replica_id} left the run (drained)",
            )
        )
    for tracking in job.applies.values():
        if key not in tracking.applied:  # one that applied it before it left counts
            tracking.expected.discard(key)
    return events + check_apply_done(job, now)


def _ft_event(rank: Rank, msg: RankEvent, now: float) -> HistoryEvent:
    """History entry for a fault-tolerance fact reported by a rank (torchft quorum, heal, commit)."""
    d = msg.data
    who = f"rank {msg.replica_id}/{msg.rank}"
    text = {
        "quorum_changed": f"{who}: quorum {d.get('quorum_id')} with {d.get('participants')} replica group(s)"
        f" (was {d.get('previous_participants')})",
        "heal_started": f"{who}: healing at step {msg.step}",
        "healed": f"{who}: healed from replica group {d.get('source') or '?'} to step {msg.step}"
        f" in {d.get('heal_s', 0):.3f} s",
        "commit_failed": f"{who}: step {msg.step} not committed ({d.get('commit_failures')} in a row)",
        "checkpoint_loaded": f"{who}: loaded checkpoint {d.get('id')} ({d.get('why', '')}); "
        f"goes on at step {msg.step}",
        "rollback_failed": f"{who}: rollback to {d.get('id')} not done at step {msg.step}: "
        f"{msg.reason}",
    }.get(msg.kind, f"{who}: {msg.kind}" + (f": {msg.reason}" if msg.reason else ""))
    return HistoryEvent(
        job_id=msg.job_id,
        kind=msg.kind,
        ts=msg.ts if msg.ts > 0 else now,
        message=text,
        replica_id=msg.replica_id,
        rank=msg.rank,
        step=msg.step,
        data=dict(d),
    )


def _check_missing_applies(job: Job, rank: Rank, now: float) -> list[HistoryEvent]:
    events = []
    for t in job.applies.values():
        if (
            t.strict
            and rank.key in t.expected
            and rank.key not in t.applied
            and rank.key not in t.flagged
            and rank.entry.last_step >= t.effective_step
            and rank.entry.applied_version < t.version
        ):
            t.flagged.add(rank.key)
            events.append(
                _event(
                    "apply_missing",
                    rank,
                    now,
                    f"rank {rank.entry.replica_id}/{rank.entry.rank} is at step {rank.entry.last_step} "
                    f"without v{t.version} (effective step {t.effective_step})",
                    version=t.version,
                    effective_step=t.effective_step,
                )
            )
    return events


def check_apply_done(job: Job, now: float) -> list[HistoryEvent]:
    """Emit ``config_applied`` for each tracked version every expected rank has applied."""
    events = []
    for t in sorted(job.applies.values(), key=lambda t: t.version):
        if t.done or not t.applied.keys() >= t.expected:  # a view: no copy of 10k keys per event
            continue
        t.done = True
        if not t.expected:
            continue  # every rank it was meant for has left
        steps = {f"{k[1]}/{k[2]}": t.applied[k] for k in sorted(t.expected)}
        consistent = all(s == t.effective_step for s in steps.values())
        where = f"at step {t.effective_step}" if consistent else f"at steps {steps}"
        if not t.strict:  # no common step was asked for
            where, consistent = f"at their next step boundary {steps}", True
        events.append(
            HistoryEvent(
                job_id=job.job_id,
                kind="config_applied",
                ts=now,
                step=t.effective_step,
                version=t.version,
                message=f"v{t.version} applied by {len(steps)} rank(s) {where}"
                f"{'' if consistent else ' (NOT at the effective step)'}",
                data={
                    "ranks": steps,
                    "consistent": consistent,
                    "latency_s": round(now - t.issued_ts, 4),
                },
            )
        )
    # keep only the recent trackings
    for v in sorted(job.applies)[:-64]:
        del job.applies[v]
    return events


def grant_grace(state: WeaverState, now: float) -> None:
    """Treat every live rank as just heard from (after this Weaver could not listen)."""
    for job in state.jobs.values():
        for rank in job.ranks.values():
            if rank.live:
                rank.entry.last_seen_ts = max(rank.entry.last_seen_ts, now)
                rank.step_changed_ts = max(rank.step_changed_ts, now)
                touch(state, rank.key, stepped=True)


def check_liveness(state: WeaverState, now: float, *, full: bool = True) -> list[HistoryEvent]:
    """Mark ranks suspect, failed or hung from heartbeat age and step progress.

    Args:
        full: look at every rank (O(ranks)); False: only at the fronts of
            :attr:`WeaverState.heard` and :attr:`WeaverState.stepped` — the ranks silent or
            still for long enough to be judged, O(those) — as the Weaver does at every tick
            between full passes (at 10,000 ranks a full pass every 50 ms was an eighth of its
            loop).
    """
    if full:
        ranks = [r for job in state.jobs.values() for r in job.ranks.values()]
    else:
        ranks = _due(state, now)
    events: list[HistoryEvent] = []
    for rank in ranks:
        if rank.live:
            events += _judge(state, rank, now)
    return events


def _due(state: WeaverState, now: float) -> list[Rank]:
    """The ranks at the fronts of the two orders that are due a look; ranks found gone or no
    longer live leave the orders (a heartbeat or a step puts them back)."""
    cfg = state.liveness
    due: dict[RankKey, Rank] = {}
    for order, hang in ((state.heard, False), (state.stepped, True)):
        leaving = []
        for key in order:
            job = state.jobs.get(key[0])
            rank = job.ranks.get(key) if job is not None else None
            if rank is None or not rank.live:
                leaving.append(key)
                continue
            if hang:
                recent = now - rank.step_changed_ts < cfg.hang_timeout_s
            else:
                recent = now - rank.entry.last_seen_ts < cfg.suspect_after_s
            if recent:
                break  # every later one was heard from (or stepped) more recently
            due[key] = rank
        for key in leaving:
            order.pop(key, None)
    return list(due.values())


def unheard_since_restore(state: WeaverState, job_id: str) -> list[Rank]:
    """The job's live ranks this Weaver restored from the registry and has not heard from
    since (:attr:`Rank.restored`). Their steps may be far behind where they train, so an
    effective step planned on them could already be past: a Weaver that just took over
    waits for their first heartbeat (or for them to be failed) before it plans one."""
    job = state.jobs.get(job_id)
    return [r for r in job.live_ranks() if r.restored] if job is not None else []


def liveness_of(state: WeaverState, job_id: str) -> LivenessConfig:
    """The job's thresholds: the Weaver's (``torchloom up --failure-timeout-s``,
    ``--hang-timeout-s``), with the job's ``failure_timeout_s`` and ``hang_timeout_s`` knobs
    where they are set (by a person, or the ``timeouts`` policy from measured step times);
    suspect at 60 % of the failure timeout, as ``up`` does.

    A job with thresholds below the Weaver's is judged at the full pass (once a second) rather
    than the tick's fast path, which looks only at ranks due by the Weaver's thresholds."""
    cfg = state.liveness
    job = state.jobs.get(job_id)
    latest = job.config.latest() if job is not None and job.config is not None else None
    if latest is None:
        return cfg
    fail, hang = latest.values.get("failure_timeout_s"), latest.values.get("hang_timeout_s")
    if fail is None and hang is None:
        return cfg
    return LivenessConfig(
        failure_timeout_s=float(fail) if fail else cfg.failure_timeout_s,
        suspect_after_s=float(fail) * 0.6 if fail else cfg.suspect_after_s,
        hang_timeout_s=float(hang) if hang else cfg.hang_timeout_s,
    )


def _judge(state: WeaverState, rank: Rank, now: float) -> list[HistoryEvent]:
    cfg = liveness_of(state, rank.key[0])
    silent_s = now - rank.entry.last_seen_ts
    if silent_s >= cfg.failure_timeout_s:
        return set_rank_state(state, rank, "failed", now, f"no heartbeat for {silent_s:.2f} s")
    if silent_s >= cfg.suspect_after_s and rank.state != "hung":
        return set_rank_state(state, rank, "suspect", now, f"heartbeat late by {silent_s:.2f} s")
    if (
        rank.state == "training"
        and rank.entry.last_step >= 0
        and now - rank.step_changed_ts >= cfg.hang_timeout_s
    ):
        return set_rank_state(
            state,
            rank,
            "hung",
            now,
            f"step {rank.entry.last_step} has not moved for {now - rank.step_changed_ts:.1f} s",
        )
    return []


CLOSED_BY_CLIENT = frozenset({"Client Closed", "Read Error"})
"""Disconnect reasons (nats-server's words) that mean the client's end went away — its process
died or closed the socket — as opposed to the server dropping a live client (``Slow
Consumer``, ``Stale Connection``, ``Server Shutdown``, …), who reconnects."""


def on_connection_closed(
    state: WeaverState, conn: str, *, reason: str, now: float
) -> list[HistoryEvent]:
    """A NATS connection closed (the server's disconnect advisory): the rank whose heartbeats
    came over it fails at once if the client's end went away (:data:`CLOSED_BY_CLIENT`) —
    a ``kill -9`` or a crash is seen in milliseconds, not after ``failure_timeout_s``. A rank
    that has reconnected since names another connection, so its old one closing changes
    nothing; nor does a rank that said goodbye first (it is ``exited``)."""
    key = state.connections.pop(conn, None)
    if key is None or reason not in CLOSED_BY_CLIENT:
        return []
    job = state.jobs.get(key[0])
    rank = job.ranks.get(key) if job is not None else None
    if rank is None or rank.conn != conn or not rank.live:
        return []
    rank.closed_ts = now
    return set_rank_state(state, rank, "failed", now, f"its connection closed ({reason})")


GOODBYE_GRACE_S = 5.0
"""A rank's goodbye (``exited``) and its connection's close travel different ways (its own
connection; the server's advisory on the Weaver's), so a clean exit's close can come first and
fail the rank. A goodbye within this many seconds after such a failure makes it an exit."""


def forget_ranks(
    state: WeaverState, job: Job, keys: list[RankKey], now: float, *, why: str
) -> list[HistoryEvent]:
    """Take ranks out of the DR map (and the KV registry): one ``ranks_forgotten`` event."""
    if not keys:
        return []
    for key in keys:
        job.ranks.pop(key, None)
        job.outliers.discard(key)
        state.dirty.discard(key)
        state.removed.add(key)
    ids = sorted(f"{k[1]}/{k[2]}" for k in keys)
    shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    return [
        HistoryEvent(
            job_id=job.job_id,
            kind="ranks_forgotten",
            ts=now,
            message=f"forgot {len(keys)} gone rank(s) of the DR map ({why}): {shown}",
            data={"count": len(keys), "ranks": ids[:100], "why": why},
        )
    ]


def expire_dead(state: WeaverState, now: float) -> list[HistoryEvent]:
    """Forget gone ranks (``failed``, ``exited``) past :class:`Retention`: gone longer than
    ``dead_ttl_s``, or beyond ``max_dead_per_job`` (the longest gone first)."""
    keep = state.retention
    events: list[HistoryEvent] = []
    for job in state.jobs.values():
        dead = [r for r in job.ranks.values() if not r.live]
        if not dead:
            continue
        old = [r.key for r in dead if now - r.entry.state_since_ts >= keep.dead_ttl_s]
        excess = len(dead) - len(old) - keep.max_dead_per_job
        if excess > 0:
            young = sorted(
                (r for r in dead if now - r.entry.state_since_ts < keep.dead_ttl_s),
                key=lambda r: r.entry.state_since_ts,
            )
            old += [r.key for r in young[:excess]]
        why = f"gone over {keep.dead_ttl_s:g} s, or beyond {keep.max_dead_per_job} kept per job"
        events += forget_ranks(state, job, old, now, why=why)
    return events
