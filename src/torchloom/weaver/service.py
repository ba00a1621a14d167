"""The Weaver service: NATS subscriptions → state → control → KV, stream and replies.

All decisions live in :mod:`~torchloom.weaver.state` and
:mod:`~torchloom.weaver.control`; this module only does the I/O, on one asyncio
loop. A message that does not decode is counted, logged once per kind and
dropped; no handler error takes the service down. History events and DR-map
writes that fail while NATS is away are kept (bounded) and retried, so an
outage loses none of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec

from torchloom.errors import (
    ConflictError,
    DecodeError,
    InvalidRequestError,
    LeadershipLostError,
    NotReachableError,
    RateLimitedError,
)
from torchloom.protocol import (
    LIMITED_OPS,
    ControlReply,
    ControlRequest,
    DesiredConfig,
    HistoryEvent,
    RankEvent,
    RegistryEntry,
    Telemetry,
    decode,
    encode,
    names,
    to_builtins,
)
from torchloom.transport import (
    Connection,
    Credentials,
    History,
    KeyValue,
    Message,
    connect,
    ensure_jetstream,
    ensure_lease_bucket,
)
from torchloom.weaver import control
from torchloom.weaver.configstore import ConfigStore
from torchloom.weaver.control import JOURNAL_KINDS, ControlSettings
from torchloom.weaver.ingest import IngestStats
from torchloom.weaver.lease import Lease, LeaseSettings
from torchloom.weaver.planning import review
from torchloom.weaver.policies import Decision, PolicyEngine
from torchloom.weaver.ratelimit import RateLimiter
from torchloom.weaver.state import (
    LIVE_STATES,
    LivenessConfig,
    Rank,
    WeaverState,
    check_liveness,
    duplicate_claim,
    expire_dead,
    grant_grace,
    on_rank_event,
    on_telemetry,
)

log = logging.getLogger("torchloom.weaver")

EventSink = Callable[[HistoryEvent], None]

_HISTORY_BATCH = 256
"""History events sent to the stream before waiting for their acknowledgements."""
_POLICY_SHARE_INV = 10
"""A policy round that took t seconds is followed by at least 10·t seconds without one, so
policies never take more than a tenth of the Weaver's loop (at 10,000 ranks a round takes
~50 ms: rounds every 0.5 s still; beyond, they space out instead of starving the intake)."""
_EXPIRY_EVERY_S = 5.0
"""How often gone ranks past their retention are forgotten (an O(ranks) pass)."""
_KV_BATCH = 256
"""Registry writes sent before waiting for their acknowledgements."""

ENV_CRASH_AT = "TORCHLOOM_WEAVER_CRASH_AT"
"""Fault injection for crash tests: ``before_config_write:<op>`` or
``after_config_write:<op>`` makes the Weaver ``SIGKILL`` its own process at that point of
the first ``<op>`` request (``set``, ``drain``, …): before its KV write, or after the write
was acknowledged but before its history entry and the reply."""

_DECIDE_NOW = frozenset(
    {"rank_failed", "rank_hung", "rank_exited", "replica_drained", "rank_joined"}
)
"""History events after which the policies decide at the next tick, not at their interval."""


class Weaver:
    """The central controller. ``await Weaver(...).run()`` serves until cancelled.

    Args:
        nats_url: the NATS server or cluster (``nats://host:port[,…]``).
        liveness: failure, suspect and hang thresholds.
        control_settings: how far ahead changes are scheduled.
        tick_interval_s: period of liveness checks and retries, in seconds.
        clock: wall-clock source in seconds (``time.time``); tests may pass their own.
        on_event: called with every history event as it is recorded (e.g. to print it);
            more listeners can be added with :meth:`add_listener`.
        max_outbox: history events kept while NATS is unreachable; beyond it the
            oldest are dropped and counted (``history_outbox_full``).
        policies: the policy engine (default: the built-in policies with their defaults).
        restore_policies: take the policy settings stored in the config bucket (changed
            live by an earlier run) over ``policies``' own.
        policy_interval_s: how often the policies decide, in seconds (and at the next tick
            after a rank joins, fails, hangs, exits or is drained).
        lease: the leader lease's timing (see :mod:`~torchloom.weaver.lease`): a Weaver
            serves only while it holds the lease, and stands by until then. None serves
            at once, without a lease (a single Weaver that nobody may replace).
        creds: the ``weaver`` role's credentials on a secure NATS (``torchloom up --secure``);
            None: anonymous.

    :meth:`run` raises :class:`~torchloom.errors.LeadershipLostError` when another
    Weaver took the lease or wrote a job's config over this one's.
    """

    def __init__(
        self,
        *,
        nats_url: str,
        liveness: LivenessConfig | None = None,
        control_settings: ControlSettings | None = None,
        tick_interval_s: float = 0.05,
        clock: Callable[[], float] = time.time,
        on_event: EventSink | None = None,
        max_outbox: int = 100_000,
        policies: PolicyEngine | None = None,
        policy_interval_s: float = 0.5,
        restore_policies: bool = True,
        lease: LeaseSettings | None = LeaseSettings(),
        creds: Credentials | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.creds = creds
        self.lease_settings = lease
        self.lease: Lease | None = None
        self._leading = False
        self._lost: LeadershipLostError | None = None
        self._crash_at = os.environ.get(ENV_CRASH_AT, "")
        self.rate_limiter = RateLimiter(rate_per_s=20.0, burst=50)
        """Changes per requester at the control entry point (20/s sustained, 50 at once)."""
        self.join_limiter = RateLimiter(rate_per_s=50.0, burst=256)
        """Joins per NATS connection (keyed by its reply inbox, which a request body cannot
        fake): a Threadlet joins once per (re)connect; a simulator many ranks at once."""
        self.state = WeaverState(liveness=liveness or LivenessConfig())
        self.settings = control_settings or ControlSettings()
        self.tick_interval_s = tick_interval_s
        self.clock = clock
        self._listeners: list[EventSink] = [on_event] if on_event is not None else []
        self._conn: Connection | None = None
        self._config_kv: KeyValue | None = None
        self._configs: ConfigStore | None = None
        self._registry_kv: KeyValue | None = None
        self._history: History | None = None
        self._outbox: collections.deque[tuple[str, HistoryEvent]] = collections.deque(
            maxlen=max_outbox
        )
        self._instance = secrets.token_hex(6)
        self._recorded = 0
        self._control_lock = asyncio.Lock()
        self._io_lock = asyncio.Lock()
        self._last_tick_mono = 0.0
        self._next_expiry_mono = 0.0
        self._tick_late_s = 0.0
        self._listening = True
        self._closing = False
        self.stall_grace_s = 0.25
        self._logged_kinds: set[str] = set()
        self.policies = policies if policies is not None else PolicyEngine()
        self.policy_interval_s = policy_interval_s
        self.restore_policies = restore_policies
        self._next_policy_mono = 0.0
        self._policy_rest_until = 0.0
        self.policy_round_s = 0.0
        """How long the last policy round took to decide, in seconds."""
        self._deciding: asyncio.Future[None] | None = None
        self._flushing: asyncio.Future[None] | None = None
        self.ready = asyncio.Event()
        self.ingest = {"telemetry": IngestStats(), "rank_event": IngestStats()}
        """Intake counters and lag per message kind (see :mod:`~torchloom.weaver.ingest`)."""

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, rebuild state from JetStream, subscribe, and tick until cancelled."""
        self._conn = await connect(
            self.nats_url,
            name="torchloom-weaver",
            retry_forever=True,
            creds=self.creds,
            on_disconnect=self._on_disconnect,
            on_reconnect=self._on_reconnect,
        )
        holder: asyncio.Future[None] | None = None
        try:
            await ensure_jetstream(self._conn)
            if self.lease_settings is not None:
                await ensure_lease_bucket(self._conn, ttl_s=self.lease_settings.ttl_s)
                self.lease = Lease(
                    await KeyValue.open(self._conn, names.LEADER_BUCKET),
                    instance=self._instance,
                    settings=self.lease_settings,
                )
                await self.lease.acquire()
                holder = asyncio.ensure_future(self.lease.hold())
                holder.add_done_callback(self._on_lease_done)
            self._leading = True
            self._config_kv = await KeyValue.open(self._conn, names.CONFIG_BUCKET)
            self._configs = ConfigStore(self._config_kv)
            self._registry_kv = await KeyValue.open(self._conn, names.REGISTRY_BUCKET)
            self._history = History(self._conn)
            await self._load()
            await self._conn.subscribe_inline(names.ALL_TELEMETRY, self._on_telemetry)
            await self._conn.subscribe_inline(names.ALL_EVENTS, self._on_rank_event)
            await self._conn.subscribe(
                names.ALL_CONTROL, self._on_control, queue="torchloom-weaver"
            )
            await self._conn.subscribe(names.ALL_JOIN, self._on_control, queue="torchloom-weaver")
            await self._conn.subscribe(names.ALL_CONFIG_WATCH, self._on_config_write)
            await self._conn.flush()
            self.ready.set()
            log.info("weaver ready on %s", self._conn.connected_url)
            persister = asyncio.ensure_future(self._persist_forever())
            collector = asyncio.ensure_future(_freeze_long_lived())
            try:
                while self._lost is None:
                    await asyncio.sleep(self.tick_interval_s)
                    self.tick()
                    self._maybe_decide()
                log.error("weaver %s stops serving: %s", self._instance, self._lost)
                raise self._lost
            finally:
                persister.cancel()
                collector.cancel()
        finally:
            if holder is not None:
                holder.cancel()
            if self._lost is None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._flush_all())
                if self.lease is not None and self.role == "leader":
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.lease.release())
            self._closing = True
            await self._conn.close()

    @property
    def role(self) -> str:
        """``starting``, ``standby`` (another Weaver holds the lease: this one waits for it)
        or ``leader``."""
        if self._leading:
            return "leader"
        holder = self.lease.holder if self.lease is not None else None
        if holder is not None and holder.instance != self.lease.me.instance:  # type: ignore[union-attr]
            return "standby"
        return "starting"

    def _on_lease_done(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and isinstance(fut.exception(), LeadershipLostError):
            self._lost = fut.exception()  # type: ignore[assignment]

    async def _flush_all(self) -> None:
        async with self._io_lock:  # one writer at a time keeps the history in order, once each
            await self._drain_outbox()
            await self._persist_registry()

    async def _load(self) -> None:
        """Rebuild jobs, desired configs and the DR map from the KV buckets."""
        assert self._config_kv is not None and self._registry_kv is not None
        now = self.clock()
        for key, (raw, revision) in (await self._config_kv.entries()).items():
            if key == names.POLICIES_KEY:
                if self.restore_policies:
                    self._restore_policies(raw)
                continue
            try:
                doc = decode(raw, DesiredConfig, kind="stored config")
            except DecodeError as exc:
                log.warning("ignoring stored config %s: %s", key, exc)
                continue
            self.state.job(doc.job_id).config = doc
            assert self._configs is not None
            self._configs.loaded(doc.job_id, raw, revision)
            await self._replay_journal(doc)
        for key, raw in (await self._registry_kv.items()).items():
            try:
                entry = decode(raw, RegistryEntry, kind="stored registry entry")
            except DecodeError as exc:
                log.warning("ignoring registry entry %s: %s", key, exc)
                continue
            if entry.state in LIVE_STATES:
                entry.last_seen_ts = now  # a grace period: live ranks heartbeat again within it
            rank = Rank(entry, step_changed_ts=now)
            self.state.job(entry.job_id).ranks[rank.key] = rank
        n_ranks = sum(len(j.ranks) for j in self.state.jobs.values())
        self._record(
            [
                HistoryEvent(
                    job_id=job_id,
                    kind="weaver_started",
                    ts=now,
                    message=f"weaver started; restored {len(job.ranks)} rank(s) of {job_id}",
                )
                for job_id, job in self.state.jobs.items()
            ]
        )
        log.info("restored %d job(s), %d rank(s) from JetStream", len(self.state.jobs), n_ranks)

    async def _replay_journal(self, doc: DesiredConfig) -> None:
        """Append the journal's entries the history lacks: those of versions written to the
        KV by a Weaver that died before it appended them (see :class:`DesiredConfig`)."""
        assert self._history is not None
        stored = 0
        for kind in {ev.kind for ev in doc.journal}:
            raw = await self._history.last(names.history_subject(doc.job_id, kind))
            if raw:
                with contextlib.suppress(DecodeError):
                    stored = max(stored, decode(raw, HistoryEvent).version or 0)
        missing = [ev for ev in doc.journal if (ev.version or 0) > stored]
        if missing:
            log.warning(
                "job %s: %d history entr(y/ies) of stored versions were missing; appended",
                doc.job_id,
                len(missing),
            )
            self._record(missing)

    def tick(self) -> None:
        """One round of liveness checks.

        Silence is only held against a rank while this Weaver can hear it: while
        it is disconnected from NATS there are no checks, and after a reconnect
        or a stall of its own loop (longer than ``stall_grace_s``) every live rank
        gets a fresh grace period.
        """
        mono = time.monotonic()
        late_s = mono - self._last_tick_mono - self.tick_interval_s if self._last_tick_mono else 0.0
        self._last_tick_mono = mono
        self._tick_late_s = max(0.0, late_s)
        if not self._listening:
            return
        if late_s > self.stall_grace_s:
            log.warning("weaver loop stalled for %.2f s; liveness grace granted", late_s)
            grant_grace(self.state, self.clock())
            return
        self._record(check_liveness(self.state, self.clock()))
        if mono >= self._next_expiry_mono:
            self._next_expiry_mono = mono + _EXPIRY_EVERY_S
            self._record(expire_dead(self.state, self.clock()))

    # ---- policies --------------------------------------------------------------------

    def _maybe_decide(self) -> None:
        mono = time.monotonic()
        busy = self._deciding is not None and not self._deciding.done()
        if (
            busy
            or mono < max(self._next_policy_mono, self._policy_rest_until)
            or not self._listening
        ):
            return
        self._next_policy_mono = mono + self.policy_interval_s
        self._deciding = asyncio.ensure_future(self._decide())

    async def _decide(self) -> None:
        """One round of the policies; each decision goes through :meth:`submit` like a person's.

        Before them, each job's position is reviewed (:func:`~torchloom.weaver.planning.review`):
        outliers are flagged, and a newest version out of every member's reach is re-planned."""
        now = self.clock()
        t0 = time.monotonic()
        for job in list(self.state.jobs.values()):
            events, pos = review(job, now, reach=self.settings.reach)
            self._record(events)
            replan = control.replan_request(job, pos)
            if replan is not None:
                replanned = await self.submit(replan)
                if not replanned.ok and replanned.error is not None:
                    log.warning("re-planning job %s: %s", job.job_id, replanned.error.message)
        scores = self.policies.scores(now, self.state)
        for job in self.state.jobs.values():
            for key, rank in job.ranks.items():
                rank.straggler, rank.risk = scores.get(key, (None, None))
        decisions = self.policies.decide(now, self.state)
        spent_s = time.monotonic() - t0
        self.policy_round_s = spent_s
        # policies take at most 1/_POLICY_SHARE_INV of the loop, however many ranks
        self._policy_rest_until = t0 + spent_s * _POLICY_SHARE_INV
        for decision, dry_run in decisions:
            self.state.note_acted(decision.key, now)
            req = decision.request()
            reply = None
            if req is not None and not dry_run:
                reply = await self.submit(req)
            self._record([_decision_event(decision, now, dry_run=dry_run, reply=reply)])

    def _restore_policies(self, raw: bytes) -> None:
        try:
            settings = msgspec.json.decode(raw)
            for name, table in settings.items():
                if name in self.policies.slots:
                    self.policies.update(name, dict(table))
        except (msgspec.DecodeError, InvalidRequestError, AttributeError) as exc:
            log.warning("ignoring the stored policy settings: %s", exc)

    async def _policy_op(self, req: ControlRequest) -> ControlReply:
        """``policies`` (list) and ``policy`` (change one; persisted before the reply)."""
        if req.op == "policies":
            return ControlReply(ok=True, data=self.policies.describe_all())
        values = dict(req.values)
        name = str(values.pop("policy", ""))
        before = self.policies.settings()
        try:
            changes = dict(values.pop("params", None) or {})
            described = self.policies.update(name, {**values, **changes})
        except InvalidRequestError as exc:
            return ControlReply.refusal(exc)
        except (TypeError, ValueError) as exc:
            return ControlReply.refusal(InvalidRequestError(str(exc)))
        assert self._config_kv is not None
        try:
            await self._config_kv.put(
                names.POLICIES_KEY, msgspec.json.encode(self.policies.settings())
            )
        except NotReachableError as exc:
            for n, table in before.items():
                self.policies.update(n, table)
            return ControlReply.refusal(exc, prefix="not changed: ")
        who = f" by {req.requested_by}" if req.requested_by else ""
        self._record(
            [
                HistoryEvent(
                    job_id=req.job_id,
                    kind="policy_settings",
                    ts=self.clock(),
                    message=f"policy {name}: {_fmt_changes(req.values)}{who}",
                    data={"policy": name, "changes": to_builtins(req.values), "now": described},
                )
            ]
        )
        return ControlReply(ok=True, data=described)

    async def _persist_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval_s)
            await self._flush_all()

    async def _on_disconnect(self) -> None:
        self._listening = False
        if not self._closing:
            log.warning("weaver lost NATS; liveness checks paused until it is back")

    async def _on_reconnect(self) -> None:
        grant_grace(self.state, self.clock())
        self._listening = True
        log.warning("weaver reconnected to NATS")

    def add_listener(self, listener: EventSink) -> None:
        """Call ``listener`` with every history event as it is recorded (on the Weaver's loop)."""
        self._listeners.append(listener)

    def health(self) -> dict[str, Any]:
        """The Weaver's own health: NATS link, loop lateness (ms), unsaved history, drops."""
        conn = self._conn
        return {
            "ready": self.ready.is_set(),
            "role": self.role,
            "nats_connected": bool(conn is not None and conn.is_connected and self._listening),
            "nats_url": conn.connected_url if conn is not None else None,
            "loop_late_ms": round(self._tick_late_s * 1000.0, 1),
            "policy_round_ms": round(self.policy_round_s * 1000.0, 1),
            "unsaved_events": len(self._outbox),
            "dropped_messages": dict(self.state.dropped_messages),
        }

    async def ping_nats_ms(self, *, timeout_s: float = 2.0) -> float | None:
        """Round trip to the NATS server in ms, or None when it does not answer in time."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            return None
        t0 = time.perf_counter()
        try:
            await conn.flush(timeout_s=timeout_s)
        except NotReachableError:
            return None
        return round((time.perf_counter() - t0) * 1000.0, 2)

    async def stored_events(self, job_id: str | None = None) -> list[HistoryEvent]:
        """Every event of ``job_id`` (all jobs if None) in the history stream, oldest first.

        Raises:
            NotReachableError: NATS or the stream did not answer.
        """
        if self._history is None:
            return []
        out = []
        async for raw in self._history.read(names.history_filter(job_id)):
            try:
                out.append(decode(raw, HistoryEvent, kind="history event"))
            except DecodeError:
                continue
        return out

    # ---- handlers --------------------------------------------------------------------

    def _drop(self, kind: str, exc: Exception) -> None:
        n = self.state.count_dropped(kind)
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            log.warning("dropped a %s message (%s); further ones are only counted", kind, exc)
        elif n % 1000 == 0:
            log.warning("dropped %d %s messages so far", n, kind)

    def _on_telemetry(self, msg: Message) -> None:
        try:
            tel = decode(msg.data, Telemetry, kind="telemetry")
            _check_subject(msg.subject, tel.job_id, tel.replica_id, tel.rank)
        except DecodeError as exc:
            self._drop("telemetry", exc)
            return
        self._record(on_telemetry(self.state, tel, self.clock()))
        self.ingest["telemetry"].observe(nbytes=len(msg.data), lag_s=self.clock() - tel.ts)

    def _on_rank_event(self, msg: Message) -> None:
        try:
            ev = decode(msg.data, RankEvent, kind="rank event")
            _check_subject(msg.subject, ev.job_id, ev.replica_id, ev.rank)
        except DecodeError as exc:
            self._drop("rank_event", exc)
            return
        self._record(on_rank_event(self.state, ev, self.clock()))
        self.ingest["rank_event"].observe(nbytes=len(msg.data), lag_s=self.clock() - ev.ts)

    async def _on_control(self, msg: Message) -> None:
        try:
            req = decode(msg.data, ControlRequest, kind="control request")
            if names.job_of_subject(msg.subject) != req.job_id:
                raise DecodeError("control request", f"job {req.job_id!r} sent on {msg.subject}")
            if msg.subject.endswith(".join") and req.op != "join":
                raise DecodeError("control request", f"only a join is taken on {msg.subject}")
        except DecodeError as exc:
            self._drop("control", exc)
            await self._reply(msg, ControlReply.refusal(exc))
            return
        if req.op == "join" and not self.join_limiter.allow(
            _connection_of(msg.reply), time.monotonic()
        ):
            err = RateLimitedError(
                f"over {self.join_limiter.burst} joins at once from one connection; slow down"
            )
            await self._reply(msg, ControlReply.refusal(err))
            return
        reply = await (
            self._policy_op(req) if req.op in ("policies", "policy") else self.submit(req)
        )
        await self._reply(msg, reply)

    async def submit(self, req: ControlRequest) -> ControlReply:
        """The control entry point: validate, persist the new desired config, record, answer.

        The reply goes out once the config's KV write is acknowledged; its history entries
        are in that same document's journal, so they are appended right after, off the
        reply's path, without being lost if this Weaver dies first.
        """
        async with self._control_lock:
            if self._lost is not None:
                return ControlReply.refusal(self._lost)
            if req.op in LIMITED_OPS and not self.rate_limiter.allow(
                req.requested_by or "?", time.monotonic()
            ):
                err = RateLimitedError(
                    f"{req.requested_by or 'this requester'} sent over "
                    f"{self.rate_limiter.rate_per_s:g} changes/s; slow down"
                )
                return ControlReply.refusal(err)
            reply = await self._submit_locked(req)
        self._flush_soon()
        return reply

    async def _submit_locked(self, req: ControlRequest) -> ControlReply:
        for attempt in range(2):  # a second time after a foreign write was undone
            now = self.clock()
            outcome = control.handle(self.state, req, now, self.settings)
            if outcome.duplicate is not None:
                key, host, pid = outcome.duplicate
                rank = self.state.jobs[key[0]].ranks[key]
                self._record(duplicate_claim(self.state, rank, host=host, pid=pid, now=now))
            if not outcome.reply.ok:
                if req.op != "join":
                    log.info(
                        "refused %s on %s: %s",
                        req.op,
                        req.job_id,
                        outcome.reply.error.message if outcome.reply.error else "",
                    )
                return outcome.reply
            if outcome.new_config is not None:
                outcome.new_config = control.journaled(outcome.new_config, outcome.events)
                self._maybe_crash("before_config_write", req.op)
                failed = await self._write_config(outcome.new_config)
                if failed is _RETRY and attempt == 0:
                    continue
                if failed is not None:
                    return failed if failed is not _RETRY else _conflict_reply(req.job_id)
                self._maybe_crash("after_config_write", req.op)
            self._record(control.commit(self.state, req, outcome, now))
            return outcome.reply
        raise AssertionError("unreachable")

    def _flush_soon(self) -> None:
        """Append the history and the registry now, without waiting for it."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_all())

    async def _write_config(self, doc: DesiredConfig) -> ControlReply | None:
        """Write ``doc`` (compare-and-set); None when done, ``_RETRY`` when someone else had
        written the job's config and this Weaver, still the leader, undid it
        (:meth:`_restore_config`), else the error reply (NATS away; the lease lost: this
        Weaver steps down)."""
        assert self._configs is not None
        try:
            await self._configs.write(doc)
            return None
        except NotReachableError as exc:
            return ControlReply.refusal(exc, prefix="not applied: ")
        except ConflictError as exc:
            if await self._restore_config(doc.job_id):
                return _RETRY
            return ControlReply.refusal(
                exc, prefix="not applied: ", suffix="; this weaver steps down"
            )

    async def _on_config_write(self, msg: Message) -> None:
        """A write on a job's config key: if it is not this Weaver's own, look closer."""
        job_id = msg.subject.rsplit(".", 1)[-1]
        job = self.state.jobs.get(job_id)
        if job is None or job.config is None or self._configs is None:
            return
        if self._configs.is_own(job_id, msg.data):
            return
        async with self._control_lock:
            try:
                raw, revision = await self._configs.current(job_id)
            except NotReachableError:
                return
            if self._configs.foreign(revision, job_id):
                await self._restore_config(job_id, found=(raw, revision))

    async def _restore_config(
        self, job_id: str, *, found: tuple[bytes | None, int] | None = None
    ) -> bool:
        """Undo a write of ``job_id``'s config by someone else; called under the control lock.

        If this Weaver no longer holds the leader lease it steps down (returns False).
        Otherwise the document goes back from its state (:func:`control.restore`: one job
        only, every other job untouched) with a ``config_restored`` event; True.
        """
        assert self._configs is not None
        try:
            if self.lease is not None and not await self.lease.still_held():
                self._lost = LeadershipLostError(
                    f"another weaver holds the lease and wrote job {job_id}'s config"
                )
                return False
            raw, revision = found if found is not None else await self._configs.current(job_id)
            for _ in range(3):
                now = self.clock()
                job = self.state.jobs[job_id]
                outcome = control.restore(job, raw, now, self.settings)
                assert outcome.new_config is not None
                doc = control.journaled(outcome.new_config, outcome.events)
                try:
                    await self._configs.write(doc, revision=revision)
                except ConflictError:  # written again meanwhile: look once more
                    raw, revision = await self._configs.current(job_id)
                    continue
                outcome.new_config = doc
                self._record(control.commit_config(self.state, job_id, outcome, now))
                log.warning("%s", outcome.events[0].message)
                return True
            log.error("job %s: its config key keeps being written by someone else", job_id)
        except NotReachableError as exc:
            log.warning("job %s: could not restore its config: %s", job_id, exc.message)
        return True

    def _maybe_crash(self, point: str, op: str) -> None:
        if self._crash_at == f"{point}:{op}":
            log.error("fault injection (%s): killing this weaver at %s", ENV_CRASH_AT, point)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _reply(self, msg: Message, reply: ControlReply) -> None:
        if msg.reply and self._conn is not None:
            with contextlib.suppress(NotReachableError):
                await self._conn.publish(msg.reply, encode(reply))

    # ---- persistence -----------------------------------------------------------------

    def _record(self, events: list[HistoryEvent]) -> None:
        for ev in events:
            if ev.kind in _DECIDE_NOW:
                self._next_policy_mono = 0.0  # the policies look at it on the next tick
            if len(self._outbox) == self._outbox.maxlen:
                self.state.count_dropped("history_outbox_full")
            self._recorded += 1
            # a config version's entries have one id whoever appends them (a Weaver that
            # replays its journal after a takeover): the stream stores them once
            mid = (
                f"{ev.job_id}.v{ev.version}.{ev.kind}"
                if ev.kind in JOURNAL_KINDS
                else f"{self._instance}-{self._recorded}"
            )
            self._outbox.append((mid, ev))
            log.info("[%s] %s", ev.job_id, ev.message)
            for listener in self._listeners:
                try:
                    listener(ev)
                except Exception:  # a listener's bug must not stop the Weaver
                    log.exception("history listener failed on %s", ev.kind)

    async def _drain_outbox(self) -> None:
        if self._history is None:
            return
        while self._outbox:
            batch = list(itertools.islice(self._outbox, _HISTORY_BATCH))
            done = await self._history.append_many(
                [(names.history_subject(ev.job_id, ev.kind), encode(ev), mid) for mid, ev in batch]
            )
            for _ in range(done):
                self._outbox.popleft()
            if done < len(batch):
                return  # kept; retried on the next tick

    async def _persist_registry(self) -> None:
        """Write the DR map's changed and removed ranks to the registry bucket, in batches.

        A rank is taken out of ``dirty``/``removed`` before its write and put back if the
        write fails, so a change made while a write is in flight is written next time."""
        kv = self._registry_kv
        if kv is None:
            return
        state = self.state
        while state.removed or state.dirty:
            removed = list(itertools.islice(state.removed, _KV_BATCH))
            dirty = list(itertools.islice(state.dirty, _KV_BATCH - len(removed)))
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
                return  # the rest is tried again on the next tick


