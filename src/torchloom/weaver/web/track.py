"""What the dashboard remembers of a job over time; pure data, no I/O.

The Weaver's state holds each rank's *latest* figures. The dashboard also needs
their past: chart series per replica group, a short loss/step-time trail per
rank (sparklines), the goodput so far, and the tail of the event history. A
:class:`JobTrack` is fed by :func:`sample` (on a timer, ``now`` passed in) and
:meth:`JobTrack.add_event`; everything in it is bounded.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

from torchloom.protocol import HistoryEvent, to_builtins
from torchloom.weaver.state import Job, Rank, RankKey
from torchloom.weaver.web.schema import EventView
from torchloom.weaver.web.series import Series

SPARK_POINTS = 40
"""Points in a rank's sparkline trail."""

FAILURE_KINDS = frozenset({"rank_failed", "rank_hung"})
"""History event kinds counted as failures."""

EVENTS_KEPT = 2000
"""History events kept per job for the page (the stream keeps them all)."""


def rank_id(rank: Rank) -> str:
    """The page's id of a rank: ``"<replica_id>/<rank>"``."""
    return f"{rank.entry.replica_id}/{rank.entry.rank}"


def key_id(key: RankKey) -> str:
    """The page's id (:func:`rank_id`) of the rank with this key."""
    return f"{key[1]}/{key[2]}"


def finite(value: Any) -> float | None:
    """``value`` as a float, or None if it is missing, not a number, NaN or infinite."""
    if value.__class__ is float:  # the common case, first
        return value if value - value == 0.0 else None  # NaN and ±Inf give NaN
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


@dataclass(slots=True)
class JobTrack:
    """The dashboard's memory of one job.

    Attributes:
        series: chart columns ``loss/<replica>``, ``acc/<replica>``, ``sps/<replica>``
            (mean loss, best test accuracy, summed samples/s of the group's live ranks)
            and job-wide ``sps`` and ``step``.
        sparks: rank key → the last :data:`SPARK_POINTS` ``(loss, step_time_s)`` pairs
            (:func:`spark_points` gives them by the page's rank id).
        productive_s: seconds during which the job's step advanced (for goodput).
        observed_s: seconds during which the job had a live rank.
        events: the newest :data:`EVENTS_KEPT` history events with their ``seq``.
        failures: rank failures and hangs among the events seen (all, not only those kept).
    """

    series: Series = field(default_factory=Series)
    sparks: dict[RankKey, collections.deque[tuple[float | None, float | None]]] = field(
        default_factory=dict
    )
    productive_s: float = 0.0
    observed_s: float = 0.0
    last_sample_ts: float | None = None
    last_step: int = -1
    events: collections.deque[tuple[int, HistoryEvent]] = field(
        default_factory=lambda: collections.deque(maxlen=EVENTS_KEPT)
    )
    event_seq: int = 0
    failures: int = 0
    _event_keys: set[tuple[Any, ...]] = field(default_factory=set)

    @property
    def goodput(self) -> float | None:
        """Fraction of the observed time in which the job made progress, or None before any."""
        return self.productive_s / self.observed_s if self.observed_s > 0 else None

    def add_event(self, ev: HistoryEvent) -> bool:
        """Keep ``ev`` under the next ``seq``; False if it was already kept.

        An event can arrive twice at start-up (read back from the stream and heard
        live); the duplicate is recognised by its kind, time, rank and message.
        """
        key = _event_key(ev)
        if key in self._event_keys:
            return False
        if len(self.events) == self.events.maxlen:
            self._event_keys.discard(_event_key(self.events[0][1]))
        self._event_keys.add(key)
        self.event_seq += 1
        self.events.append((self.event_seq, ev))
        self.failures += ev.kind in FAILURE_KINDS
        return True

    def merge_stored(self, stored: list[HistoryEvent]) -> None:
        """Put ``stored`` events (read back from the history stream, oldest first) before
        the ones heard live so far; every kept event gets a new ``seq``."""
        live = [ev for _, ev in self.events]
        self.events.clear()
        self._event_keys.clear()
        self.failures = 0
        for ev in [*stored, *live]:
            self.add_event(ev)

    def events_after(self, seq: int, *, limit: int | None = None) -> list[EventView]:
        """Kept events with a ``seq`` above ``seq`` (at most the newest ``limit``), as dicts."""
        out = [event_doc(s, ev) for s, ev in self.events if s > seq]
        return out[-limit:] if limit else out


