"""The Weaver service: NATS subscriptions → state → control → KV and replies.

All decisions live in :mod:`~torchloom.weaver.state`, :mod:`~torchloom.weaver.control` and
:mod:`~torchloom.weaver.planning`; what is kept is :mod:`~torchloom.weaver.recorder`'s job,
the policy rounds :mod:`~torchloom.weaver.deciding`'s. This module connects, subscribes, and
takes messages and requests in on one asyncio loop: changes go through one entry point
(:meth:`Weaver.submit`) under a lock, reads (``status``, ``knobs``) are answered without it.
A message that does not decode is counted, logged once per kind and dropped; no handler
error takes the service down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgspec

from torchloom.errors import (
    ConflictError,
    DecodeError,
    LeadershipLostError,
    NotReachableError,
    RateLimitedError,
)
from torchloom.protocol import (
    LIMITED_OPS,
    CheckpointRecord,
    ControlReply,
    ControlRequest,
    DesiredConfig,
    HistoryEvent,
    IngestBatch,
    RankEvent,
    RegistryEntry,
    Telemetry,
    decode,
    encode,
    names,
)
from torchloom.transport import (
    Connection,
    Credentials,
    Disconnect,
    History,
    KeyValue,
    Message,
    connect,
    ensure_jetstream,
    ensure_lease_bucket,
    follow_disconnects,
)
from torchloom.weaver import checkpoints, control
from torchloom.weaver.configstore import ConfigStore
from torchloom.weaver.control import ControlSettings, Outcome
from torchloom.weaver.deciding import PolicyLoop
from torchloom.weaver.faults import CrashPoints
from torchloom.weaver.gc_tuning import freeze_long_lived
from torchloom.weaver.ingest import IngestStats
from torchloom.weaver.ingest_worker import IngestWorkers
from torchloom.weaver.lease import Lease, LeaseSettings
from torchloom.weaver.policies import PolicyEngine
from torchloom.weaver.ratelimit import RateLimiter
from torchloom.weaver.recorder import EventSink, Recorder
from torchloom.weaver.state import (
    LIVE_STATES,
    LivenessConfig,
    Rank,
    Retention,
    WeaverState,
    check_liveness,
    duplicate_claim,
    expire_dead,
    grant_grace,
    liveness_of,
    on_connection_closed,
    on_rank_event,
    on_telemetry,
    touch,
    unheard_since_restore,
)

log = logging.getLogger("torchloom.weaver")

_FULL_LIVENESS_EVERY_S = 1.0
"""How often the liveness check looks at every rank; between, only at the silent ones."""
_EXPIRY_EVERY_S = 5.0
"""How often gone ranks past their retention are forgotten (an O(ranks) pass)."""

READ_OPS = frozenset({"status", "knobs", "checkpoints"})
"""Requests that only read the state: answered at once, without the control lock."""
JOIN_SUBJECT_OPS = frozenset({"join", "checkpoints"})
"""What a training process (a job's credentials) may ask on its job's join subject."""


class Weaver:
    """The central controller. ``await Weaver(...).run()`` serves until cancelled.

    Args:
        nats_url: the NATS server or cluster (``nats://host:port[,…]``).
        liveness: failure, suspect and hang thresholds.
        retention: how long and how many gone ranks the DR map keeps (default 1 h, 1,000).
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
        replicas: copies of the streams and buckets on a cluster (1–5); None: min(3, the
            cluster's servers). Existing ones with fewer copies are scaled up.
        system_creds: a user of the servers' system account (``torchloom up`` makes one for
            its embedded servers): the Weaver follows their disconnect advisories and marks a
            rank failed the moment its connection closes (a ``kill -9``, a crash), not only
            when its heartbeats stop. None: heartbeats only.
        ingest_workers: telemetry taken in by this many worker processes (a NATS queue
            group; :mod:`~torchloom.weaver.ingest_worker`) and folded here in batches; 0:
            taken in on this loop. Worth it beyond a few thousand ranks.

    :meth:`run` raises :class:`~torchloom.errors.LeadershipLostError` when another
    Weaver took the lease or wrote a job's config over this one's.
    """

    def __init__(
        self,
        *,
        nats_url: str,
        liveness: LivenessConfig | None = None,
        retention: Retention | None = None,
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
        replicas: int | None = None,
        system_creds: Credentials | None = None,
        ingest_workers: int = 0,
    ) -> None:
        self.nats_url = nats_url
        self.creds = creds
        self.replicas = replicas
        self.system_creds = system_creds
        self.ingest_workers = ingest_workers
        self._workers: IngestWorkers | None = None
        self._ingest_decoder = msgspec.json.Decoder(IngestBatch)
        self.replication: dict[str, str] = {}
        """What starting did to each stream (``created R3``, ``scaled R1 → R3``, …)."""
        self.lease_settings = lease
        self.lease: Lease | None = None
        self._leading = False
        self._lost: LeadershipLostError | None = None
        self._crash = CrashPoints()
        self.rate_limiter = RateLimiter(rate_per_s=20.0, burst=50)
        """Changes per requester at the control entry point (20/s sustained, 50 at once)."""
        self.join_limiter = RateLimiter(rate_per_s=50.0, burst=256)
        """Joins per NATS connection (keyed by its reply inbox, which a request body cannot
        fake): a Threadlet joins once per (re)connect; a simulator many ranks at once."""
        self.state = WeaverState(
            liveness=liveness or LivenessConfig(), retention=retention or Retention()
        )
        self.settings = control_settings or ControlSettings()
        self.tick_interval_s = tick_interval_s
        self.clock = clock
        self._conn: Connection | None = None
        self._sys_conn: Connection | None = None
        self._config_kv: KeyValue | None = None
        self._configs: ConfigStore | None = None
        self._registry_kv: KeyValue | None = None
        self._checkpoints_kv: KeyValue | None = None
        self._instance = secrets.token_hex(6)
        self.recorder = Recorder(self.state, instance=self._instance, max_outbox=max_outbox)
        """The history and the DR map as written to JetStream."""
        if on_event is not None:
            self.recorder.listeners.append(on_event)
        self._control_lock = asyncio.Lock()
        self._last_tick_mono = 0.0
        self._next_expiry_mono = 0.0
        self._next_full_check_mono = 0.0
        self._tick_late_s = 0.0
        self._listening = True
        self._lease_doubt = False
        self._closing = False
        self.stall_grace_s = 0.25
        self._logged_kinds: set[str] = set()
        self.policies = policies if policies is not None else PolicyEngine()
        self.restore_policies = restore_policies
        self.policy_loop = PolicyLoop(
            self.state,
            self.policies,
            settings=self.settings,
            submit=self.submit,
            record=self._record,
            clock=clock,
            interval_s=policy_interval_s,
        )
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
            self.replication = await ensure_jetstream(self._conn, replicas=self.replicas)
            if self.lease_settings is not None:
                self.replication["KV_" + names.LEADER_BUCKET] = await ensure_lease_bucket(
                    self._conn, ttl_s=self.lease_settings.ttl_s, replicas=self.replicas
                )
                self.lease = Lease(
                    # lease requests time out well within the lease's TTL
                    await KeyValue.open(
                        self._conn, names.LEADER_BUCKET, timeout_s=self.lease_settings.ttl_s / 3
                    ),
                    instance=self._instance,
                    settings=self.lease_settings,
                )
                await self.lease.acquire()
                holder = asyncio.ensure_future(self.lease.hold())
                holder.add_done_callback(self._on_lease_done)
                lease = self.lease
                self.recorder.may_write = lambda: lease.confirmed(time.monotonic())
            self._leading = True
            await self._open_state()
            if self.ingest_workers > 0:
                await self._conn.subscribe_inline(
                    names.ingest_subject(self._instance), self._on_ingest_batch
                )
                self._workers = IngestWorkers(
                    nats_url=self.nats_url,
                    instance=self._instance,
                    count=self.ingest_workers,
                    creds=self.creds,
                )
                self._workers.start()
            else:
                await self._conn.subscribe_inline(names.ALL_TELEMETRY, self._on_telemetry)
            await self._conn.subscribe_inline(names.ALL_EVENTS, self._on_rank_event)
            await self._conn.subscribe(
                names.ALL_CONTROL, self._on_control, queue="torchloom-weaver"
            )
            await self._conn.subscribe(names.ALL_JOIN, self._on_control, queue="torchloom-weaver")
            await self._conn.subscribe(names.ALL_CONFIG_WATCH, self._on_config_write)
            await self._conn.flush()
            if self.system_creds is not None:
                self._sys_conn = await connect(
                    self.nats_url,
                    name="torchloom-weaver-system",
                    retry_forever=True,
                    creds=self.system_creds,
                )
                await follow_disconnects(self._sys_conn, self._on_closed_connection)
            self.ready.set()
            log.info("weaver ready on %s", self._conn.connected_url)
            persister = asyncio.ensure_future(
                self.recorder.flush_forever(every_s=self.tick_interval_s)
            )
            collector = asyncio.ensure_future(freeze_long_lived())
            try:
                while self._lost is None:
                    await asyncio.sleep(self.tick_interval_s)
                    self.tick()
                    if self._listening and not self._lease_doubt:
                        self.policy_loop.maybe_decide()
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
                    await asyncio.shield(self.recorder.flush())
                if self.lease is not None and self.role == "leader":
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.lease.release())
            self._closing = True
            if self._workers is not None:
                self._workers.stop()
            if self._sys_conn is not None:
                await self._sys_conn.close()
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

    async def _open_state(self) -> None:
        """Bind the buckets and :meth:`_load` the state from them, tried again until JetStream
        answers: a Weaver taking over after a server loss (or a partition) comes up while the
        cluster still elects new leaders for the buckets, and must not give up then."""
        assert self._conn is not None
        while True:
            try:
                # a config write not acknowledged in 2 s is tried again (see _submit_locked)
                self._config_kv = await KeyValue.open(
                    self._conn, names.CONFIG_BUCKET, timeout_s=2.0
                )
                self._configs = ConfigStore(self._config_kv)
                self._registry_kv = await KeyValue.open(
                    self._conn, names.REGISTRY_BUCKET, timeout_s=2.0
                )
                self.recorder.registry = self._registry_kv
                self._checkpoints_kv = await KeyValue.open(
                    self._conn, names.CHECKPOINTS_BUCKET, timeout_s=2.0
                )
                self.recorder.checkpoints = self._checkpoints_kv
                self.recorder.history = History(self._conn, fenced=True)
                self.policy_loop.config_kv = self._config_kv
                await self._load()
                return
            except NotReachableError as exc:
                log.warning("cannot read the stored state yet (%s); trying again", exc.message)
                await asyncio.sleep(0.5)

    async def _load(self) -> None:
        """Rebuild jobs, desired configs and the DR map from the KV buckets."""
        assert self._config_kv is not None and self._registry_kv is not None
        now = self.clock()
        for key, (raw, revision) in (await self._config_kv.entries(consistent=True)).items():
            if key == names.POLICIES_KEY:
                if self.restore_policies:
                    self.policy_loop.restore(raw)
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
            rank = Rank(entry, step_changed_ts=now, restored=entry.state in LIVE_STATES)
            self.state.job(entry.job_id).ranks[rank.key] = rank
            touch(self.state, rank.key, stepped=True)
        assert self._checkpoints_kv is not None
        for key, raw in (await self._checkpoints_kv.items()).items():
            try:
                rec = decode(raw, CheckpointRecord, kind="stored checkpoint")
            except DecodeError as exc:
                log.warning("ignoring checkpoint entry %s: %s", key, exc)
                continue
            self.state.job(rec.job_id).checkpoints[rec.id] = rec
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
        history = self.recorder.history
        assert history is not None
        stored = 0
        for kind in {ev.kind for ev in doc.journal}:
            raw = await history.last(names.history_subject(doc.job_id, kind))
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
        if self.lease is not None and not self.lease.confirmed(mono):
            self._lease_doubt = True  # maybe replaced: judge nobody until the lease is renewed
            return
        if self._lease_doubt:
            self._lease_doubt = False
            log.warning("the leader lease is renewed again; liveness grace granted")
            grant_grace(self.state, self.clock())
            return
        if late_s > self.stall_grace_s:
            log.warning("weaver loop stalled for %.2f s; liveness grace granted", late_s)
            grant_grace(self.state, self.clock())
            return
        full = mono >= self._next_full_check_mono  # every rank, once a second
        if full:
            self._next_full_check_mono = mono + _FULL_LIVENESS_EVERY_S
        self._record(check_liveness(self.state, self.clock(), full=full))
        for job in self.state.jobs.values():
            if job.checkpoints:
                self._record(checkpoints.check_writers(job, self.clock()))
        if mono >= self._next_expiry_mono:
            self._next_expiry_mono = mono + _EXPIRY_EVERY_S
            self._record(expire_dead(self.state, self.clock()))
            if self._workers is not None:
                self._workers.revive()

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
        self.recorder.listeners.append(listener)

    @property
    def policy_round_s(self) -> float:
        """How long the last policy round took to decide, in seconds."""
        return self.policy_loop.round_s

    def health(self) -> dict[str, Any]:
        """The Weaver's own health: NATS link, loop lateness (ms), unsaved history, drops."""
        conn = self._conn
        return {
            "ready": self.ready.is_set(),
            "role": self.role,
            "nats_connected": bool(conn is not None and conn.is_connected and self._listening),
            "nats_url": conn.connected_url if conn is not None else None,
            "replication": dict(self.replication),
            "loop_late_ms": round(self._tick_late_s * 1000.0, 1),
            "policy_round_ms": round(self.policy_round_s * 1000.0, 1),
            "unsaved_events": self.recorder.unsaved,
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
        return await self.recorder.stored(job_id)

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
            names.check_rank_subject(msg.subject, tel.job_id, tel.replica_id, tel.rank)
        except DecodeError as exc:
            self._drop("telemetry", exc)
            return
        self._record(on_telemetry(self.state, tel, self.clock()))
        self.ingest["telemetry"].observe(nbytes=len(msg.data), lag_s=self.clock() - tel.ts)

    def _on_ingest_batch(self, msg: Message) -> None:
        """A batch of checked telemetry from an ingest worker: one decode, then each flush
        folded in as :meth:`_on_telemetry` would."""
        try:
            batch = self._ingest_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            self._drop("ingest_batch", exc)
            return
        for _ in range(batch.dropped):
            self.state.count_dropped("telemetry")
        now = self.clock()
        stats = self.ingest["telemetry"]
        nbytes = len(msg.data) // max(1, len(batch.telemetry))
        for tel in batch.telemetry:
            self._record(on_telemetry(self.state, tel, now))
            stats.observe(nbytes=nbytes, lag_s=now - tel.ts)

    def _on_closed_connection(self, closed: Disconnect) -> None:
        if self._listening and closed.name.startswith("threadlet-"):
            self._record(
                on_connection_closed(
                    self.state, closed.conn, reason=closed.reason, now=self.clock()
                )
            )

    def _on_rank_event(self, msg: Message) -> None:
        try:
            ev = decode(msg.data, RankEvent, kind="rank event")
            names.check_rank_subject(msg.subject, ev.job_id, ev.replica_id, ev.rank)
        except DecodeError as exc:
            self._drop("rank_event", exc)
            return
        now = self.clock()
        self._record(on_rank_event(self.state, ev, now))
        if ev.kind in ("checkpoint_saved", "checkpoint_failed"):
            job = self.state.job(ev.job_id)
            self._record(checkpoints.on_report(job, ev, now))
            checkpoints.on_removed(job, ev)
        elif ev.kind == "checkpoint_backed_up":
            checkpoints.on_backed_up(self.state.job(ev.job_id), ev)
        elif ev.kind == "checkpoint_corrupt":
            self._record(checkpoints.on_corrupt(self.state.job(ev.job_id), ev, now))
        self.ingest["rank_event"].observe(nbytes=len(msg.data), lag_s=self.clock() - ev.ts)

    async def _on_control(self, msg: Message) -> None:
        try:
            req = decode(msg.data, ControlRequest, kind="control request")
            if names.job_of_subject(msg.subject) != req.job_id:
                raise DecodeError("control request", f"job {req.job_id!r} sent on {msg.subject}")
            if msg.subject.endswith(".join") and req.op not in JOIN_SUBJECT_OPS:
                raise DecodeError(
                    "control request", f"only a join or a checkpoint listing on {msg.subject}"
                )
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
            self.policy_loop.handle(req) if req.op in ("policies", "policy") else self.submit(req)
        )
        await self._reply(msg, reply)

    async def submit(self, req: ControlRequest) -> ControlReply:
        """The control entry point: validate, persist the new desired config, record, answer.

        The reply goes out once the config's KV write is acknowledged; its history entries
        are in that same document's journal, so they are appended right after, off the
        reply's path, without being lost if this Weaver dies first. Reads (``status``,
        ``knobs``) are answered at once, without the control lock.
        """
        if req.op in READ_OPS:
            return control.handle(self.state, req, self.clock(), self.settings).reply
        if req.op != "join":
            await self._until_heard_since_restore(req.job_id)
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
        self.recorder.flush_soon()
        return reply

    async def _until_heard_since_restore(self, job_id: str, *, poll_s: float = 0.05) -> None:
        """Wait until every live rank of ``job_id`` restored from the registry at this
        Weaver's start has sent a heartbeat (see :func:`unheard_since_restore`), or until it
        would be failed for its silence (the job's failure timeout, plus a second for the
        liveness check): right after a takeover, an effective step planned on the steps the
        registry last saved could already be behind the ranks, which would then apply the
        version at different steps. Costs nothing once they have been heard."""
        deadline = time.monotonic() + liveness_of(self.state, job_id).failure_timeout_s + 1.0
        while unheard_since_restore(self.state, job_id) and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)

    async def _submit_locked(self, req: ControlRequest) -> ControlReply:
        """Decide, write, commit. A write JetStream did not acknowledge (a cluster electing a
        new leader for the bucket) is decided and tried again — with a fresh effective step —
        for up to ``settings.write_retry_s``; a try that landed though its acknowledgement was
        lost is recognised by the next one's failed compare-and-set, and committed as it was
        written: no version is lost, none is made twice."""
        deadline = time.monotonic() + self.settings.write_retry_s
        tried: list[tuple[bytes, Outcome]] = []
        restored = False
        while True:
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
                self._crash.maybe_crash("before_config_write", req.op)
                try:
                    await self._write_config(outcome.new_config, tried=tried, outcome=outcome)
                except NotReachableError as exc:
                    if time.monotonic() < deadline:
                        await asyncio.sleep(0.25)
                        continue
                    return ControlReply.refusal(exc, prefix="not applied: ")
                except _Landed as landed:
                    outcome = landed.outcome
                except ConflictError as exc:
                    if not restored and await self._restore_config(req.job_id):
                        restored = True  # decided once more over the restored document
                        continue
                    return (
                        _conflict_reply(req.job_id)
                        if restored
                        else ControlReply.refusal(
                            exc, prefix="not applied: ", suffix="; this weaver steps down"
                        )
                    )
                self._crash.maybe_crash("after_config_write", req.op)
            self._record(control.commit(self.state, req, outcome, self.clock()))
            return outcome.reply

    async def _write_config(
        self, doc: DesiredConfig, *, tried: list[tuple[bytes, Outcome]], outcome: Outcome
    ) -> None:
        """Write ``doc`` (compare-and-set). ``tried``: this request's earlier writes that were
        not acknowledged (this one is added if it is not either).

        Raises:
            NotReachableError: not acknowledged.
            _Landed: the compare-and-set failed because an earlier try is the key's value.
            ConflictError: someone else wrote the job's config.
        """
        assert self._configs is not None
        raw = encode(doc)
        try:
            await self._configs.write(doc)
        except NotReachableError:
            tried.append((raw, outcome))
            raise
        except ConflictError:
            if tried:
                index = await self._configs.landed(doc.job_id, [r for r, _ in tried])
                if index is not None:
                    raise _Landed(tried[index][1]) from None
            raise

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

    async def _reply(self, msg: Message, reply: ControlReply) -> None:
        if msg.reply and self._conn is not None:
            with contextlib.suppress(NotReachableError):
                await self._conn.publish(msg.reply, encode(reply))

    def _record(self, events: list[HistoryEvent]) -> None:
        self.recorder.record(events)
        self.policy_loop.soon(events)


class _Landed(Exception):
    """An earlier, unacknowledged try of this request's config write is what the key holds."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("landed")
        self.outcome = outcome


def _conflict_reply(job_id: str) -> ControlReply:
    conflict = ConflictError(names.CONFIG_BUCKET, names.config_key(job_id), 0)
    conflict.message = f"job {job_id}'s config keeps being written by someone else"
    return ControlReply.refusal(conflict, prefix="not applied: ", suffix="; send it again")


def _connection_of(reply: str) -> str:
    """Who sent a request, as NATS knows it: its reply inbox without the last token (nats-py
    and the other current clients share one inbox prefix per connection; a client that makes
    a new inbox for every request is not held back by a limit keyed on this)."""
    return reply.rsplit(".", 1)[0] if reply else "?"