async def _freeze_long_lived(*, every_s: float = 10.0, thaw_every_s: float = 600.0) -> None:
    """Keep Python's full garbage collections short while the Weaver holds many ranks.

    A full collection visits every item of every container: with 10,000 ranks' windows that
    is millions of items and a ~200 ms pause of the loop, several times a minute under
    10,000 messages/s. Every ``every_s`` seconds what has lived that long is frozen
    (``gc.freeze``: the collector skips it; reference counting still frees it); every
    ``thaw_every_s`` seconds it is unfrozen once, so that reference cycles among old objects
    are still found — one full pause per ``thaw_every_s``.
    """
    thawed = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        if time.monotonic() - thawed >= thaw_every_s:
            gc.unfreeze()
            thawed = time.monotonic()
        else:
            gc.freeze()


_RETRY = ControlReply(ok=False)
"""What :meth:`Weaver._write_config` returns when the change is to be made again."""


def _conflict_reply(job_id: str) -> ControlReply:
    conflict = ConflictError(names.CONFIG_BUCKET, names.config_key(job_id), 0)
    conflict.message = f"job {job_id}'s config keeps being written by someone else"
    return ControlReply.refusal(conflict, prefix="not applied: ", suffix="; send it again")


def _decision_event(
    d: Decision, now: float, *, dry_run: bool, reply: ControlReply | None
) -> HistoryEvent:
    """The history entry of a policy decision: its reason, the features it saw, what came of it.

    These entries are the trajectory dataset (``torchloom policy export``)."""
    if dry_run:
        outcome: dict[str, Any] = {"done": False, "why": "dry run"}
        prefix = "[dry run] "
    elif reply is None:
        outcome, prefix = {"done": True}, ""
    elif reply.ok:
        outcome = {"done": True, "version": reply.version, "effective_step": reply.effective_step}
        prefix = ""
    else:
        err = reply.error
        outcome = {"done": False, "error": err.message if err else "refused"}
        prefix = "[refused] "
    return HistoryEvent(
        job_id=d.job_id,
        kind=f"policy_{d.policy}",
        ts=now,
        message=f"{prefix}policy {d.policy}: {d.reason}",
        replica_id=d.replica_id,
        version=reply.version if reply is not None and reply.ok else None,
        data={
            "policy": d.policy,
            "action": d.action,
            "dry_run": dry_run,
            "values": to_builtins(d.values),
            "replica_id": d.replica_id,
            "device": d.device,
            "replace": d.replace,
            "features": to_builtins(d.features),
            "outcome": outcome,
        },
    )


def _fmt_changes(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items()) if k != "policy") or "no change"


def _connection_of(reply: str) -> str:
    """Who sent a request, as NATS knows it: its reply inbox without the last token (nats-py
    and the other current clients share one inbox prefix per connection; a client that makes
    a new inbox for every request is not held back by a limit keyed on this)."""
    return reply.rsplit(".", 1)[0] if reply else "?"


def _check_subject(subject: str, job_id: str, replica_id: str, rank: int) -> None:
    parts = subject.split(".")
    if len(parts) != 5 or parts[1] != job_id or parts[3] != replica_id or parts[4] != str(rank):
        raise DecodeError("subject", f"{subject} does not match the message's job/replica/rank")