def _event_key(ev: HistoryEvent) -> tuple[Any, ...]:
    return (ev.kind, ev.ts, ev.replica_id, ev.rank, ev.message)


def event_doc(seq: int, ev: HistoryEvent) -> EventView:
    """An event as the page and API see it: the history event's fields and its ``seq``."""
    return {
        "v": ev.v,
        "job_id": ev.job_id,
        "kind": ev.kind,
        "ts": ev.ts,
        "message": ev.message,
        "replica_id": ev.replica_id,
        "rank": ev.rank,
        "step": ev.step,
        "version": ev.version,
        "data": to_builtins(ev.data),
        "seq": seq,
    }


def sample(job: Job, track: JobTrack, now: float) -> None:
    """Record one sample of ``job``'s figures at ``now`` (Unix s) into ``track``.

    One pass over the ranks, O(1) each (≈2 µs: a sample of 10,000 ranks holds the Weaver's
    loop ~25 ms).
    """
    dt = 0.0 if track.last_sample_ts is None else max(0.0, now - track.last_sample_ts)
    track.last_sample_ts = now
    step = -1
    groups: dict[str, list[float]] = {}  # loss sum, losses, best acc, samples/s sum, rates
    sparks = track.sparks
    for r in job.ranks.values():
        if not r.live:
            continue
        step = max(step, r.entry.last_step)
        g = groups.get(r.entry.replica_id)
        if g is None:
            g = groups[r.entry.replica_id] = [0.0, 0, -math.inf, 0.0, 0]
        loss = finite(r.metrics.get("loss"))
        if loss is not None:
            g[0] += loss
            g[1] += 1
        acc = finite(r.metrics.get("test_acc"))
        if acc is not None and acc > g[2]:
            g[2] = acc
        sps = finite(r.samples_per_s)
        if sps is not None:
            g[3] += sps
            g[4] += 1
        trail = sparks.get(r.key)
        if trail is None:
            trail = sparks[r.key] = collections.deque(maxlen=SPARK_POINTS)
        trail.append((loss, finite(r.step_time_s)))
    if groups:
        track.observed_s += dt
        if step > track.last_step >= 0:
            track.productive_s += dt
    if step >= 0:
        track.last_step = max(track.last_step, step)
    values: dict[str, float | None] = {}
    for gid, (loss_sum, losses, acc, sps_sum, rates) in groups.items():
        values[f"loss/{gid}"] = _round(loss_sum / losses) if losses else None
        values[f"acc/{gid}"] = _round(acc) if acc > -math.inf else None
        values[f"sps/{gid}"] = _round(sps_sum) if rates else None
    if groups:
        values["sps"] = _round(sum(g[3] for g in groups.values()))
        values["step"] = float(step)
        track.series.add(now, values)
    for gone in sparks.keys() - job.ranks.keys():
        del sparks[gone]


def spark_points(track: JobTrack) -> dict[str, list[tuple[float | None, float | None]]]:
    """Each rank's sparkline trail ``[(loss, step_time_s), …]`` by the page's rank id (as
    logged: rounding 800,000 numbers for a page that opens on 10,000 ranks would hold the
    loop longer than sending them whole)."""
    return {key_id(key): list(trail) for key, trail in track.sparks.items()}


def _round(value: float | None, digits: int = 5) -> float | None:
    """``value`` to ``digits`` significant digits (smaller pushes, same charts)."""
    if value is None or value == 0:
        return value
    return round(value, max(0, digits - 1 - math.floor(math.log10(abs(value)))))
