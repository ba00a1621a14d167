"""The dashboard's live feed: sample the Weaver's state, keep event tails, push frames.

Runs on the Weaver's own asyncio loop, so it reads :class:`~torchloom.weaver.state.WeaverState`
without locks and never races the handlers. Per job with at least one page open,
one *update* frame is built and encoded every ``push_interval_ms`` and shared by
every page of that job (the cost does not grow with the number of pages). A page
that has not taken its frames when ``max_pending_frames`` more are ready is sent
one fresh *snapshot* instead: the traffic and memory per page stay bounded
however slow the page is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from torchloom.errors import NotReachableError
from torchloom.protocol import HistoryEvent
from torchloom.weaver.web import frames
from torchloom.weaver.web.schema import Health
from torchloom.weaver.web.track import JobTrack, sample

if TYPE_CHECKING:
    from torchloom.weaver.service import Weaver

log = logging.getLogger("torchloom.web")

_encode = msgspec.json.Encoder().encode


@dataclass(eq=False, slots=True)
class Subscriber:
    """One open page following ``job_id`` (None: no job yet, only the job list)."""

    job_id: str | None
    max_pending_frames: int
    pending: collections.deque[bytes] = field(default_factory=collections.deque)
    needs_snapshot: bool = True
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent_bytes: int = 0

    def push(self, frame: bytes) -> None:
        if self.needs_snapshot:
            return  # the snapshot it will get holds this frame's news
        if len(self.pending) >= self.max_pending_frames:
            self.pending.clear()
            self.needs_snapshot = True
        else:
            self.pending.append(frame)
        self.wake.set()


@dataclass(slots=True)
class _Channel:
    cursor: frames.Cursor
    subscribers: set[Subscriber] = field(default_factory=set)


class Feed:
    """Tracks every job of ``weaver`` and feeds the pages that follow them.

    Args:
        weaver: the running Weaver (its state is read on its own loop).
        push_interval_ms: period of update frames per job, in milliseconds.
        sample_interval_s: period of chart samples, in seconds (kept whether or not
            a page is open, so that charts have a past when one opens).
        max_pending_frames: frames a page may fall behind before it gets a snapshot.
        clock: wall-clock source in Unix seconds.
    """

    def __init__(
        self,
        weaver: Weaver,
        *,
        push_interval_ms: float = 500.0,
        sample_interval_s: float = 0.5,
        max_pending_frames: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if push_interval_ms <= 0 or sample_interval_s <= 0:
            raise ValueError("push_interval_ms and sample_interval_s must be positive")
        self.weaver = weaver
        self.push_interval_ms = push_interval_ms
        self.sample_interval_s = sample_interval_s
        self.max_pending_frames = max_pending_frames
        self.clock = clock
        self.tracks: dict[str, JobTrack] = {}
        self._channels: dict[str | None, _Channel] = {}
        self._last_sample = float("-inf")
        self.sample_cost_s = 0.0
        """How long the last chart sample of every job took, in seconds."""
        self.nats_rtt_ms: float | None = None
        self.history_loaded = False
        weaver.add_listener(self.on_event)

    # ---- inputs ----------------------------------------------------------------------

    def track(self, job_id: str) -> JobTrack:
        track = self.tracks.get(job_id)
        if track is None:
            track = self.tracks[job_id] = JobTrack()
        return track

    def on_event(self, ev: HistoryEvent) -> None:
        """Keep a history event (the Weaver calls this as it records one)."""
        self.track(ev.job_id).add_event(ev)

    async def load_history(self) -> None:
        """Read the stored history back, so the page shows events from before this Weaver."""
        try:
            stored = await self.weaver.stored_events()
        except NotReachableError as exc:
            log.warning("dashboard history not loaded yet: %s", exc)
            return
        by_job: dict[str, list[HistoryEvent]] = {}
        for ev in stored:
            by_job.setdefault(ev.job_id, []).append(ev)
        for jid, events in by_job.items():
            self.track(jid).merge_stored(events)
        for followed, channel in self._channels.items():  # their events got new seqs
            if followed is not None:
                channel.cursor.event_seq = self.track(followed).event_seq
            for sub in channel.subscribers:
                sub.needs_snapshot = True
                sub.wake.set()
        self.history_loaded = True

    # ---- outputs ---------------------------------------------------------------------

    def health(self) -> Health:
        h = self.weaver.health()
        return {
            "ready": h["ready"],
            "nats_connected": h["nats_connected"],
            "nats_url": h["nats_url"],
            "nats_rtt_ms": self.nats_rtt_ms,
            "replication": h["replication"],
            "loop_late_ms": h["loop_late_ms"],
            "policy_round_ms": h["policy_round_ms"],
            "unsaved_events": h["unsaved_events"],
            "dropped_messages": h["dropped_messages"],
        }

    def default_job(self) -> str | None:
        ids = frames.job_ids(self.weaver.state)
        return ids[0] if ids else None

    def snapshot(self, job_id: str | None) -> dict[str, Any]:
        """A snapshot frame of ``job_id``, or a job list when it is None or unknown."""
        now = self.clock()
        jobs = frames.job_ids(self.weaver.state)
        job = self.weaver.state.jobs.get(job_id) if job_id else None
        if job is None:
            return {"type": "snapshot", "ts": now, "jobs": jobs, "header": None}
        return frames.snapshot(job, self.track(job.job_id), self.health(), now, jobs)

    def subscribe(self, job_id: str | None) -> Subscriber:
        sub = Subscriber(job_id=job_id, max_pending_frames=self.max_pending_frames)
        channel = self._channels.get(job_id)
        if channel is None:  # the page's own snapshot comes in frames_for; here only the cursor
            job = self.weaver.state.jobs.get(job_id) if job_id else None
            cursor = (
                frames.cursor_at(self.track(job.job_id), frames.rows(job, self.clock()))
                if job is not None
                else frames.Cursor()
            )
            channel = self._channels[job_id] = _Channel(cursor)
        channel.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        channel = self._channels.get(sub.job_id)
        if channel is not None:
            channel.subscribers.discard(sub)
            if not channel.subscribers:
                del self._channels[sub.job_id]

    async def frames_for(self, sub: Subscriber, *, keepalive_s: float = 15.0) -> list[bytes]:
        """The next frames for ``sub`` (a snapshot when it is new or fell behind), encoded
        as JSON; an empty list after ``keepalive_s`` without any."""
        if not sub.needs_snapshot and not sub.pending:
            sub.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.wake.wait(), keepalive_s)
        if sub.needs_snapshot:
            sub.needs_snapshot = False
            sub.pending.clear()
            out = [_encode(self.snapshot(sub.job_id))]
        else:
            out = list(sub.pending)
            sub.pending.clear()
        sub.sent_bytes += sum(len(b) for b in out)
        return out

    # ---- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Sample and push until cancelled; reads the stored history once NATS answers."""
        await self.weaver.ready.wait()
        helpers = [
            asyncio.ensure_future(self._ping_forever()),
            asyncio.ensure_future(self._load_history_until_done()),
        ]
        try:
            while True:
                try:
                    self.tick()
                except Exception:  # the dashboard must never take the Weaver down
                    log.exception("dashboard tick failed")
                await asyncio.sleep(self.push_interval_ms / 1000.0)
        finally:
            for task in helpers:
                task.cancel()

    def tick(self) -> None:
        """Sample every job if due, then push one frame per followed job."""
        now = self.clock()
        if now - self._last_sample >= max(self.sample_interval_s, 10 * self.sample_cost_s):
            self._last_sample = now
            t0 = time.monotonic()
            for each in self.weaver.state.jobs.values():
                sample(each, self.track(each.job_id), now)
            # at most a tenth of the loop: with 10,000 ranks samples space out a little
            self.sample_cost_s = time.monotonic() - t0
        jobs = frames.job_ids(self.weaver.state)
        health = self.health()
        for job_id, channel in self._channels.items():
            job = self.weaver.state.jobs.get(job_id) if job_id else None
            if job is None:
                frame: dict[str, Any] = {"type": "jobs", "ts": now, "jobs": jobs}
            else:
                frame = frames.update(
                    job, self.track(job.job_id), health, now, jobs, channel.cursor
                )
            data = _encode(frame)
            for sub in channel.subscribers:
                sub.push(data)

    async def _load_history_until_done(self, *, retry_s: float = 2.0) -> None:
        while not self.history_loaded:  # NATS may be away at start; live updates go on meanwhile
            await self.load_history()
            if not self.history_loaded:
                await asyncio.sleep(retry_s)

    async def _ping_forever(self, *, interval_s: float = 2.0) -> None:
        while True:
            self.nats_rtt_ms = await self.weaver.ping_nats_ms()
            await asyncio.sleep(interval_s)
