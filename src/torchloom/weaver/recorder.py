"""What the Weaver keeps: its history events and its DR map, written to JetStream.

:class:`Recorder` takes every history event the Weaver records (in order, on its loop), tells
its listeners, and appends the events to the ``LOOM_EVENTS`` stream; it writes the DR map's
changed and removed ranks to the ``loom_registry`` bucket. Writes go out in batches without
waiting for each acknowledgement; what fails while NATS is away is kept (bounded) and tried
again in order on the next flush, so an outage loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable

from torchloom.errors import DecodeError, NotReachableError
from torchloom.protocol import HistoryEvent, decode, encode, names
from torchloom.transport import History, KeyValue
from torchloom.weaver.control import JOURNAL_KINDS
from torchloom.weaver.state import WeaverState

log = logging.getLogger("torchloom.weaver")

EventSink = Callable[[HistoryEvent], None]

HISTORY_BATCH = 256
"""History events sent to the stream before waiting for their acknowledgements."""
KV_BATCH = 256
"""Registry writes sent before waiting for their acknowledgements."""


class Recorder:
    """The history outbox and the DR map's persistence of one Weaver.

    Args:
        state: the Weaver's state (its ``dirty``/``removed`` ranks are what the registry needs).
        instance: the Weaver's id, part of its events' de-duplication ids.
        max_outbox: history events kept while NATS is unreachable; beyond it the oldest are
            dropped and counted (``history_outbox_full``).
    """

    def __init__(self, state: WeaverState, *, instance: str, max_outbox: int) -> None:
        self.state = state
        self.instance = instance
        self.listeners: list[EventSink] = []
        self.history: History | None = None
        """The events stream, once connected."""
        self.registry: KeyValue | None = None
        """The registry bucket, once connected."""
        self.checkpoints: KeyValue | None = None
        """The checkpoint registry bucket, once connected."""
        self._outbox: collections.deque[tuple[str, HistoryEvent]] = collections.deque(
            maxlen=max_outbox
        )
        self._recorded = 0
        self._io_lock = asyncio.Lock()
        self._flushing: asyncio.Future[None] | None = None
        self.may_write: Callable[[], bool] = lambda: True
        """Asked before every flush: a Weaver whose leader lease is unconfirmed writes
        nothing (it may have been replaced); its outbox waits."""

    @property
    def unsaved(self) -> int:
        """History events not yet acknowledged by the stream."""
        return len(self._outbox)

    def record(self, events: list[HistoryEvent]) -> None:
        """Queue ``events`` for the stream and tell every listener (a listener's bug is
        logged, never raised)."""
        for ev in events:
            if len(self._outbox) == self._outbox.maxlen:
                self.state.count_dropped("history_outbox_full")
            self._recorded += 1
            # a config version's entries have one id whoever appends them (a Weaver that
            # replays its journal after a takeover): the stream stores them once
            mid = (
                f"{ev.job_id}.v{ev.version}.{ev.kind}"
                if ev.kind in JOURNAL_KINDS
                else f"{self.instance}-{self._recorded}"
            )
            self._outbox.append((mid, ev))
            log.info("[%s] %s", ev.job_id, ev.message)
            for listener in self.listeners:
                try:
                    listener(ev)
                except Exception:  # a listener's bug must not stop the Weaver
                    log.exception("history listener failed on %s", ev.kind)

    async def flush(self) -> None:
        """Append the queued history and write the DR map's changes (one writer at a time:
        the history stays in order and every event is appended once)."""
        if not self.may_write():
            return  # kept in the outbox until this Weaver knows it still leads
        async with self._io_lock:
            await self._drain_outbox()
            await self._persist_registry()
            await self._persist_checkpoints()

    def flush_soon(self) -> None:
        """:meth:`flush` now, without waiting for it."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self.flush())

    async def flush_forever(self, *, every_s: float) -> None:
        """:meth:`flush` every ``every_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            await self.flush()

    async def stored(self, job_id: str | None = None) -> list[HistoryEvent]:
        """Every event of ``job_id`` (all jobs if None) in the history stream, oldest first.

        Raises:
            NotReachableError: NATS or the stream did not answer.
        """
        if self.history is None:
            return []
        out = []
        async for raw in self.history.read(names.history_filter(job_id)):
            try:
                out.append(decode(raw, HistoryEvent, kind="history event"))
            except DecodeError:
                continue
        return out

    async def _drain_outbox(self) -> None:
        if self.history is None:
            return
        while self._outbox:
            batch = list(itertools.islice(self._outbox, HISTORY_BATCH))
            try:
                done = await self.history.append_many(
                    [
                        (names.history_subject(ev.job_id, ev.kind), encode(ev), mid)
                        for mid, ev in batch
                    ]
                )
            except NotReachableError:
                return  # kept; retried on the next flush
            for _ in range(done):
                self._outbox.popleft()
            if done < len(batch):
                return  # kept; retried on the next flush

    async def _persist_checkpoints(self) -> None:
        """Write the changed checkpoint records; a failed write is tried on the next flush."""
        kv = self.checkpoints
        if kv is None:
            return
        for job in self.state.jobs.values():
            if not job.dirty_checkpoints:
                continue
            ids = list(job.dirty_checkpoints)
            job.dirty_checkpoints.difference_update(ids)
            changes: dict[str, bytes | None] = {
                names.checkpoint_key(job.job_id, i): encode(job.checkpoints[i])
                for i in ids
                if i in job.checkpoints
            }
            written = await kv.write_many(changes)
            job.dirty_checkpoints.update(
                i for i in ids if names.checkpoint_key(job.job_id, i) not in written
            )

    async def _persist_registry(self) -> None:
        """Write the DR map's changed and removed ranks to the registry bucket, in batches.

        A rank is taken out of ``dirty``/``removed`` before its write and put back if the
        write fails, so a change made while a write is in flight is written next time."""
        kv = self.registry
        if kv is None:
            return
        state = self.state
        while state.removed or state.dirty:
            removed = list(itertools.islice(state.removed, KV_BATCH))
            dirty = list(itertools.islice(state.dirty, KV_BATCH - len(removed)))
            state.removed.difference_update(removed)
            state.dirty.difference_update(dirty)
            changes: dict[str, bytes | None] = {names.registry_key(*k): None for k in removed}
            for key in dirty:
                rank = state.jobs[key[0]].ranks.get(key)
                if rank is not None:
                    changes[names.registry_key(*key)] = encode(rank.entry)
            written = await kv.write_many(changes)
            if len(written) < len(changes):
                for key in removed:
                    if (
                        names.registry_key(*key) not in written
                        and key not in state.jobs[key[0]].ranks
                    ):
                        state.removed.add(key)
                for key in dirty:
                    if names.registry_key(*key) not in written and key in state.jobs[key[0]].ranks:
                        state.dirty.add(key)
                return  # the rest is tried again on the next flush
